"""Needle oracle: an upper bound for diagnosis, not a method. It is told which prompt positions hold the needle
sentences (the tokens the answer is in) and keeps them; every other slot goes to the most recent tokens.

If a task fails under the oracle at budget M, no scoring rule can pass it at M with this model and cache schedule;
if the oracle passes and a policy fails, the policy kept the wrong tokens. Used by the eval harness as policy
``"oracle"`` for tasks with needles in a haystack (it reads the needle sentences from the sample).
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy

KEEP = 1e9   # a kept needle token outranks any recency score


class NeedleOraclePolicy(EvictionPolicy):
    name = "oracle"

    def __init__(self, keep_positions):
        self.keep = torch.as_tensor(keep_positions, dtype=torch.long).flatten()

    def new_state(self, keys, values, logb, pos):
        return torch.isin(pos, self.keep.to(pos.device)).float()

    def scores(self, state, pos, t_now):
        return state * KEEP - (t_now.view(-1, 1, 1) - pos).float()

    def __repr__(self) -> str:
        return f"NeedleOraclePolicy({self.keep.numel()} positions)"

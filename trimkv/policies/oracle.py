"""Needle oracle: an upper bound for diagnosis, not a method. It is told which prompt positions hold the needle
sentences (the tokens the answer is in) and keeps them; every other slot goes to the most recent tokens.

It is TRIM-KV with perfect gates: log beta = 0 (never decays) on the needle, -1 (recency) everywhere else, so it
runs through the same scoring and fused decode step as the learned gates. If a task fails under the oracle at
budget M, no scoring rule can pass it at M with this model and cache schedule; if the oracle passes and a policy
fails, the policy kept the wrong tokens. Used by the eval harness as policy ``"oracle"`` for tasks with needles in a
haystack (it reads the needle sentences from the sample).

Tie: the newest token also scores 0; the cache's recent ``window`` protects it, so with ``window >= 1`` and a
budget above sink + window + needle the needle is always kept.
"""
from __future__ import annotations

import torch

from .base import RetentionPolicy


class NeedleOraclePolicy(RetentionPolicy):
    name = "oracle"

    def __init__(self, keep_positions):
        super().__init__()                                                    # the plain retention score
        self.keep = torch.as_tensor(keep_positions, dtype=torch.long).flatten()

    def new_state(self, keys, values, logb, pos):
        recency = super().new_state(keys, values, None, pos)                  # log beta -1 for every token
        return recency.masked_fill(torch.isin(pos, self.keep.to(pos.device)), 0.0)

    def __repr__(self) -> str:
        return f"NeedleOraclePolicy({self.keep.numel()} positions)"

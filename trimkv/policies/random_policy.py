"""Random eviction: each token draws a seeded uniform score when it enters; the lowest draw goes.

The floor every policy must beat. Reproducible: the same ``seed`` and the same inputs evict the same tokens
(the generator lives in the policy object; build a fresh policy for each run to replay it).
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy


class RandomPolicy(EvictionPolicy):
    name = "random"
    compilable = False        # draws from a host generator: not traceable by torch.compile

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def new_state(self, keys, values, logb, pos):
        return torch.rand(pos.shape, generator=self.generator).to(pos.device)

    def __repr__(self) -> str:
        return f"RandomPolicy(seed={self.seed})"

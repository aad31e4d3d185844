"""Random eviction: each token draws a uniform score when it enters; the lowest draw goes.

The floor every policy must beat. Reproducible and order-free: a token's draw is a hash of (seed, layer, batch row,
KV head, position), computed with integer tensor ops, so the same seed and the same inputs evict the same tokens,
in eager and compiled decoding alike.
"""
from __future__ import annotations

import torch

from .base import EvictionPolicy

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 x, elementwise -> values in [0, 2^32)."""
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


class RandomPolicy(EvictionPolicy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    @classmethod
    def for_prompt(cls, *, seed: int = 0, **context) -> "RandomPolicy":
        return cls(seed=seed)

    def new_state(self, new):
        B, H, T = new.pos.shape
        dev = new.pos.device
        row = torch.arange(B, device=dev).view(B, 1, 1)
        head = torch.arange(H, device=dev).view(1, H, 1)
        key = _mix(new.pos + 0x9E3779B9 * (self.seed + 1)) + 0x85EBCA6B * (head + H * row) \
            + 0xC2B2AE35 * (new.layer_idx + 1)
        return _mix(key).to(torch.float32) / 2.0 ** 32                              # [B, H, T] in [0, 1)

    def __repr__(self) -> str:
        return f"RandomPolicy(seed={self.seed})"

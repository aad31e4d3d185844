"""K-norm (Devoto et al., 2024, arXiv 2406.11430, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): keep the keys with the LOWEST L2 norm, which correlate with high attention.

A token's state is ``-||k||`` of its (post-RoPE) key; RoPE is a rotation, so that is the pre-RoPE norm too.
No deviation (the paper keeps the first layers uncompressed in some runs; here every layer is bounded alike).
"""
from __future__ import annotations

from .base import EvictionPolicy


class KNormPolicy(EvictionPolicy):
    name = "knorm"

    def new_state(self, new):
        return -new.keys.float().norm(dim=-1)                                            # [B, H, T]


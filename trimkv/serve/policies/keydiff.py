"""KeyDiff (Park et al., 2025, arXiv 2504.15364): keep the keys most different from the others - evict the keys
with the highest cosine similarity to the anchor, the mean key of the cache.

Scores are recomputed at every eviction from the candidates' keys: ``-cos(k_i, mean_j k_j)`` with the mean over
the current candidates (kept slots, plus the new chunk at a prefill compaction; empty slots excluded).
Deviations: at a decode step the anchor is the mean of the kept keys without the newcomer (the newcomer always
enters, as for every policy of this cache); keys are post-RoPE (as cached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EvictionPolicy


class KeyDiffPolicy(EvictionPolicy):
    name = "keydiff"

    def scores(self, c):
        k = c.keys.float()                                                           # [B, H, N, D]
        valid = (c.pos >= 0).unsqueeze(-1).float()
        anchor = (k * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp_min(1.0)   # [B, H, 1, D]
        return -F.cosine_similarity(k, anchor.expand_as(k), dim=-1, eps=1e-6)        # [B, H, N]

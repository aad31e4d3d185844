"""SnapKV (Li et al., 2024, arXiv 2404.14469): at prefill, keep the keys the observation window attends to.

For a prompt chunk, the last ``obs_window`` queries' attention weights are averaged over those queries and the
query heads of the KV group, pooled over neighbouring keys (``kernel`` 7, max pooling by default, ``"avg"``
as in the reference code's other option) so a selected token brings its neighbours, and the top of that score
plus the recent window survive. Decoding does not change the scores (SnapKV compresses the prompt once):
tokens generated afterwards score 0, so once they leave the window they are the first to go and the prompt
selection stays.

Deviations: (1) with chunked prefill every chunk is compacted by its own observation window (SnapKV compresses
the whole prompt once; with ``prefill_chunk >= prompt length`` it is exactly that); earlier kept tokens are
re-scored by the new window. (2) Neighbours for pooling are the neighbouring *candidates* in position order
(already-evicted tokens leave gaps). (3) The observation window is protected only through the cache's
``window`` (SnapKV always keeps its ``obs_window`` last tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .base import AttentionPolicy


class SnapKVPolicy(AttentionPolicy):
    name = "snapkv"

    def __init__(self, obs_window: int = 32, kernel: int = 7, pooling: str = "max"):
        if pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV pooling must be 'max' or 'avg', got {pooling!r}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV kernel must be an odd number >= 1, got {kernel}")
        self.obs_window, self.kernel, self.pooling = obs_window, kernel, pooling

    def observe(self, state, weights, pos, q_len):
        if q_len == 1:                              # decode: scores stay as the prefill left them
            return
        w = rearrange(weights, "b h (g t) s -> b h g t s", t=q_len)
        obs = w[:, :, :, -self.obs_window:].mean(dim=(2, 3))                        # [B, Hkv, S]
        state.copy_(self._pool(obs, pos))

    def _pool(self, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Pool ``score`` [B, H, S] over keys in position order (empty slots, pos -1, sort first with score 0)."""
        if self.kernel == 1:
            return score
        order = pos.argsort(dim=-1)                                                  # [B, H, S]
        s = score.gather(-1, order)
        B, H, S = s.shape
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        kw = {} if self.pooling == "max" else {"count_include_pad": False}
        pooled = pool(s.reshape(B * H, 1, S), self.kernel, stride=1, padding=self.kernel // 2, **kw)
        return torch.empty_like(score).scatter_(-1, order, pooled.reshape(B, H, S))

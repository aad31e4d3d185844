"""Eviction policies: a policy is a scoring rule over the tokens a cache layer keeps (higher = keep).

The cache (:mod:`trimkv.cache`) owns the mechanics - slot buffers, sink/window protection, victim selection,
in-place writes; a policy only says how each kept token scores. Every slot carries one fp32 ``state`` value
(for TRIM-KV it is the token's log beta), set when the token enters and optionally updated from attention
weights (H2O, TOVA, SnapKV need them; ``needs_attention = True`` makes the attention compute them).
"""
from __future__ import annotations

import torch

from ..eviction import lookahead_score, retention_score


class EvictionPolicy:
    """Base class. Subclasses override :meth:`new_state`, :meth:`scores` and, if needed, :meth:`observe`."""

    name = "base"
    needs_attention = False   # the attention passes per-slot weights to observe()
    fused = False             # scores are (t - pos) * state: the cache may use the fused append+evict kernel
    needs_keys = False        # scores() also gets the candidates' keys [B, H, N, D] as ``keys=`` (KeyDiff)
    compilable = True         # pure tensor code: runs inside a compiled decode step (trimkv.decode)

    def new_state(self, keys: torch.Tensor, values: torch.Tensor, logb: torch.Tensor | None,
                  pos: torch.Tensor) -> torch.Tensor:
        """State of T new tokens: keys/values [B, H, T, D], logb [B, H, T] or None, pos [B, H, T] -> [B, H, T]."""
        return torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)

    def scores(self, state: torch.Tensor, pos: torch.Tensor, t_now: torch.Tensor) -> torch.Tensor:
        """Raw keep-scores [B, H, N] of kept tokens at step t_now [B] (protection is applied by the cache).

        Default: the per-slot state *is* the score (H2O, TOVA, SnapKV, K-norm, random); override when the score
        depends on the step or the position."""
        return state

    def observe(self, state: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor, q_len: int) -> None:
        """Update ``state`` [B, H, S] in place from attention ``weights`` [B, H, G*q_len, S] (query heads folded)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RetentionPolicy(EvictionPolicy):
    """TRIM-KV: a token scores ``(t - pos) * log beta``; the lowest retention is evicted.

    ``lookahead=n`` > 0 scores by DBTrimKV's future utility over the next n steps instead
    (:func:`trimkv.eviction.lookahead_score`); the fused append+evict kernel serves only the plain score.
    Without gates (or with gates disabled) tokens get log beta = -1, i.e. the cache keeps the most recent tokens.
    """

    name = "trimkv"
    fused = True
    lookahead = 0             # steps of look-ahead (0 = the plain retention score); subclasses inherit the default

    def __init__(self, lookahead: int = 0):
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 steps (0 = the plain retention score), got {lookahead}")
        self.lookahead = int(lookahead)
        self.fused = self.lookahead == 0

    def new_state(self, keys, values, logb, pos):
        if logb is None:
            return torch.full(pos.shape, -1.0, dtype=torch.float32, device=pos.device)
        return logb.float()

    def scores(self, state, pos, t_now):
        if self.lookahead:
            return lookahead_score(pos, state, t_now, self.lookahead)
        return retention_score(pos, state, t_now)   # the same formula the fused decode step uses

    def __repr__(self) -> str:
        return f"RetentionPolicy(lookahead={self.lookahead})" if self.lookahead else "RetentionPolicy()"

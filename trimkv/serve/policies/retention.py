"""TRIM-KV (Bui et al., arXiv 2512.03324): a token scores its retention ``(t - pos) * log beta``, the lowest goes.

``log beta`` comes from the trained gates when the token enters (:meth:`trimkv.attach.LayerInputs.log_beta`) and is
kept as the slot's state: 8 bytes (position, log beta) say a token's score at any future step. A newcomer scores 0
and every kept token scores <= 0, so the newcomer always enters and the victim is an argmin: the decode step is
fused into one kernel (:mod:`trimkv.kernels.triton_evict`, on CUDA; the PyTorch reference elsewhere and under
``torch.compile``, where inductor fuses it itself).

With a look-ahead of ``n`` steps (DBTrimKV's future-utility score, arXiv 2605.09649) a token scores instead

    log G = (t + 1 - pos) * log beta + log(1 - beta^n) - log(1 - beta)     # log sum_{k=1..n} beta^(t - pos + k)

its retention summed over the next n steps (n = 1 is the retention score one step ahead; beta -> 1 gives
log n + (t + 1 - pos) log beta). The newcomer still always enters; the look-ahead ranks the tokens already kept.
Both scores compare across layers and heads, so this policy also serves the global pool.
"""
from __future__ import annotations

import torch

from ...kernels import has_triton
from ..eviction import Candidates, per_row, protect, write_slots_
from .base import EvictionPolicy, NewTokens


def retention_score(pos: torch.Tensor, logb: torch.Tensor, t_now: torch.Tensor) -> torch.Tensor:
    """TRIM-KV's keep-score ``(t - pos) * log beta``: pos, logb [B, ...] (e.g. [B, H, N]), t_now [B] -> fp32."""
    return (per_row(t_now, pos) - pos).to(torch.float32) * logb


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def lookahead_score(pos: torch.Tensor, logb: torch.Tensor, t_now: torch.Tensor, lookahead: int) -> torch.Tensor:
    """DBTrimKV's future-utility keep-score ``log G = (t + 1 - pos) log beta + log(1 - beta^n) - log(1 - beta)``
    with ``n = lookahead`` (>= 1): pos, logb [B, ...], t_now [B] -> fp32 (fp64 stays fp64).

    log beta = 0 (beta = 1: the geometric factor is n) is taken as log beta = -1e-30, whose factor is n to fp32
    precision; log beta = -inf gives -inf."""
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1 step, got {lookahead}")
    lb = logb.to(torch.promote_types(logb.dtype, torch.float32))
    steps = (per_row(t_now, pos) + 1 - pos).to(lb.dtype)
    safe = lb.clamp(max=-1e-30)
    return steps * lb + _log1mexp(lookahead * safe) - _log1mexp(safe)


BACKENDS = ("torch", "triton", "auto")


def append_evict_(keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now, *, sink=0, window=0,
                  backend="torch", return_victim=True):
    """The retention policy's decode step for one new token per (row, head), in place.

    keys/values [B, H, C, D], pos [B, H, C], logb [B, H, C]; k_new/v_new [B, H, 1, D], pos_new/logb_new [B, H, 1].
    The victim of each (row, head) is its lowest-scoring slot (an empty slot if any); the newcomer is written there.
    Returns the victim slot index [B, H] (None with ``return_victim=False``, which spares the Triton path an
    allocation). ``backend``: "torch" (the reference), "triton" (one kernel, :mod:`trimkv.kernels.triton_evict`) or
    "auto" (triton on CUDA tensors when installed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if keys.is_cuda and has_triton() else "torch"
    if backend == "triton":
        from ...kernels.triton_evict import append_evict_triton_   # triton is an optional dependency

        return append_evict_triton_(keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now,
                                    sink=sink, window=window, return_victim=return_victim)
    score = protect(retention_score(pos, logb, t_now), pos, t_now, sink=sink, window=window)
    victim = score.argmin(dim=-1, keepdim=True)                                              # [B, H, 1]
    write_slots_(Candidates(keys, values, pos, logb, t_now), victim,
                 Candidates(k_new, v_new, pos_new, logb_new, t_now))
    return victim.squeeze(-1) if return_victim else None


class RetentionPolicy(EvictionPolicy):
    """TRIM-KV: keep the tokens the gates say last; ``lookahead=n`` > 0 ranks by DBTrimKV's future utility."""

    name = "trimkv"
    uses_gates = True

    def __init__(self, lookahead: int = 0):
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 steps (0 = the plain retention score), got {lookahead}")
        self.lookahead = int(lookahead)

    @classmethod
    def for_prompt(cls, *, lookahead: int = 0, **context) -> "RetentionPolicy":
        return cls(lookahead)

    def new_state(self, new: NewTokens) -> torch.Tensor:
        return new.log_beta()

    def scores(self, c: Candidates) -> torch.Tensor:
        return self.pool_scores(c.pos, c.state, c.t_now)

    def pool_scores(self, pos, state, t_now):
        if self.lookahead:
            return lookahead_score(pos, state, t_now, self.lookahead)
        return retention_score(pos, state, t_now)   # the formula the fused kernel computes

    def evict_one_(self, slots: Candidates, new: Candidates, *, sink: int, window: int) -> None:
        if self.lookahead:   # the kernel computes the plain score only
            return super().evict_one_(slots, new, sink=sink, window=window)
        # eager: the fused Triton kernel on CUDA; compiled: the PyTorch reference, which inductor fuses itself
        backend = "torch" if torch.compiler.is_compiling() else "auto"
        append_evict_(slots.keys, slots.values, slots.pos, slots.state, new.keys, new.values, new.pos, new.state,
                      slots.t_now, sink=sink, window=window, backend=backend, return_victim=False)

    def __repr__(self) -> str:
        return f"RetentionPolicy(lookahead={self.lookahead})" if self.lookahead else "RetentionPolicy()"


class RecencyPolicy(RetentionPolicy):
    """The retention policy with every log beta = -1 (``pos - t``: the newest highest), whatever the gates say:
    the base of rules that keep sinks and recent tokens (StreamingLLM, the needle oracle). It runs the fused kernel
    and the global pool like TRIM-KV, and needs no gates."""

    uses_gates = False

    def __init__(self):
        super().__init__(0)

    @classmethod
    def for_prompt(cls, **context) -> "RecencyPolicy":
        return cls()

    def new_state(self, new: NewTokens) -> torch.Tensor:
        return torch.full(new.pos.shape, -1.0, dtype=torch.float32, device=new.pos.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

"""Decode-time eviction: score the kept tokens, pick victims, write newcomers into freed slots in place.

Each (batch row, KV head) owns ``C`` slots. A slot holds one token's key/value plus 12 bytes of metadata: its
position ``pos`` (int64, -1 = empty) and its log retention ``logb`` (fp32). At step ``t`` the token in a slot
scores

    score = (t - pos) * logb        (<= 0; higher = keep)

With a look-ahead of ``n`` steps (DBTrimKV's future-utility score, arXiv 2605.09649) a slot scores instead

    log G = (t + 1 - pos) * logb + log(1 - beta^n) - log(1 - beta)     # log sum_{k=1..n} beta^(t - pos + k)

the token's retention summed over the next n steps (n = 1 is the retention score one step ahead; beta -> 1 gives
log n + (t + 1 - pos) log beta). The newcomer still always enters; the look-ahead ranks the tokens already kept.

Sink tokens (``pos < sink``) and the recent window (``pos > t - window``) score +inf (always kept); empty slots
score -inf (filled first). A newcomer scores 0, every unprotected kept token scores <= 0, so the newcomer always
enters and the victim is an argmin over the slots: the cache reuses the victim's slot in place. Slot order does not
matter for attention (RoPE is already applied to stored keys).

Everything here is vectorised over batch x heads; there is no Python loop over heads or layers.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _per_row(t_now: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t_now [B] shaped to broadcast over ``like`` [B, ...]."""
    return t_now.view(-1, *([1] * (like.dim() - 1)))


def retention_score(pos: torch.Tensor, logb: torch.Tensor, t_now: torch.Tensor) -> torch.Tensor:
    """TRIM-KV's keep-score ``(t - pos) * log beta``: pos, logb [B, ...] (e.g. [B, H, N]), t_now [B] -> fp32."""
    return (_per_row(t_now, pos) - pos).to(torch.float32) * logb


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
    steps = (_per_row(t_now, pos) + 1 - pos).to(lb.dtype)
    safe = lb.clamp(max=-1e-30)
    return steps * lb + _log1mexp(lookahead * safe) - _log1mexp(safe)


def slot_scores(pos: torch.Tensor, logb: torch.Tensor, t_now: torch.Tensor, *, sink: int = 0,
                window: int = 0, lookahead: int = 0) -> torch.Tensor:
    """pos [B, H, N] int64 (-1 = empty), logb [B, H, N] fp32, t_now [B] -> protected score [B, H, N] fp32.
    ``lookahead`` > 0: :func:`lookahead_score` with that many steps instead of :func:`retention_score`."""
    raw = lookahead_score(pos, logb, t_now, lookahead) if lookahead else retention_score(pos, logb, t_now)
    return protect(raw, pos, t_now, sink=sink, window=window)


BACKENDS = ("torch", "triton", "auto")


def append_evict_(keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now, *, sink=0, window=0,
                  backend="torch", return_victim=True):
    """Fused decode step for one new token per (row, head), in place.

    keys/values [B, H, C, D], pos [B, H, C], logb [B, H, C]; k_new/v_new [B, H, 1, D], pos_new/logb_new [B, H, 1].
    The victim of each (row, head) is its lowest-scoring slot (an empty slot if any); the newcomer is written there.
    Returns the victim slot index [B, H] (None with ``return_victim=False``, which spares the Triton path an
    allocation). ``backend``: "torch" (this function, the reference and CPU default), "triton" (one kernel,
    :mod:`trimkv.kernels.triton_evict`) or "auto" (triton on CUDA tensors when installed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        from .kernels import has_triton

        backend = "triton" if keys.is_cuda and has_triton() else "torch"
    if backend == "triton":
        from .kernels.triton_evict import append_evict_triton_

        return append_evict_triton_(keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now,
                                    sink=sink, window=window, return_victim=return_victim)
    victim = slot_scores(pos, logb, t_now, sink=sink, window=window).argmin(dim=-1, keepdim=True)  # [B, H, 1]
    _write_slots_(keys, values, pos, logb, victim, k_new, v_new, pos_new, logb_new)
    return victim.squeeze(-1) if return_victim else None


def protect(score: torch.Tensor, pos: torch.Tensor, t_now: torch.Tensor, *, sink: int = 0,
            window: int = 0) -> torch.Tensor:
    """Apply sink / window protection (+inf) and empty slots (-inf) to any policy's raw scores [B, ...]."""
    t = _per_row(t_now, pos)
    if sink > 0:
        score = score.masked_fill(pos < sink, float("inf"))
    if window > 0:
        score = score.masked_fill(pos > t - window, float("inf"))
    return score.masked_fill(pos < 0, NEG_INF)


def evict_by_score_(keys, values, pos, state, k_new, v_new, pos_new, state_new, score):
    """Generic decode step for any policy: evict argmin of ``score`` [B, H, C] (already protected), write the
    newcomer there. Same in-place contract as :func:`append_evict_`."""
    victim = score.argmin(dim=-1, keepdim=True)                                    # [B, H, 1]
    _write_slots_(keys, values, pos, state, victim, k_new, v_new, pos_new, state_new)
    return victim.squeeze(-1)


def _write_slots_(keys, values, pos, state, victim, k_new, v_new, pos_new, state_new):
    """Write one newcomer per (row, head) into slot ``victim`` [B, H, 1], in place (cast to the buffers' dtypes).

    keys/values [B, H, C, D], pos/state [B, H, C] (contiguous); k_new/v_new [B, H, 1, D], pos_new/state_new
    [B, H, 1]. An ``index_copy_`` of B*H rows into the flattened buffers: under ``torch.compile`` a ``scatter_``
    into a graph input copies the whole buffer every step (inductor), an ``index_copy_`` writes the rows in place.
    """
    B, H, C = pos.shape
    flat = (torch.arange(B * H, device=victim.device).view(B, H, 1) * C + victim).view(-1)   # [B*H] flat slot
    keys.view(B * H * C, -1).index_copy_(0, flat, k_new.reshape(B * H, -1).to(keys.dtype))
    values.view(B * H * C, -1).index_copy_(0, flat, v_new.reshape(B * H, -1).to(values.dtype))
    pos.view(-1).index_copy_(0, flat, pos_new.reshape(-1).to(pos.dtype))
    state.view(-1).index_copy_(0, flat, state_new.reshape(-1).to(state.dtype))


def keep_topk_(keys, values, pos, state, k_all, v_all, pos_all, state_all, score):
    """Keep the best C of N candidates by ``score`` [B, H, N] (already protected) in the slot buffers."""
    C, D = keys.shape[2], keys.shape[3]
    top_score, top = score.topk(C, dim=-1, sorted=False)                            # [B, H, C]
    keys.copy_(k_all.gather(2, top[..., None].expand(-1, -1, -1, D)))
    values.copy_(v_all.gather(2, top[..., None].expand(-1, -1, -1, D)))
    pos.copy_(pos_all.gather(2, top).masked_fill(top_score == NEG_INF, -1))
    state.copy_(state_all.gather(2, top))

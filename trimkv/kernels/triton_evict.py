"""Fused decode-time append+evict in one Triton kernel (the GPU fast path of :func:`trimkv.serve.policies.retention.append_evict_`).

One program per (batch row, KV head): it reads the slot metadata (pos int64, logb fp32; 12 bytes per slot),
scores every slot ``(t - pos) * logb`` (sink / window -> +inf, empty -> -inf, disabled (pos -2, a slot its head
does not own under per-head budgets) -> +inf), takes the argmin (the first one on
ties, like ``torch.argmin``) and writes the newcomer's key, value, position and log beta into that slot in place.
Same contract and result as the PyTorch reference; tested against it under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_evict_kernel(KEYS, VALUES, POS, LOGB, KNEW, VNEW, POSNEW, LOGBNEW, TNOW, VICTIM,
                         H, C, D, SINK, WINDOW, sk_b, sk_h, sv_b, sv_h, sp_b, sp_h, sl_b, sl_h,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_VICTIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)             # b * H + h
    b = row // H
    h = row % H
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    pos = tl.load(POS + row * C + offs_c, mask=c_ok, other=0)
    lb = tl.load(LOGB + row * C + offs_c, mask=c_ok, other=0.0)
    t = tl.load(TNOW + b)
    score = (t - pos).to(tl.float32) * lb
    score = tl.where(pos < SINK, float("inf"), score)
    score = tl.where((WINDOW > 0) & (pos > t - WINDOW), float("inf"), score)
    score = tl.where(pos < 0, float("-inf"), score)
    score = tl.where(pos < -1, float("inf"), score)    # disabled slot: never the victim
    score = tl.where(c_ok, score, float("inf"))       # padding lanes are never chosen
    # argmin, first index on ties (also when every slot is +inf): smallest index among the minima
    smin = tl.min(score, 0)
    victim = tl.min(tl.where(score == smin, offs_c, BLOCK_C), 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(KNEW + b * sk_b + h * sk_h + offs_d, mask=d_ok)
    v = tl.load(VNEW + b * sv_b + h * sv_h + offs_d, mask=d_ok)
    tl.store(KEYS + (row * C + victim) * D + offs_d, k.to(KEYS.dtype.element_ty), mask=d_ok)
    tl.store(VALUES + (row * C + victim) * D + offs_d, v.to(VALUES.dtype.element_ty), mask=d_ok)
    tl.store(POS + row * C + victim, tl.load(POSNEW + b * sp_b + h * sp_h).to(tl.int64))
    tl.store(LOGB + row * C + victim, tl.load(LOGBNEW + b * sl_b + h * sl_h).to(tl.float32))
    if WRITE_VICTIM:
        tl.store(VICTIM + row, victim)


def append_evict_triton_(keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now, *, sink=0, window=0,
                         return_victim: bool = True):
    """Same contract as :func:`trimkv.serve.policies.retention.append_evict_`: keys/values [B, H, C, D], pos [B, H, C] int64,
    logb [B, H, C] fp32 (all contiguous, updated in place); k_new/v_new [B, H, 1, D], pos_new/logb_new [B, H, 1]
    (any strides, e.g. a position broadcast over heads), t_now [B]. Returns the victim slot index [B, H]
    (``return_victim=False``: None, one allocation less on the decode hot path)."""
    B, H, C, D = keys.shape
    for name, t in (("keys", keys), ("values", values), ("pos", pos), ("logb", logb)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: the kernel writes the slot buffers in place")
    if values.shape[-1] != D:
        raise ValueError("the fused kernel needs keys and values of the same head dim")
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    victim = torch.empty(B, H, dtype=torch.int64, device=keys.device) if return_victim else pos
    _append_evict_kernel[(B * H,)](
        keys, values, pos, logb, k_new, v_new, pos_new, logb_new, t_now.to(torch.int64).contiguous(), victim,
        H, C, D, int(sink), int(window), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        pos_new.stride(0), pos_new.stride(1), logb_new.stride(0), logb_new.stride(1),
        BLOCK_C=triton.next_power_of_2(C), BLOCK_D=triton.next_power_of_2(D), WRITE_VICTIM=return_victim)
    return victim if return_victim else None

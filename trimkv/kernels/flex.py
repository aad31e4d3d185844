"""Retention attention through ``torch.nn.attention.flex_attention`` (the authors' training path).

The additive log-decay bias is a ``score_mod`` over captured tensors and the visibility rules a ``mask_mod``:

    score_mod(score, b, h, i, j) = score + (q_pos[b, i] - k_pos[b, j]) * logb[b, h // G, j]
    mask_mod(b, h, i, j)         = k_pos[b, j] <= q_pos[b, i] & same segment & k_valid[b, j]

Gradients into the captured ``logb`` flow through FlexAttention's captured-buffer support (atomics on GPU).
On CPU FlexAttention has no backward; the forward is what the CPU tests check. For speed on GPU wrap the
caller in ``torch.compile`` (eager FlexAttention materialises scores block by block through a reference loop).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..shapes import check_meta, check_qkv


def retention_attention_flex(q, k, v, logb, *, scaling, q_pos, k_pos, q_seg=None, k_seg=None, k_valid=None,
                             compile: bool | None = None) -> Tensor:
    """Same contract as :func:`trimkv.attention.retention_attention_reference` (q [B, H, T, D], k/v
    [B, Hkv, S, D], logb [B, Hkv, S] or None). ``compile`` (default: on CUDA) runs flex_attention compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Hkv, G = check_qkv(q, k, v, logb)
    B, H, T, _ = q.shape
    S = k.shape[2]
    q_pos, k_pos, q_seg, k_seg, k_valid = check_meta(q_pos, k_pos, q_seg, k_seg, k_valid, B, T, S)
    if logb is None:
        logb = q.new_zeros(B, Hkv, S, dtype=torch.float32)
    lb = logb.float()

    def score_mod(score, b, h, i, j):
        return score + (q_pos[b, i] - k_pos[b, j]).to(score.dtype) * lb[b, h // G, j]

    def mask_mod(b, h, i, j):
        vis = k_pos[b, j] <= q_pos[b, i]
        if q_seg is not None:
            vis = vis & (q_seg[b, i] == k_seg[b, j])
        if k_valid is not None:
            vis = vis & k_valid[b, j]
        return vis

    compile = q.is_cuda if compile is None else compile
    fn = torch.compile(flex_attention) if compile else flex_attention
    block_mask = create_block_mask(mask_mod, B, None, T, S, device=q.device)
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=G > 1)
    # rows with no visible key come out as 0 (as in the reference; checked by tests/test_kernels.py)
    return out.to(q.dtype)

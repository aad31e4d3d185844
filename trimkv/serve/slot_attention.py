"""Attention over a cache layer's kept slots: per-head validity, GQA folded (keys and values are never repeated)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   k_valid: torch.Tensor, scaling: float, return_weights: bool = False):
    """q [B, H, T, D], k/v [B, Hkv, S, D], q_pos [B, T], k_pos/k_valid [B, Hkv, S] -> out [B, H, T, D]
    (and, with ``return_weights``, the softmax weights [B, Hkv, G*T, S] for attention-based policies, rows ordered
    (group head, query))."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.reshape(B, Hkv, G * T, D)                                          # query group folded into rows
    qp = q_pos.repeat(1, G)                                                   # [B, G*T]
    mask = k_valid[:, :, None, :] & (k_pos[:, :, None, :] <= qp[:, None, :, None])   # [B, Hkv, G*T, S]
    empty = ~mask.any(-1, keepdim=True)
    if return_weights:
        logits = (qf.float() @ k.float().transpose(-1, -2)) * scaling
        w = logits.masked_fill(~mask, float("-inf")).softmax(-1).masked_fill(empty, 0.0)
        out = (w.to(v.dtype) @ v).reshape(B, H, T, v.shape[-1])
        return out, w
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scaling)
    return out.masked_fill(empty, 0.0).reshape(B, H, T, v.shape[-1])

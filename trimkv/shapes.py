"""Input checks and block tables shared by the PyTorch attention (:mod:`trimkv.attention`) and its fast paths
(:mod:`trimkv.kernels`): one definition of what valid inputs are, imported by both."""
from __future__ import annotations

import torch
from torch import Tensor

I64_MAX = torch.iinfo(torch.int64).max
I64_MIN = torch.iinfo(torch.int64).min


def check_meta(q_pos, k_pos, q_seg, k_seg, k_valid, B: int, T: int, S: int):
    """Validate positions / segments / validity and return them as int64 / bool tensors."""
    if tuple(q_pos.shape) != (B, T) or tuple(k_pos.shape) != (B, S):
        raise ValueError(f"q_pos must be [B, T]={[B, T]} and k_pos [B, S]={[B, S]}, "
                         f"got {list(q_pos.shape)} and {list(k_pos.shape)}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both q_seg and k_seg (document ids of queries and keys) or neither")
    if q_seg is not None:
        if tuple(q_seg.shape) != (B, T) or tuple(k_seg.shape) != (B, S):
            raise ValueError(f"q_seg must be [B, T]={[B, T]} and k_seg [B, S]={[B, S]}, "
                             f"got {list(q_seg.shape)} and {list(k_seg.shape)}")
        q_seg, k_seg = q_seg.long(), k_seg.long()
    if k_valid is not None:
        if tuple(k_valid.shape) != (B, S):
            raise ValueError(f"k_valid must be [B, S]={[B, S]}, got {list(k_valid.shape)}")
        k_valid = k_valid.bool()
    return q_pos.long(), k_pos.long(), q_seg, k_seg, k_valid


def check_qkv(q: Tensor, k: Tensor, v: Tensor, logb: Tensor | None) -> tuple[int, int]:
    """Check the attention operand shapes; return (Hkv, G)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be [B, H, T, D] and k, v [B, Hkv, S, D] (heads before time)")
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} KV heads (GQA needs H = G * Hkv)")
    if logb is not None and tuple(logb.shape) != (B, Hkv, S):
        raise ValueError(f"logb must be [B, Hkv, S]={[B, Hkv, S]} (one log retention per KV head and key), "
                         f"got {list(logb.shape)}")
    return Hkv, H // Hkv


def block_ranges(x: Tensor, size: int, fill: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-block min and max of x [B, N] over entries where mask holds -> two [B, nblocks] tensors."""
    B, N = x.shape
    nb = -(-N // size)
    idx = torch.arange(nb * size, device=x.device).clamp_max(N - 1)  # repeat the last entry as padding
    xb = x[:, idx].view(B, nb, size)
    if mask is None:
        return xb.amin(-1), xb.amax(-1)
    mb = mask[:, idx].view(B, nb, size)
    return xb.masked_fill(~mb, I64_MAX).amin(-1), xb.masked_fill(~mb, fill).amax(-1)


def check_capacity(logb: Tensor, pos: Tensor, seg, valid):
    if logb.dim() != 3:
        raise ValueError(f"logb must be [B, Hkv, T], got {list(logb.shape)}")
    B, _, T = logb.shape
    pos, _, seg, _, valid = check_meta(pos, pos, seg, seg, valid, B, T, T)
    return pos, seg, valid

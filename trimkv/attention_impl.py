"""The attention implementation ``"trimkv"`` that transformers calls in every decoder layer once hooks are installed
(:func:`trimkv.attach.install_hooks` registers it with ``transformers.AttentionInterface``).

Two cases, decided by what the layer's pre-hook handed over (:class:`trimkv.attach.LayerInputs`):

* **one of trimkv's caches** (bounded, pooled, soft-gated): one call, ``layer.attend(q, k, v, scaling=...)``; the
  cache layer inserts, attends and evicts (:mod:`trimkv.serve`);
* **no trimkv cache** (training, the teacher pass, a single full forward): the training form. With gates on it is
  the paper's retention-gated attention (Eq. 3, :func:`trimkv.attention.retention_attention`), otherwise plain
  causal attention. Packed documents are separated by ``position_ids`` restarting at 0; padding comes from the 2-D
  mask a pre-hook on the decoder saw. A plain transformers cache that already holds tokens cannot be gated (their
  log retention is unknown): that is refused, with the fix.

No mask function is registered under ``"trimkv"``, so transformers passes ``attention_mask=None`` and this module
masks by itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import retention_attention
from .errors import CacheError


@dataclass
class Record:
    """What one layer's gate produced in the last forward (kept for the capacity loss)."""

    logb: torch.Tensor          # [B, Hkv, T] fp32
    pos: torch.Tensor           # [B, T] int64 positions within each document
    seg: torch.Tensor | None    # [B, T] document ids, None = one document per row


def trimkv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q [B, H, T, D], k/v [B, Hkv, S, D] -> out [B, T, H, D]."""
    handle, layer_idx = module._trimkv
    inputs, layer = handle._inputs.pop(layer_idx)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer is not None:
        return layer.attend(query, key, value, scaling=scaling).transpose(1, 2), None
    T, S = query.shape[2], key.shape[2]
    if handle._meta is None or handle._meta[:2] != (T, S):   # the same for every layer of one forward
        handle._meta = (T, S, _positions(inputs.pos, handle._mask2d, T, S, handle.packed))
    q_pos, k_pos, seg, k_valid = handle._meta[2]
    if inputs.gate is None:
        out = _plain_attention(query, key, value, q_pos, k_pos, seg, k_valid, scaling)
        return out.transpose(1, 2).contiguous(), None
    if S != T:
        raise CacheError(
            f"layer {layer_idx}: the gates are on and the model runs with a plain transformers cache that holds {S - T} "
            "earlier tokens whose log retention it does not keep. Use one of trimkv's caches "
            "(trimkv.make_cache(model, ...) for a bounded one, trimkv.SoftRetentionCache for the full cache with "
            "soft-gated attention), or run the frozen model (with model.trimkv.disabled(): ...)")
    logb = inputs.log_beta(key, value)                                # [B, Hkv, S]
    if handle.record:
        handle.records[layer_idx] = Record(logb=logb, pos=k_pos, seg=seg)
    out = retention_attention(query, key, value, logb, scaling=scaling, q_pos=q_pos, k_pos=k_pos,
                              q_seg=seg, k_seg=seg, k_valid=k_valid, impl=handle.attn_impl)
    return out.transpose(1, 2).contiguous(), None


def _positions(pos: torch.Tensor, mask2d: torch.Tensor | None, T: int, S: int, packed: bool | None = None):
    """Positions, document ids and key validity of the training form.

    Without past (T == S): positions are ``position_ids``; a packed row starts a new document wherever its positions
    do not increase by one. ``packed`` (known on the host by the training step) says whether any row does; ``None``
    finds out, at the cost of one host sync per forward. With a past (the frozen model continuing a plain cache):
    positions are indices.
    """
    B, device = pos.shape[0], pos.device
    seg = None
    if T == S and mask2d is None:
        q_pos = k_pos = pos
        if packed is None:
            packed = bool((pos[:, 1:] != pos[:, :-1] + 1).any())
        if packed:
            seg = document_ids(pos)                                       # [B, T]
    else:
        k_pos = torch.arange(S, device=device).expand(B, S)
        q_pos = k_pos[:, S - T:]
    k_valid = None if mask2d is None else mask2d[:, -S:].to(device=device, dtype=torch.bool)
    return q_pos, k_pos, seg, k_valid


def document_ids(pos: torch.Tensor) -> torch.Tensor:
    """[..., T] ids (1, 2, ...) of the packed documents of rows of positions ``pos`` [..., T]: a new document starts
    wherever the positions do not increase by one."""
    restart = torch.ones_like(pos, dtype=torch.bool)
    restart[..., 1:] = pos[..., 1:] != pos[..., :-1] + 1
    return restart.long().cumsum(-1)


def packed_documents(pos: torch.Tensor) -> torch.Tensor | None:
    """:func:`document_ids` of ``pos``, or None when every row holds one document (one host sync)."""
    seg = document_ids(pos)
    return seg if bool((seg[..., -1] > 1).any()) else None


def _plain_attention(q, k, v, q_pos, k_pos, seg, k_valid, scaling):
    """Causal softmax attention with padding / packing masks, via SDPA (GQA without repeating k/v)."""
    T, S = q.shape[2], k.shape[2]
    if seg is None and k_valid is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    mask = k_pos[:, None, :] <= q_pos[:, :, None]                         # [B, T, S]
    if seg is not None:
        mask = mask & (seg[:, None, :] == seg[:, :, None])
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    return out.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)          # rows with no visible key -> 0

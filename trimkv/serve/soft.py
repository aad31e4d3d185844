"""The full cache with soft-gated attention: every token is kept and attended with its retention weight, the
training form of TRIM-KV (the paper's Eq. 3: ``q.k / sqrt(d) + (t - i) log beta_i``) at inference.

A transformers ``DynamicLayer`` that also keeps each cached token's log beta (8 bytes, reordered with the keys in
beam search), because an "rg" gate sees a token once, when it enters. Use it to check that generation with the gates
equals the gated model run on the whole sequence, or to serve the gates without eviction:

    cache = SoftRetentionCache(num_layers)                 # gates attached and enabled
    model.generate(ids, **cache_kwargs(model, cache), ...)
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attach import CacheLayer, LayerInputs
from ..attention import retention_attention
from ..errors import CacheError


class SoftRetentionLayer(DynamicLayer, CacheLayer):
    """One layer: keys and values grow like ``DynamicLayer``'s, log beta [B, Hkv, S] beside them."""

    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.logb: torch.Tensor | None = None
        self._staged: LayerInputs | None = None

    def stage(self, inputs: LayerInputs) -> None:
        self._staged = inputs

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float) -> torch.Tensor:
        """q [B, H, T, D]; k/v [B, Hkv, S, D]: every cached token, the T new ones last."""
        inputs, self._staged = self._staged, None
        if inputs.gate is None and inputs.logb is None:
            raise CacheError("a SoftRetentionCache runs the gated model: attach gates and keep them enabled (for the "
                             "frozen model's full cache use transformers' DynamicCache)")
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        new = inputs.log_beta(k[:, :, S - T:], v[:, :, S - T:])                    # [B, Hkv, T]
        past = S - T
        if past and (self.logb is None or self.logb.shape[-1] != past):
            raise CacheError(f"layer {self.layer_idx}: the cache holds {past} tokens whose log retention is unknown")
        self.logb = new if not past else torch.cat([self.logb, new], dim=-1)        # [B, Hkv, S]
        k_pos = torch.arange(S, device=q.device).expand(B, S)
        valid = None if inputs.mask2d is None else inputs.mask2d[:, -S:].to(device=q.device, dtype=torch.bool)
        return retention_attention(q, k, v, self.logb, scaling=scaling, q_pos=k_pos[:, past:], k_pos=k_pos,
                                   k_valid=valid, impl=inputs.attn_impl)

    def reset(self) -> None:
        super().reset()
        self.logb = self._staged = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.logb is not None:
            self.logb = self.logb.index_select(0, beam_idx.to(self.logb.device))


class SoftRetentionCache(Cache):
    """Every token kept, attention soft-gated by retention (see the module docstring)."""

    uses_gates = True

    def __init__(self, num_layers: int):
        super().__init__(layers=[SoftRetentionLayer(i) for i in range(num_layers)])

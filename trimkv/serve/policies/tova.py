"""TOVA, Token Omission Via Attention (Oren et al., 2024, arXiv 2401.06104): evict the token the current query
attends to least.

A token's state is the attention weight the latest query gave it, averaged over the query heads of its KV group
(the paper's multi-head variant averages over heads of the layer; with GQA each KV head keeps its own tokens,
so the average is over its group). A prefill chunk is compacted by the chunk's last query.

The cache evicts before the new token's attention, with the weights of the previous query: step t+1 drops what
query t attended to least, which is what TOVA drops at the end of step t (the kept set is the same, one step
later). Needs ``window >= 1`` only if you want the newest token protected from its own successor.
"""
from __future__ import annotations

from einops import rearrange

from .base import AttentionPolicy


class TOVAPolicy(AttentionPolicy):
    name = "tova"

    def observe(self, state, weights, pos, q_len):
        w = rearrange(weights, "b h (g t) s -> b h g t s", t=q_len)
        state.copy_(w[:, :, :, -1].mean(dim=2))     # last query, averaged over the group: [B, Hkv, S]

"""LAQ, Lookahead Q-Cache (Wang et al., EMNLP 2025, arXiv 2505.20334, "Lookahead Q-Cache: Achieving More Consistent
KV Cache Eviction via Pseudo Query"): select the prompt tokens with the queries of a few pseudo decoded tokens, which
resemble the real decoding queries better than the prompt's last window does.

The paper's recipe (and its released code, whose default settings are used here):

1. stage 1: compress the prompt with SnapKV (observation window of the last ``stage1_window`` = 32 prompt queries,
   max-pooling ``kernel`` 7) to the same budget;
2. pseudo decode ``n`` = 8 tokens greedily with that compressed cache, keeping their (post-RoPE) queries ``Q_la`` at
   every layer;
3. stage 2: score every prompt token by the attention the lookahead queries give it, plus (LAQ++, the released
   script's setting ``local_window`` = 8) the attention of the prompt's last ``local_window`` queries,

       s_j = sum_{q in Q_la (+ local window)} softmax(q K^T * scale)_j,    pooled (max, kernel 7) over positions,

   keep the top tokens, drop the pseudo tokens and decode for real from the prompt. ``local_window=0`` is plain LAQ.

In this cache (at most ``budget + chunk`` tokens per head, never the whole prompt) that is two passes:
:func:`trimkv.serve.laq_lookahead.LookaheadLAQ.lookahead` runs stages 1-2 (a chunked prefill into a SnapKV cache of the
same budget, then ``n`` greedy steps that record each layer's query; it drives the model, so it lives above the
policies) and returns the policy that holds ``Q_la`` [L, B, Hq, n, D] and their positions; the real prefill then
compacts every chunk by the stage-3 score over [kept + chunk]. The evaluation harness builds it per prompt
(``LookaheadLAQ.for_prompt`` gets the model, the prompt and the cache settings). Decoding leaves the
scores as the prompt left them (LAQ, like SnapKV, selects the prompt once): generated tokens score 0, so once they
leave the recent window they go first.

Deviations: (1) cost: the prompt is prefilled twice (stage 1, then the real prefill; the paper keeps the full prompt
KV once and re-selects from it), plus ``n`` decode steps. (2) Chunked prefill: each chunk is compacted by the
lookahead queries over the candidates [kept + chunk] (softmax over those, not over the whole prompt), and LAQ++'s
local window is each chunk's last ``local_window`` queries; the last ``local_window`` prompt tokens, which LAQ++
always keeps, are kept by the cache's recent ``window`` when it is that wide (16 in the harness). (3) GQA: the
reference repeats K/V per query head (one selection per query head); here the scores of a KV head's query group are
summed. (4) Pseudo decoding always runs ``n`` steps (the reference stops early at an end-of-sequence token).
(5) Without lookahead queries (a policy built by name, without a model and prompt: ``make_cache(model, "laq", ...)``,
fidelity runs) it is LAQ's stage 1 alone, i.e. SnapKV with a ``stage1_window`` observation window, and says so in a
warning; the evaluation harness always builds the full method.
"""
from __future__ import annotations

import warnings

import torch
from einops import rearrange

from ...errors import CacheError
from ..slot_attention import slot_attention
from .base import EvictionPolicy, NewTokens
from .snapkv import SnapKVPolicy


class LAQPolicy(SnapKVPolicy):
    name = "laq"

    def __init__(self, queries: torch.Tensor | None = None, query_pos: torch.Tensor | None = None, *,
                 local_window: int = 8, stage1_window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(obs_window=stage1_window, kernel=kernel, pooling=pooling)
        if local_window < 0:
            raise ValueError(f"LAQ local_window must be >= 0 queries (0 = plain LAQ, 8 = LAQ++), got {local_window}")
        if (queries is None) != (query_pos is None):
            raise ValueError("LAQ needs both the lookahead queries and their positions (or neither)")
        self.queries, self.query_pos = queries, query_pos       # [L, B, Hq, n, D], [B, n]
        self.local_window = local_window
        self._layer = 0                                         # the layer being prefilled (set by new_state)

    def new_state(self, new: NewTokens) -> torch.Tensor:
        if new.pos.shape[-1] > 1:            # a prefill chunk (static shape: no side effect in a decode step)
            self._layer = new.layer_idx
        return super().new_state(new)

    def attend(self, q, c, *, q_pos, scaling):
        T = q.shape[2]
        if T == 1:                           # decode: plain attention, the scores stay as the prompt left them
            return EvictionPolicy.attend(self, q, c, q_pos=q_pos, scaling=scaling)
        if self.queries is None:             # no lookahead queries: LAQ's stage 1 (SnapKV), said once per process
            warnings.warn("LAQ without lookahead queries runs its stage 1 only (SnapKV with a 32-query window): "
                          "build it with trimkv.serve.laq_lookahead.LookaheadLAQ.lookahead(model, ids, budget=...) "
                          "(trimkv eval does)", stacklevel=2)
            return super().attend(q, c, q_pos=q_pos, scaling=scaling)
        out, weights = slot_attention(q, c.keys, c.values, q_pos=q_pos, k_pos=c.pos, k_valid=c.pos >= 0,
                                      scaling=scaling, return_weights=True)
        if self.queries.shape[1] != q.shape[0]:
            raise CacheError(f"these LAQ lookahead queries were made for {self.queries.shape[1]} prompt(s), the batch "
                             f"has {q.shape[0]} rows: build the policy with LookaheadLAQ.lookahead(model, ids, ...) "
                             "for the same prompts")
        la = self.queries[self._layer].to(q.device, q.dtype)                                # [B, Hq, n, D]
        _, la_w = slot_attention(la, c.keys, c.values, q_pos=self.query_pos.to(q.device), k_pos=c.pos,
                                 k_valid=c.pos >= 0, scaling=scaling, return_weights=True)  # [B, Hkv, G*n, S]
        score = la_w.sum(dim=2)
        if self.local_window:
            w = rearrange(weights, "b h (g t) s -> b h g t s", t=T)
            score = score + w[:, :, :, -self.local_window:].sum(dim=(2, 3))
        c.state.copy_(self._pool(score, c.pos))
        return out

    def __repr__(self) -> str:
        n = 0 if self.queries is None else self.queries.shape[3]
        return (f"LAQPolicy(lookahead={n} queries, local_window={self.local_window}, "
                f"stage1_window={self.obs_window})")


class QueryRecorder(SnapKVPolicy):
    """LAQ's stage-1 policy (SnapKV) that, once ``recording``, keeps every layer's queries of the decode steps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.recording, self._layer = False, 0
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.seen_pos: list[torch.Tensor] = []

    def new_state(self, new):
        self._layer = new.layer_idx
        return super().new_state(new)

    def attend(self, q, c, *, q_pos, scaling):
        if self.recording:
            self.seen.setdefault(self._layer, []).append(q.detach())
            if self._layer == min(self.seen):
                self.seen_pos.append(q_pos.detach())
        return super().attend(q, c, q_pos=q_pos, scaling=scaling)

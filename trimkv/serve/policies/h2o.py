"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv 2306.14048): keep the tokens that received the most
attention so far, plus the most recent ones.

A token's state is the attention it has received, summed over every query that saw it (all prefill queries of
the chunks it was a candidate in, then every decode step) and over the query heads of its KV group; the
lowest total is evicted. The recent tokens are the cache's ``window`` (H2O splits the budget half heavy
hitters / half recent; here the window size is the harness's choice, the same for every policy).

Deviations: (1) GQA: the paper's models have one query head per KV head; the group's heads are summed.
(2) With chunked prefill a token is scored by the queries of the chunks it survived, not by the whole prompt
(the paper computes the prefill scores over the full prompt before evicting).
"""
from __future__ import annotations

from .base import AttentionPolicy


class H2OPolicy(AttentionPolicy):
    name = "h2o"

    def observe(self, state, weights, pos, q_len):
        state += weights.sum(dim=2)                 # [B, Hkv, G*q, S] -> [B, Hkv, S]

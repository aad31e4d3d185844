"""CAOTE (Goel et al., 2025, arXiv 2504.14051, "CAOTE: KV Caching through Attention Output Error based Token
Eviction"): evict the token whose removal changes the attention output least, attention weights and values together.

For one query with attention weights ``a`` over the kept tokens and output ``o = sum_i a_i v_i``, dropping token j
renormalises the others (``a_i / (1 - a_j)``), so the output becomes ``(o - a_j v_j) / (1 - a_j)`` and moves by

    e_j = || o - (o - a_j v_j) / (1 - a_j) || = a_j / (1 - a_j) * || o - v_j ||        (the paper's closed form)

The lowest ``e_j`` goes. CAOTE is a meta-heuristic: ``a`` are the scores of an attention-based base method, made a
distribution over the candidates (``a_j = s_j / sum_i s_i``, the paper's normalisation for accumulated scores) and
``o = sum_i a_i v_i`` is the matching pseudo-output. ``base``:

* ``"tova"`` (default): ``s`` is the latest query's attention (TOVA). With one query per KV head this is the paper's
  exact eviction error of the current query, derived for one token evicted per step, which is what a decode step of
  this cache does.
* ``"h2o"``: ``s`` is the attention summed over every query the token has seen (H2O), normalised as above.

A token's state is its base score; :meth:`scores` turns the candidates' states and values into ``e`` whenever the
cache evicts (every decode step, every prefill chunk), so values of the tokens kept *now* enter the output ``o``.

Deviations imposed by the cache: (1) GQA: the state is the base score averaged (TOVA) or summed (H2O) over the KV
group's query heads, and ``e`` is the closed form on that group attention (exact for one query head per KV head).
(2) Chunked prefill: a chunk is compacted with the scores of its own queries over [kept + chunk], block by block as
the paper's block-wise prompt processing (the TOVA base reads the chunk's last query). (3) Decode: the cache evicts
before the new token's attention, with the previous query's weights (as the TOVA policy does), and the newcomer
always enters. (4) The paper's FastCAOTE approximation is not implemented (the exact form costs one [N, D] reduction
per eviction here).
"""
from __future__ import annotations

import torch
from einops import rearrange

from .base import AttentionPolicy

BASES = ("tova", "h2o")


def caote_error(score: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """CAOTE's eviction error ``a_j / (1 - a_j) * ||o - v_j||`` [B, H, N] from base scores [B, H, N] (>= 0),
    values [B, H, N, D] and validity [B, H, N]; ``a`` is the score normalised over the valid candidates."""
    s = score.float().clamp_min(0.0) * valid
    a = s / s.sum(-1, keepdim=True).clamp_min(1e-30)                                  # [B, H, N], sums to 1
    v = values.float()
    o = (a.unsqueeze(-2) @ v)                                                         # [B, H, 1, D] pseudo-output
    return a / (1.0 - a).clamp_min(eps) * (v - o).norm(dim=-1)


class CAOTEPolicy(AttentionPolicy):
    name = "caote"

    def __init__(self, base: str = "tova"):
        if base not in BASES:
            raise ValueError(f"CAOTE base must be one of {BASES}, got {base!r}")
        self.base = base

    def observe(self, state, weights, pos, q_len):
        if self.base == "tova":
            w = rearrange(weights, "b h (g t) s -> b h g t s", t=q_len)
            state.copy_(w[:, :, :, -1].mean(dim=2))     # the latest query, averaged over the group: [B, Hkv, S]
        else:
            state += weights.sum(dim=2)                 # every query, summed over queries and group

    def scores(self, c):
        return caote_error(c.state, c.values, c.pos >= 0)

    def __repr__(self) -> str:
        return f"CAOTEPolicy(base={self.base!r})"

"""OBCache, Optimal Brain Cache (Gu et al., 2025, arXiv 2510.07651, "OBCache: Optimal Brain KV Cache Pruning for
Efficient Long-Context LLM Inference"): rank tokens by the Optimal-Brain-Damage saliency of pruning them on the
attention output, instead of by the attention they receive.

For query i with logits ``z_ij = q_i . k_j * scale``, weights ``A_ij`` and output ``o_i = sum_j A_ij v_j``:

* pruning the value ``v_j`` (set to 0) moves ``o_i`` by ``-A_ij v_j``:  saliency ``A_ij^2 ||v_j||^2``  (``"v"``);
* pruning the key ``k_j`` (logit ``z_ij`` -> 0), to first order ``-z_ij A_ij (v_j - o_i)``:
  saliency ``A_ij^2 z_ij^2 ||v_j - o_i||^2``  (``"k"``);
* pruning the pair, ``-A_ij (v_j + z_ij (v_j - o_i))``: saliency ``A_ij^2 ||(1 + z_ij) v_j - z_ij o_i||^2``, the
  two above plus the cross term ``2 A_ij^2 z_ij (||v_j||^2 - v_j . o_i)``  (``"kv"``, the default: evicting a token
  removes both its key and its value).

Summed over queries, the saliency replaces the accumulated attention of the base heuristic; the lowest goes. The
paper plugs the scores into H2O, TOVA and SnapKV and names no single default (the examples of its code use the value
score in one release, the key score in another); this policy is the H2O form of its reference code: a token's state
accumulates its saliency over the last ``obs_window`` queries of every prefill chunk it is a candidate in (the
reference's perturbation window, 16 = its recent window) and over every decode query. ``obs_window=None`` takes
every query.

Deviations: (1) GQA: the reference repeats K/V per query head; here a KV head's tokens sum the saliency over the
group's query heads (one selection per KV head, as the cache stores it). (2) Chunked prefill: the window is the last
queries of each chunk, and a chunk is compacted with the saliency accumulated so far (the reference prunes once after
the whole prompt). (3) The reference's SnapKV / TOVA forms (pooling, latest query only) are not offered.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..slot_attention import slot_attention
from .base import AttentionPolicy

SCORES = ("kv", "k", "v")


def obd_saliency(weights: torch.Tensor, logits: torch.Tensor, out: torch.Tensor, values: torch.Tensor,
                 score: str = "kv") -> torch.Tensor:
    """Per (query row, key) OBD saliency [B, H, R, S] from weights / logits [B, H, R, S] (masked keys: weight 0),
    attention outputs [B, H, R, D] and values [B, H, S, D] (H = KV heads, rows = query heads x queries)."""
    a2 = weights.float().square()
    v = values.float()
    vv = v.square().sum(-1).unsqueeze(-2)                                       # ||v_j||^2     [B, H, 1, S]
    if score == "v":
        return a2 * vv
    o = out.float()
    z = logits.float()                                                          # finite everywhere (no mask)
    vo = o @ v.transpose(-1, -2)                                                # v_j . o_i     [B, H, R, S]
    oo = o.square().sum(-1, keepdim=True)                                       # ||o_i||^2     [B, H, R, 1]
    if score == "k":
        return a2 * z.square() * (vv - 2.0 * vo + oo)
    return a2 * ((1.0 + z).square() * vv - 2.0 * z * (1.0 + z) * vo + z.square() * oo)


class OBCachePolicy(AttentionPolicy):
    name = "obcache"

    def __init__(self, score: str = "kv", obs_window: int | None = 16):
        if score not in SCORES:
            raise ValueError(f"OBCache score must be one of {SCORES} (key + value, key, value), got {score!r}")
        if obs_window is not None and obs_window < 1:
            raise ValueError(f"OBCache obs_window must be >= 1 query (or None: every query), got {obs_window}")
        self.score, self.obs_window = score, obs_window

    def attend(self, q, c, *, q_pos, scaling):
        out, weights = slot_attention(q, c.keys, c.values, q_pos=q_pos, k_pos=c.pos, k_valid=c.pos >= 0,
                                      scaling=scaling, return_weights=True)
        B, H, T, D = q.shape
        Hkv = c.keys.shape[1]
        logits = (q.reshape(B, Hkv, -1, D).float() @ c.keys.float().transpose(-1, -2)) * scaling   # [B, Hkv, G*T, S]
        sal = obd_saliency(weights, logits, out.reshape(B, Hkv, -1, out.shape[-1]), c.values, self.score)
        sal = rearrange(sal, "b h (g t) s -> b h g t s", t=T)
        if self.obs_window is not None:
            sal = sal[:, :, :, -self.obs_window:]
        c.state += sal.sum(dim=(2, 3))                                           # [B, Hkv, S]
        return out

    def __repr__(self) -> str:
        return f"OBCachePolicy(score={self.score!r}, obs_window={self.obs_window})"

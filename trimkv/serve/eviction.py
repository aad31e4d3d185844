"""The mechanics of eviction, shared by every policy: protection, writing a victim's slot, keeping the top-k.

Each (batch row, KV head) of a layer owns ``C`` slots; a slot holds one token's key/value, its position ``pos``
(int64, -1 = empty, -2 = disabled) and one fp32 ``state`` value of the policy (log beta for TRIM-KV). A policy scores
the tokens (:mod:`trimkv.serve.policies`); here the scores become decisions:

* **protection**: sink tokens (``pos < sink``) and the recent window (``pos > t - window``) score +inf (always
  kept); empty slots score -inf (filled first); disabled slots score +inf (never a victim, never filled: with
  per-head budgets a head of budget ``b < C`` owns only its slots ``0 .. b-1``, the rest are disabled, so every
  buffer keeps one static shape);
* **decode** (one new token): the newcomer always enters and overwrites the lowest-scoring slot, in place (slot
  order does not matter for attention: RoPE is already applied to the stored keys);
* **prefill chunk**: of [kept slots + chunk], the best ``C`` are written back into the slots (with per-head
  budgets: the best ``b`` of each head, in score order, into its enabled slots ``0 .. b-1``).

Everything is vectorised over batch x heads; there is no Python loop over heads or layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
EMPTY = -1        # pos of a slot that holds no token yet (filled first, attention ignores it)
DISABLED = -2     # pos of a slot its head does not own (per-head budgets): never filled, never a victim


@dataclass
class Candidates:
    """Tokens a policy scores or attends over: a layer's slots, [slots + prefill chunk], or one newcomer."""

    keys: torch.Tensor          # [B, H, N, D]
    values: torch.Tensor        # [B, H, N, D]
    pos: torch.Tensor           # [B, H, N] int64, -1 = empty
    state: torch.Tensor         # [B, H, N] fp32 the policy's per-token state (updated in place by observe)
    t_now: torch.Tensor         # [B] latest position seen per row


def per_row(t_now: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t_now [B] shaped to broadcast over ``like`` [B, ...]."""
    return t_now.view(-1, *([1] * (like.dim() - 1)))


def protect(score: torch.Tensor, pos: torch.Tensor, t_now: torch.Tensor, *, sink: int = 0,
            window: int = 0) -> torch.Tensor:
    """Apply sink / window protection (+inf), empty slots (-inf) and disabled slots (+inf: a decode step never picks
    one as its victim) to any policy's raw scores [B, ...]."""
    t = per_row(t_now, pos)
    score = score.masked_fill(pos < sink, float("inf"))        # sink tokens, and every slot without a token (pos < 0)
    if window > 0:
        score = score.masked_fill(pos > t - window, float("inf"))
    return score.masked_fill(pos == EMPTY, NEG_INF)            # empty slots go first; disabled ones stay +inf


def write_slots_(slots: Candidates, victim: torch.Tensor, new: Candidates) -> None:
    """Write one newcomer per (row, head) into slot ``victim`` [B, H, 1] of ``slots``, in place (cast to the buffers'
    dtypes). ``slots``: keys/values [B, H, C, D], pos/state [B, H, C] (contiguous); ``new``: N = 1.

    An ``index_copy_`` of B*H rows into the flattened buffers: under ``torch.compile`` a ``scatter_`` into a graph
    input copies the whole buffer every step (inductor), an ``index_copy_`` writes the rows in place."""
    B, H, C = slots.pos.shape
    flat = (torch.arange(B * H, device=victim.device).view(B, H, 1) * C + victim).view(-1)   # [B*H] flat slot
    slots.keys.view(B * H * C, -1).index_copy_(0, flat, new.keys.reshape(B * H, -1).to(slots.keys.dtype))
    slots.values.view(B * H * C, -1).index_copy_(0, flat, new.values.reshape(B * H, -1).to(slots.values.dtype))
    slots.pos.view(-1).index_copy_(0, flat, new.pos.reshape(-1).to(slots.pos.dtype))
    slots.state.view(-1).index_copy_(0, flat, new.state.reshape(-1).to(slots.state.dtype))


def keep_topk_(slots: Candidates, cands: Candidates, score: torch.Tensor,
               disabled: torch.Tensor | None = None) -> None:
    """Keep the best C of N candidates by ``score`` [B, H, N] (already protected) in the slot buffers.

    ``disabled`` [H, C] bool (per-head budgets; slot ``c`` of head ``h`` disabled iff ``c >= b_h``): the candidates
    are ranked (disabled ones last) and head ``h`` keeps its best ``b_h`` in slots ``0 .. b_h-1``; its other slots
    stay disabled."""
    C, D = slots.keys.shape[2], slots.keys.shape[3]
    if disabled is not None:
        score = score.masked_fill(cands.pos <= DISABLED, NEG_INF)
    top_score, top = score.topk(C, dim=-1, sorted=disabled is not None)            # [B, H, C]
    slots.keys.copy_(cands.keys.gather(2, top[..., None].expand(-1, -1, -1, D)))
    slots.values.copy_(cands.values.gather(2, top[..., None].expand(-1, -1, -1, slots.values.shape[3])))
    pos = cands.pos.gather(2, top).masked_fill(top_score == NEG_INF, EMPTY)
    slots.pos.copy_(pos if disabled is None else pos.masked_fill(disabled, DISABLED))
    slots.state.copy_(cands.state.gather(2, top))

"""What an eviction policy is: a small object that says what it reads and how a kept token scores (higher = keep).

A cache layer (:mod:`trimkv.serve.cache`, :mod:`trimkv.serve.pool`) owns the slot buffers and asks its policy, and
only its policy, at these moments:

==================  ================================================================================================
``new_state(new)``  tokens enter: one fp32 value per token, kept in the slot beside its key (log beta for TRIM-KV,
                    ``-||k||`` for K-norm, 0 for policies that learn from attention later)
``attend(q, c)``    the attention over the candidates ``c``; plain by default, :class:`AttentionPolicy` (H2O, TOVA,
                    SnapKV) reads the weights there and updates the candidates' state (``observe``)
``scores(c)``       raw keep-scores [B, H, N] of candidates (the layer adds sink / window protection)
``evict_one_``      a decode step: the newcomer enters, the lowest-scoring slot goes (TRIM-KV fuses it into one
                    Triton kernel on CUDA)
``pool_scores``     scores comparable across layers and heads, for the global pool (only policies that have them)
==================  ================================================================================================

No caller tests a policy's name: what differs between methods is in these methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import CacheError
from ..eviction import Candidates, protect, write_slots_
from ..slot_attention import slot_attention


@dataclass
class NewTokens:
    """The tokens entering a cache layer in one forward."""

    keys: torch.Tensor          # [B, H, T, D] post-RoPE
    values: torch.Tensor        # [B, H, T, D]
    pos: torch.Tensor           # [B, H, T] int64 positions, -1 = padding
    inputs: Any = None          # trimkv.attach.LayerInputs of the forward (None when a test drives the layer)
    layer_idx: int = 0

    def log_beta(self) -> torch.Tensor:
        """fp32 log beta [B, H, T] from the gates (runs the gate; CacheError when there are none)."""
        if self.inputs is None:
            raise CacheError("no gate output for these tokens: the cache layer was fed without trimkv's hooks")
        return self.inputs.log_beta(self.keys, self.values).float()


class EvictionPolicy:
    """Base class: keeps the most recent tokens' state at 0 and scores by state. Subclasses override what differs."""

    name = "base"
    uses_gates = False        # reads the gates' log beta: the cache runs the gated model (and its LoRA adapters)

    @classmethod
    def for_prompt(cls, **context: Any) -> "EvictionPolicy":
        """The policy for one prompt of an evaluation. ``context`` holds what the harness knows (``seed``, ``sample``,
        ``prompt``, ``tokenizer``, ``lookahead``, ``prefill_chunk``, the ``model`` and the cache's ``budget``, ``sink``
        and ``window``); most policies need none of it (LAQ decodes its pseudo lookahead tokens with it)."""
        return cls()

    def new_state(self, new: NewTokens) -> torch.Tensor:
        """State [B, H, T] fp32 of the entering tokens."""
        return torch.zeros(new.pos.shape, dtype=torch.float32, device=new.pos.device)

    def scores(self, c: Candidates) -> torch.Tensor:
        """Raw keep-scores [B, H, N] (protection is applied by the cache). Default: the state is the score."""
        return c.state

    def pool_scores(self, pos: torch.Tensor, state: torch.Tensor, t_now: torch.Tensor) -> torch.Tensor:
        """Keep-scores [B, N] of a global pool's tokens (every layer and head together)."""
        raise CacheError(f"policy {self!r} scores tokens per (layer, KV head); the global pool needs scores that compare "
                         "across layers and heads (TRIM-KV's retention): use the per-head cache (scope='head')")

    def attend(self, q: torch.Tensor, c: Candidates, *, q_pos: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of q [B, Hq, T, D] (positions q_pos [B, T]) over the candidates -> [B, Hq, T, D]."""
        return slot_attention(q, c.keys, c.values, q_pos=q_pos, k_pos=c.pos, k_valid=c.pos >= 0, scaling=scaling)

    def evict_one_(self, slots: Candidates, new: Candidates, *, sink: int, window: int) -> None:
        """Decode step, in place: each (row, head) writes its one newcomer (``new``: N = 1) over its lowest-scoring
        slot (an empty slot scores lowest). ``slots`` are the layer's buffers."""
        score = protect(self.scores(slots), slots.pos, slots.t_now, sink=sink, window=window)
        write_slots_(slots, score.argmin(dim=-1, keepdim=True), new)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AttentionPolicy(EvictionPolicy):
    """A policy that learns from the attention weights its tokens receive (H2O, TOVA, SnapKV): the attention is
    computed with explicit weights, which :meth:`observe` folds into the candidates' state."""

    def attend(self, q, c, *, q_pos, scaling):
        out, weights = slot_attention(q, c.keys, c.values, q_pos=q_pos, k_pos=c.pos, k_valid=c.pos >= 0,
                                      scaling=scaling, return_weights=True)
        self.observe(c.state, weights, c.pos, q.shape[2])
        return out

    def observe(self, state: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor, q_len: int) -> None:
        """Update ``state`` [B, H, S] in place from attention ``weights`` [B, H, G*q_len, S] (query heads folded,
        rows ordered (group head, query))."""
        raise NotImplementedError

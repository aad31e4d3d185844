"""The memory-bounded KV cache: ``budget`` tokens per (layer, batch row, KV head), in fixed slot buffers.

Every layer allocates its buffers once, on its first forward, where that layer runs, and reuses them in place:

    keys, values  [B, Hkv, C, D]      model dtype
    pos           [B, Hkv, C] int64   token position, -1 = empty slot, -2 = disabled slot
    state         [B, Hkv, C] fp32    the policy's per-token value (log beta for TRIM-KV)

**Per-head budgets** (``head_budgets`` [L, Hkv], e.g. an LU-KV allocation, :mod:`trimkv.serve.budgets`): head ``h`` of
layer ``l`` keeps ``b[l, h]`` tokens. Layer ``l`` allocates ``C = max_h b[l, h]`` slots per head and disables the
slots ``b[l, h] .. C-1`` of head ``h`` (position -2: never filled, never a victim, ignored by attention), so every
buffer keeps a static shape (batches, the compiled decoder) and a prefill chunk keeps each head's best ``b[l, h]``.
The budgeted KV memory (:meth:`RetentionCache.budget_nbytes`) is that of the uniform cache at the same mean budget;
the allocated buffers (:meth:`RetentionCache.nbytes`) add the disabled slots (padding).

A forward reaches a layer through one call (the :class:`~trimkv.attach.CacheLayer` protocol; the attention
implementation ``"trimkv"`` makes it): ``attend(q, k, v)`` = :meth:`BoundedLayer.insert` (the new tokens enter) ->
the policy's attention over the candidates -> :meth:`BoundedLayer.compact`. A decode step (one token per row)
evicts as it inserts: the newcomer overwrites the lowest-scoring slot (the policy's ``evict_one_``). A prefill chunk
attends over [kept slots + chunk], then the best ``budget`` of them are kept, so peak memory is O(budget + chunk).

``get_seq_length()`` is the logical number of tokens seen, which is what ``generate`` uses for positions; the count
lives in a tensor (``tokens_seen``) so that a compiled decode step (:mod:`trimkv.serve.decode`) never changes
Python state. Build a cache with :func:`trimkv.serve.make_cache` (which also installs trimkv's hooks on the model).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attach import CacheLayer, LayerInputs
from ..errors import CacheError
from .eviction import DISABLED, EMPTY, Candidates, keep_topk_, protect
from .policies import EvictionPolicy, NewTokens, RetentionPolicy


def check_tokens(name: str, value, minimum: int = 0) -> int:
    """A token count given by a caller: an int >= ``minimum``, else CacheError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheError(f"{name} must be an integer (tokens), got {value!r}")
    if value < minimum:
        raise CacheError(f"{name} must be >= {minimum}, got {value}")
    return value


class BoundedLayer(CacheLayerMixin, CacheLayer):
    """Base of the memory-bounded cache layers (per-head slots here, the global pool in :mod:`.pool`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: EvictionPolicy, layer_idx: int = 0):
        super().__init__()
        self.policy, self.layer_idx = policy, layer_idx
        self.tokens_seen: torch.Tensor | None = None   # 0-d int64 on the cache's device, counted in place
        self._staged: LayerInputs | None = None

    def stage(self, inputs: LayerInputs) -> None:
        self._staged = inputs

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Called by transformers before the attention: counts the new tokens and hands them on unchanged (the
        cache is filled by :meth:`attend`, which needs the query too)."""
        if self._staged is None:
            raise CacheError(
                f"{type(self).__name__}.update() without trimkv's hooks on the model: a bounded cache works only "
                "through trimkv's attention. Build it with trimkv.make_cache(model, ...), or call "
                "trimkv.install_hooks(model) (trimkv.load_gates does it too)")
        if self.tokens_seen is None:
            self.tokens_seen = torch.zeros((), dtype=torch.long, device=key_states.device)
        self.tokens_seen.add_(key_states.shape[2])     # in place: a compiled step counts without recompiling
        return key_states, value_states

    @property
    def seen(self) -> int:
        """Tokens seen so far (a host copy of ``tokens_seen``: one device sync)."""
        return 0 if self.tokens_seen is None else int(self.tokens_seen)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float) -> torch.Tensor:
        """q [B, H, T, D], the new k/v [B, Hkv, T, D] -> attention output [B, H, T, D]."""
        q_pos = self._staged.pos
        cands = self.insert(k, v)
        out = self.policy.attend(q, cands, q_pos=q_pos, scaling=scaling)
        self.compact()
        return out

    def _new_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[Candidates, torch.Tensor | None]:
        """The new tokens as candidates (positions -1 where padding, the policy's state) and their validity [B, T]
        | None, from what :meth:`stage` was given."""
        B, H, T, _ = k.shape
        inputs, self._staged = self._staged, None
        if inputs is None:
            inputs = LayerInputs(pos=(torch.arange(T, device=k.device) + (self.tokens_seen - T)).expand(B, T))
        pos = inputs.pos[:, None, :].expand(B, H, T)
        if inputs.valid is not None:
            pos = pos.masked_fill(~inputs.valid[:, None, :], -1)
        state = self.policy.new_state(NewTokens(k, v, pos, inputs, self.layer_idx))
        return Candidates(k, v, pos, state, None), inputs.valid

    def insert(self, k: torch.Tensor, v: torch.Tensor) -> Candidates:
        """The new tokens enter; returns the candidates to attend over (kept + new)."""
        raise NotImplementedError

    def compact(self) -> None:
        """After the attention: cut what :meth:`insert` left above the budget back to it."""

    def kept_positions(self) -> torch.Tensor:
        """[B, Hkv, S] positions of the tokens this layer keeps (negative = no token: empty or disabled slot)."""
        raise NotImplementedError

    def budget_nbytes(self) -> int:
        """Bytes of the slots this layer's budget pays for (without padding); the buffers' bytes by default."""
        return self.nbytes()

    def reset(self) -> None:
        if self.tokens_seen is not None:
            self.tokens_seen.zero_()
        self._staged = None

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:   # the name of get_max_length up to transformers 5.16
        return -1


class RetentionLayer(BoundedLayer):
    """One decoder layer's bounded cache: ``budget`` slots per (row, KV head), or ``head_budgets[h]`` tokens for KV
    head ``h`` in ``max(head_budgets)`` slots (see the module docstring)."""

    def __init__(self, budget: int, *, sink: int = 0, window: int = 0, policy: EvictionPolicy | None = None,
                 layer_idx: int = 0, head_budgets: list[int] | None = None):
        super().__init__(policy or RetentionPolicy(), layer_idx)
        self.head_budgets = None if head_budgets is None else [int(b) for b in head_budgets]
        self.budget = budget if self.head_budgets is None else max(self.head_budgets)   # slots per head (C)
        self.sink, self.window = sink, window
        self._pending: Candidates | None = None   # a chunk's [slots + chunk] candidates, compacted after attention
        self.pos: torch.Tensor | None = None
        self.state: torch.Tensor | None = None
        self.disabled: torch.Tensor | None = None  # [Hkv, C] bool, the slots a head does not own (None: uniform)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.head_budgets is not None:
            if len(self.head_budgets) != H:
                raise CacheError(f"layer {self.layer_idx}: head_budgets has {len(self.head_budgets)} KV heads, the "
                                 f"model has {H}: an allocation made for another model?")
            hb = torch.tensor(self.head_budgets, device=self.device)
            self.disabled = torch.arange(self.budget, device=self.device) >= hb[:, None]          # [H, C]
        self.keys = torch.zeros(B, H, self.budget, D, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(B, H, self.budget, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.pos = torch.full((B, H, self.budget), EMPTY, dtype=torch.long, device=self.device)
        if self.disabled is not None:
            self.pos.masked_fill_(self.disabled, DISABLED)
        self.state = torch.zeros(B, H, self.budget, dtype=torch.float32, device=self.device)
        self.t_now = torch.full((B,), -1, dtype=torch.long, device=self.device)   # latest position seen per row
        self.is_initialized = True

    @property
    def slots(self) -> Candidates:
        """The slot buffers themselves (writes to these tensors change the cache)."""
        return Candidates(self.keys, self.values, self.pos, self.state, self.t_now)

    def insert(self, key_states: torch.Tensor, value_states: torch.Tensor) -> Candidates:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0] or key_states.shape[1] != self.keys.shape[1]:
            raise CacheError(f"this cache holds {self.keys.shape[0]} sequence(s) x {self.keys.shape[1]} KV heads (it was "
                             f"allocated for batch {self.keys.shape[0]}, the input has {key_states.shape[0]} rows x "
                             f"{key_states.shape[1]} KV heads): a RetentionCache holds one batch of sequences; build a "
                             "new cache for another batch size")
        self.compact()  # a chunk left pending by a caller that skipped compact()
        new, valid = self._new_tokens(key_states, value_states)                       # [B, H, T] each
        new.t_now = self.t_now.copy_(torch.maximum(self.t_now, new.pos.amax(dim=(1, 2))))  # [B], in place
        if key_states.shape[2] == 1 and (valid is None or bool(valid.all())):   # the hooks pass None: no host sync
            self.policy.evict_one_(self.slots, new, sink=self.sink, window=self.window)
            return self.slots
        self._pending = Candidates(torch.cat([self.keys, new.keys.to(self.dtype)], dim=2),
                                   torch.cat([self.values, new.values.to(self.dtype)], dim=2),
                                   torch.cat([self.pos, new.pos], dim=2), torch.cat([self.state, new.state], dim=2),
                                   new.t_now)
        return self._pending

    def compact(self) -> None:
        """Keep the best ``budget`` tokens of a pending chunk's [slots + chunk] candidates."""
        cands, self._pending = self._pending, None
        if cands is None:
            return
        score = protect(self.policy.scores(cands), cands.pos, cands.t_now, sink=self.sink, window=self.window)
        keep_topk_(self.slots, cands, score, self.disabled)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.budget + query_length, 0

    def kept_positions(self) -> torch.Tensor:
        return self.pos

    def num_kept(self) -> torch.Tensor:
        """[B, Hkv] number of occupied slots."""
        return (self.pos >= 0).sum(-1) if self.pos is not None else torch.zeros(0)

    def nbytes(self) -> int:
        """Bytes of the allocated buffers (K, V, pos, state), disabled slots included."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.state))

    def budget_nbytes(self) -> int:
        """Bytes of the slots the heads own: ``B * sum_h b_h`` slots of K, V, pos and state (= nbytes when
        uniform)."""
        if not self.is_initialized or self.head_budgets is None:
            return self.nbytes()
        B, H, C = self.pos.shape
        return self.nbytes() * sum(self.head_budgets) // (H * C)

    def reset(self) -> None:
        """Forget every token: the next forward starts a new sequence of the same batch size, in the same buffers
        (their addresses stay, so a compiled decode step still fits; for another batch size, make a new cache)."""
        super().reset()
        if self.is_initialized:
            self.keys.zero_(), self.values.zero_(), self.pos.fill_(EMPTY), self.state.zero_(), self.t_now.fill_(-1)
            if self.disabled is not None:
                self.pos.masked_fill_(self.disabled, DISABLED)
        self._pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "pos", "state", "t_now"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))


class BoundedCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`BoundedLayer` s, all with one policy. Subclasses:
    :class:`RetentionCache` (a budget per head), :class:`~trimkv.serve.pool.GlobalRetentionCache` (one pool).

    The cache knows its sequence: the hooks note the token ids of every eager forward (:meth:`note_input_ids`), and
    ``model.generate`` checks at every step that they are the start of the sequence it continues
    (:meth:`check_prompt`), so a cache reused for another prompt is refused instead of continued."""

    policy: EvictionPolicy
    _ids: torch.Tensor | None = None     # [B, N] the token ids fed so far (None: none, or a forward without ids)
    _ids_complete: bool = True           # False once a forward came without ids (embeddings, a compiled step)

    def note_input_ids(self, ids: torch.Tensor | None) -> None:
        """Record the ids [B, T] of one forward (called by trimkv's decoder pre-hook)."""
        if ids is None or (self._ids is not None and self._ids.shape[0] != ids.shape[0]):
            self._ids_complete = False      # embeddings, or another batch size (the layers refuse that one)
            return
        self._ids = ids.detach() if self._ids is None else torch.cat([self._ids, ids.detach().to(self._ids.device)], 1)

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Refuse to continue a sequence this cache does not hold the start of: ``input_ids`` [B, T] must begin with
        every token the cache has seen."""
        seen = self.get_seq_length()
        if not seen:
            return
        held = self._ids
        fix = "pass a fresh cache (trimkv.make_cache) or call cache.reset() before generating another sequence"
        if held is None or not self._ids_complete or held.shape[1] != seen:
            raise CacheError(f"this cache holds {seen} tokens whose ids it did not see (filled by a compiled decoder or "
                             f"from embeddings), so it cannot tell whether this prompt continues them: {fix}")
        if input_ids.shape[0] != held.shape[0] or input_ids.shape[1] < seen or \
                not torch.equal(input_ids[:, :seen].to(held.device), held):
            raise CacheError(f"this cache already holds {seen} tokens of another sequence, and model.generate would "
                             f"continue from them as if they were the start of this prompt: {fix}")

    def reset(self) -> None:
        super().reset()
        self._ids, self._ids_complete = None, True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_ids(beam_idx)

    def _reorder_ids(self, beam_idx: torch.LongTensor) -> None:
        if self._ids is not None:
            self._ids = self._ids.index_select(0, beam_idx.to(self._ids.device))

    @property
    def uses_gates(self) -> bool:
        """Whether the model runs with its gates (and LoRA adapters) on: the policy reads them."""
        return self.policy.uses_gates

    def nbytes(self) -> int:
        """Bytes of K, V and slot metadata the cache has allocated (padding of per-head budgets included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def budget_nbytes(self) -> int:
        """Bytes of K, V and slot metadata the budget pays for: equal for every allocation of the same mean budget
        (per-head budgets leave their padding out)."""
        return sum(layer.budget_nbytes() for layer in self.layers)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(f"a {type(self).__name__} cannot be cropped (evicted tokens are gone)")


class RetentionCache(BoundedCache):
    """Memory-bounded cache: ``budget`` tokens per (layer, batch row, KV head), the policy choosing the victims
    (default: TRIM-KV retention). ``sink`` first tokens and the ``window`` most recent tokens are always kept and
    count toward the budget. One policy object is shared by all layers.

    ``head_budgets`` [L][Hkv] ints: a budget per (layer, KV head) instead, summing to ``budget * L * Hkv`` (the
    same total as the uniform cache), each above ``sink + window``; see the module docstring."""

    def __init__(self, budget: int, num_layers: int, *, sink: int = 0, window: int = 0,
                 policy: EvictionPolicy | None = None, head_budgets=None):
        check_tokens("budget", budget, 1)
        check_tokens("num_layers", num_layers, 1)
        check_tokens("sink", sink)
        check_tokens("window", window)
        if budget <= sink + window:
            raise CacheError(
                f"budget={budget} leaves no room for eviction: it must exceed sink + window = {sink} + {window}; "
                "raise the budget or shrink the sink/window"
            )
        self.policy = policy or RetentionPolicy()
        rows = None if head_budgets is None else check_head_budgets(head_budgets, budget, num_layers, sink, window)
        layers = [RetentionLayer(budget, sink=sink, window=window, policy=self.policy, layer_idx=i,
                                 head_budgets=None if rows is None else rows[i]) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.budget, self.sink, self.window = budget, sink, window
        self.head_budgets = rows      # [L][Hkv] ints, or None (uniform)


def check_head_budgets(head_budgets, budget: int, num_layers: int, sink: int, window: int) -> list[list[int]]:
    """``head_budgets`` (a [L, Hkv] tensor or nested lists of ints) as lists, or a CacheError naming the problem:
    the shape, a non-integer, a head at or below ``sink + window`` (no room to evict), a total other than
    ``budget * L * Hkv``."""
    rows = head_budgets.tolist() if torch.is_tensor(head_budgets) else head_budgets
    try:
        rows = [list(r) for r in rows]
    except TypeError:
        raise CacheError(f"head_budgets must be [layers][KV heads] token counts, got {head_budgets!r:.80}") from None
    if len(rows) != num_layers or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise CacheError(f"head_budgets must have one row of KV-head budgets per layer ({num_layers}), all of one "
                         f"length; got {len(rows)} rows of lengths {sorted({len(r) for r in rows})}")
    for layer, r in enumerate(rows):
        for head, b in enumerate(r):
            if isinstance(b, bool) or not isinstance(b, int):
                raise CacheError(f"head_budgets[{layer}][{head}] = {b!r} is not an integer token count")
            if b <= sink + window:
                raise CacheError(f"head_budgets[{layer}][{head}] = {b} leaves no room for eviction beside sink + window "
                                 f"= {sink} + {window}: every head needs at least {sink + window + 1} (scale an "
                                 "allocation with trimkv.serve.budgets.scale_shares, which keeps that floor)")
    total, uniform = sum(map(sum, rows)), budget * num_layers * len(rows[0])
    if total != uniform:
        raise CacheError(f"head_budgets sum to {total} tokens, the uniform cache of budget {budget} holds {uniform} "
                         f"({num_layers} layers x {len(rows[0])} KV heads x {budget}): an allocation must keep the total")
    return rows

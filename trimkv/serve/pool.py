"""A KV cache with ONE pool of slots shared by all layers and KV heads (per batch row), with a per-head floor.

Heads and layers compete for a single pool, so heads whose tokens retain well keep more of them (the follow-up
paper's global calibration; the official "dynamic budget" cache, here with batch > 1). Memory is really bounded:
one pool of ``budget`` slots per batch row is allocated once and reused in place,

    keys, values  [B, P, D]         model dtype      (P = budget, summed over layers and KV heads)
    pos           [B, P] int64      token position, -1 = empty slot
    state         [B, P] fp32       the policy's per-token value (log retention for TRIM-KV)
    owner         [B, P] int64      layer * Hkv + head that owns the slot, -1 = empty
    count         [B, L * Hkv]      tokens held by each (layer, head)

A slot scores what its policy's ``pool_scores`` says, with sink / recent window protected: TRIM-KV's retention
``(t - pos) * log beta`` (and the look-ahead score), whose values compare across layers. Decode: the new
token of every (layer, head) enters; when the pool is full, the victims are the globally lowest-scoring tokens
among all layers' heads that hold more than ``floor`` tokens (one argmin over the pool per victim). Prefill chunks:
[pool + chunk] is cut back to the best ``P`` tokens after protecting each head's best ``floor`` tokens.

Attention for layer l gathers that layer's tokens into [B, Hkv, S_l, D] (S_l = the layer's largest head count)
and appends the new tokens: a transient copy of one layer's kept tokens, never a full-length buffer. Cost per
decode step is O(L * Hkv * P) integer work for the slot tables (a paged kernel reading the pool through the slot
table directly would remove the gather; not done).

The layers are :class:`~trimkv.serve.cache.BoundedLayer` s, so the attention reaches them through the same one call
(``attend``); protection is :mod:`trimkv.serve.eviction`'s. Policies without scores that compare across layers and
heads are refused. The pool lives on one device: a model split over devices (``device_map``) needs
:class:`~trimkv.serve.cache.RetentionCache`, whose layers allocate where their layer runs.
"""
from __future__ import annotations

import torch

from ..errors import CacheError
from .cache import BoundedCache, BoundedLayer, check_tokens
from .eviction import Candidates, protect
from .policies import EvictionPolicy, RetentionPolicy

INF = float("inf")


class GlobalPool:
    """The shared slot pool (see module docstring); all tensors are allocated on the first update."""

    def __init__(self, slots: int, num_layers: int, num_kv_heads: int, *, floor: int, sink: int, window: int,
                 policy: EvictionPolicy):
        self.P, self.L, self.Hkv = slots, num_layers, num_kv_heads
        self.floor, self.sink, self.window, self.policy = floor, sink, window, policy
        self.keys = self.values = self.pos = self.state = self.owner = self.count = self.t_now = None

    @property
    def ready(self) -> bool:
        return self.keys is not None

    def allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, dev = k.shape[0], k.device
        self.keys = torch.zeros(B, self.P, k.shape[-1], dtype=k.dtype, device=dev)
        self.values = torch.zeros(B, self.P, v.shape[-1], dtype=v.dtype, device=dev)
        self.pos = torch.full((B, self.P), -1, dtype=torch.long, device=dev)
        self.state = torch.zeros(B, self.P, dtype=torch.float32, device=dev)
        self.owner = torch.full((B, self.P), -1, dtype=torch.long, device=dev)
        self.count = torch.zeros(B, self.L * self.Hkv, dtype=torch.long, device=dev)
        self.t_now = torch.full((B,), -1, dtype=torch.long, device=dev)

    def nbytes(self) -> int:
        if not self.ready:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.state, self.owner))

    # ------------------------------------------------------------------------------------------- scoring
    def _scores(self, pos: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """[B, N] keep-scores: the policy's pool scores with sink / window protection, empty -> -inf."""
        return protect(self.policy.pool_scores(pos, state, self.t_now), pos, self.t_now, sink=self.sink,
                       window=self.window)

    # ------------------------------------------------------------------------------------------- reading
    def gather(self, layer: int):
        """Layer ``layer``'s kept tokens: keys/values [B, Hkv, S, D], pos and state [B, Hkv, S] (pos -1 = padding
        slot)."""
        B, P, Hkv = self.owner.shape[0], self.P, self.Hkv
        heads = layer * Hkv + torch.arange(Hkv, device=self.owner.device)
        mine = self.owner[:, None, :] == heads[None, :, None]                        # [B, Hkv, P]
        counts = self.count[:, layer * Hkv:(layer + 1) * Hkv]                         # [B, Hkv]
        S = int(counts.max())
        rank = torch.where(mine, mine.cumsum(-1) - 1, S)                              # S = dump column
        idx = torch.zeros(B, Hkv, S + 1, dtype=torch.long, device=mine.device)
        idx.scatter_(2, rank, torch.arange(P, device=mine.device).expand(B, Hkv, P))
        idx = idx[..., :S].reshape(B, Hkv * S)                                        # [B, Hkv*S]
        live = torch.arange(S, device=mine.device)[None, None, :] < counts[..., None]  # [B, Hkv, S]
        k = self.keys.gather(1, idx[..., None].expand(-1, -1, self.keys.shape[-1])).view(B, Hkv, S, self.keys.shape[-1])
        v = self.values.gather(1, idx[..., None].expand(-1, -1, self.values.shape[-1])).view(B, Hkv, S, self.values.shape[-1])
        pos = self.pos.gather(1, idx).view(B, Hkv, S).masked_fill(~live, -1)
        return k, v, pos, self.state.gather(1, idx).view(B, Hkv, S)

    # ------------------------------------------------------------------------------------------- writing
    def insert_one(self, layer: int, k, v, pos_new, state_new) -> None:
        """Decode: one new token per (row, head) of ``layer``: k/v [B, Hkv, 1, D], pos/state [B, Hkv, 1]."""
        B, Hkv = k.shape[:2]
        heads = layer * Hkv + torch.arange(Hkv, device=k.device)
        new = pos_new[..., 0] >= 0                                                    # [B, Hkv]
        self.count[:, heads] += new.long()          # count newcomers first: floors hold after insertion
        need = new.sum(1) - (self.owner < 0).sum(1)                                   # [B] victims needed
        rows = torch.arange(B, device=k.device)
        for it in range(int(need.max().clamp_min(0))):
            active = need > it                                                        # [B]
            score = self._scores(self.pos, self.state).masked_fill(self.owner < 0, INF)
            at_floor = self.count.gather(1, self.owner.clamp_min(0)) <= self.floor
            score = score.masked_fill(at_floor, INF)
            best, victim = score.min(1)                                               # [B]
            if bool((active & (best == INF)).any()):
                raise RuntimeError("global budget too small: every kept token is protected (sink / window / "
                                   "per-head floor); raise the budget or lower floor, sink or window")
            victim = torch.where(active, victim, self.P)                              # P = no-op column below
            self._free(rows, victim, active)
        # newcomers go to the first free slots of their row
        free = self.owner < 0
        first = (free.float() * torch.arange(self.P, 0, -1, device=k.device)).topk(Hkv, dim=1).indices  # [B, Hkv]
        b_i, h_i = new.nonzero(as_tuple=True)
        slot = first[b_i, (new.long().cumsum(1) - 1)[b_i, h_i]]
        self.keys[b_i, slot] = k[b_i, h_i, 0].to(self.keys.dtype)
        self.values[b_i, slot] = v[b_i, h_i, 0].to(self.values.dtype)
        self.pos[b_i, slot] = pos_new[b_i, h_i, 0]
        self.state[b_i, slot] = state_new[b_i, h_i, 0].float()
        self.owner[b_i, slot] = heads[h_i]

    def _free(self, rows, victim, active) -> None:
        v = victim.clamp_max(self.P - 1)
        o = self.owner[rows, v].clamp_min(0)
        self.count[rows, o] -= active.long()
        self.owner[rows, v] = torch.where(active, -1, self.owner[rows, v])
        self.pos[rows, v] = torch.where(active, -1, self.pos[rows, v])

    def merge(self, layer: int, k, v, pos_new, state_new) -> None:
        """Prefill chunk: keep the best P of [pool + chunk] with each head's best ``floor`` tokens protected."""
        B, Hkv, T, _ = k.shape
        heads = (layer * Hkv + torch.arange(Hkv, device=k.device)).repeat_interleave(T)   # [Hkv*T]
        pos_c = torch.cat([self.pos, pos_new.reshape(B, Hkv * T)], 1)                    # [B, N]
        own_c = torch.cat([self.owner, heads.expand(B, -1).masked_fill(pos_new.reshape(B, -1) < 0, -1)], 1)
        state_c = torch.cat([self.state, state_new.reshape(B, Hkv * T).float()], 1)
        score = self._scores(pos_c, state_c)
        if self.floor > 0:
            score = score.masked_fill(self._best_of_each_head(score, own_c), INF)
        top_score, top = score.topk(self.P, dim=1)                                      # [B, P]
        D, Dv = self.keys.shape[-1], self.values.shape[-1]
        k_c = torch.cat([self.keys, k.reshape(B, Hkv * T, D).to(self.keys.dtype)], 1)
        v_c = torch.cat([self.values, v.reshape(B, Hkv * T, Dv).to(self.values.dtype)], 1)
        empty = top_score == -INF
        self.keys.copy_(k_c.gather(1, top[..., None].expand(-1, -1, D)))
        self.values.copy_(v_c.gather(1, top[..., None].expand(-1, -1, Dv)))
        self.pos.copy_(pos_c.gather(1, top).masked_fill(empty, -1))
        self.state.copy_(state_c.gather(1, top))
        self.owner.copy_(own_c.gather(1, top).masked_fill(empty, -1))
        self.count.zero_().scatter_add_(1, self.owner.clamp_min(0), (self.owner >= 0).long())

    def _best_of_each_head(self, score: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: the ``floor`` best-scoring tokens of every owner (sorted by owner, then score)."""
        order = score.argsort(dim=1, descending=True, stable=True)
        order = order.gather(1, owner.gather(1, order).argsort(dim=1, stable=True))   # by (owner, -score)
        own = owner.gather(1, order)
        idx = torch.arange(own.shape[1], device=own.device).expand_as(own)
        starts = torch.ones_like(own, dtype=torch.bool)
        starts[:, 1:] = own[:, 1:] != own[:, :-1]
        rank = idx - torch.where(starts, idx, 0).cummax(1).values
        keep = (rank < self.floor) & (own >= 0)
        return torch.zeros_like(keep).scatter_(1, order, keep)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.ready:
            for name in ("keys", "values", "pos", "state", "owner", "count", "t_now"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.keys.device)))


class GlobalLayer(BoundedLayer):
    """One decoder layer's view of the shared :class:`GlobalPool` (the :class:`~trimkv.serve.cache.BoundedLayer`
    protocol: the pool is updated in :meth:`insert`, nothing is left to compact)."""

    def __init__(self, pool: GlobalPool, layer_idx: int):
        super().__init__(pool.policy, layer_idx)
        self.pool = pool

    def lazy_initialization(self, key_states, value_states) -> None:
        if not self.pool.ready:
            self.pool.allocate(key_states, value_states)
        if key_states.device != self.pool.keys.device:
            raise RuntimeError(
                f"layer {self.layer_idx} runs on {key_states.device} but the global pool lives on "
                f"{self.pool.keys.device}: one pool serves one device; for a model split over devices "
                "(device_map) use the per-head cache (scope='head'), which allocates each layer on its own device")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def insert(self, key_states, value_states) -> Candidates:
        """Insert T new tokens into the pool; returns [this layer's kept tokens + the new ones] to attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pool, T = self.pool, key_states.shape[2]
        new, _ = self._new_tokens(key_states, value_states)                           # [B, Hkv, T] each
        pool.t_now = torch.maximum(pool.t_now, new.pos.amax(dim=(1, 2)))
        k_old, v_old, pos_old, state_old = pool.gather(self.layer_idx)
        cands = Candidates(torch.cat([k_old, key_states.to(k_old.dtype)], dim=2),
                           torch.cat([v_old, value_states.to(v_old.dtype)], dim=2),
                           torch.cat([pos_old, new.pos], dim=2), torch.cat([state_old, new.state], dim=2), pool.t_now)
        if T == 1:
            pool.insert_one(self.layer_idx, key_states, value_states, new.pos, new.state)
        else:
            pool.merge(self.layer_idx, key_states, value_states, new.pos, new.state)
        return cands

    def kept_positions(self) -> torch.Tensor:
        return self.pool.gather(self.layer_idx)[2]

    def num_kept(self) -> torch.Tensor:
        """[B, Hkv] tokens held by this layer's heads."""
        H = self.pool.Hkv
        return self.pool.count[:, self.layer_idx * H:(self.layer_idx + 1) * H].clone()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool.P + query_length, 0

    def nbytes(self) -> int:
        return 0  # the pool is counted once by the cache

    def reorder_cache(self, beam_idx) -> None:
        pass  # the cache reorders the shared pool once


class GlobalRetentionCache(BoundedCache):
    """``slots`` tokens per batch row shared by all layers and KV heads; every head keeps >= ``floor`` tokens.

    At the same memory as :class:`~trimkv.serve.cache.RetentionCache` with ``budget`` tokens per head:
    ``slots = budget * num_layers * num_kv_heads`` (what ``make_cache(model, policy, budget, scope="global")``
    allocates). ``policy``: TRIM-KV retention by default (``RetentionPolicy(lookahead=n)`` for DBTrimKV's
    look-ahead score); it must have scores that compare across layers and heads.
    """

    def __init__(self, slots: int, num_layers: int, num_kv_heads: int, *, floor: int = 1, sink: int = 0,
                 window: int = 0, policy: EvictionPolicy | None = None):
        for name, value in (("slots", slots), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            check_tokens(name, value, 1)
        for name, value in (("floor", floor), ("sink", sink), ("window", window)):
            check_tokens(name, value)
        per_head = floor + sink + window + 1
        if slots < num_layers * num_kv_heads * per_head:
            raise CacheError(
                f"global pool of {slots} slots is too small: every one of the {num_layers} x {num_kv_heads} (layer, "
                f"KV head) pairs needs floor + sink + window + 1 = {per_head} slots, i.e. slots >= "
                f"{num_layers * num_kv_heads * per_head}; raise the budget or lower floor / sink / window")
        self.policy = policy or RetentionPolicy()
        empty = torch.zeros(1, 0, dtype=torch.long)
        self.policy.pool_scores(empty, empty.float(), torch.zeros(1, dtype=torch.long))   # refuses per-head policies
        self.pool = GlobalPool(slots, num_layers, num_kv_heads, floor=floor, sink=sink, window=window,
                               policy=self.policy)
        super().__init__(layers=[GlobalLayer(self.pool, i) for i in range(num_layers)])
        self.slots, self.floor, self.sink, self.window = slots, floor, sink, window

    def nbytes(self) -> int:
        """Bytes of the pool (K, V and 20 bytes of metadata per slot), whatever the context length."""
        return self.pool.nbytes()

    def budget_nbytes(self) -> int:
        """The pool is all budget: :meth:`nbytes`."""
        return self.nbytes()

    def num_kept(self) -> torch.Tensor:
        """[B, L, Hkv] tokens held by every (layer, head)."""
        return self.pool.count.view(-1, self.pool.L, self.pool.Hkv).clone()

    def reorder_cache(self, beam_idx) -> None:
        self.pool.reorder(beam_idx)
        self._reorder_ids(beam_idx)

    def reset(self) -> None:
        self.pool.keys = None
        super().reset()                      # every layer's, and the record of the sequence
        for layer in self.layers:
            layer.is_initialized = False

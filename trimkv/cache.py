"""A memory-bounded KV cache for ``model.generate(..., **cache_kwargs(model, cache))``.

Every (batch row, KV head) of every layer keeps at most ``budget`` tokens in fixed-capacity slot buffers that are
allocated once and reused in place:

    keys, values  [B, Hkv, C, D]      model dtype
    pos           [B, Hkv, C] int64   token position, -1 = empty slot
    logb          [B, Hkv, C] fp32    log retention of the token (from the gate)

Decode steps (one new token) run the fused append+evict of :mod:`trimkv.eviction`. Multi-token steps (prefill
chunks) attend over [kept slots + chunk] and then keep the top-``budget`` of them, so peak memory is
O(budget + chunk): pass ``prefill_chunk_size=...`` to ``generate`` (or use :func:`trimkv.generate`) for long prompts.
The attention reaches a layer through one call, :meth:`BoundedLayer.attend` (see its protocol).
``get_seq_length()`` is the logical number of tokens seen, which is what ``generate`` uses for positions; the count
lives in a tensor (``tokens_seen``) so that a compiled decode step (:mod:`trimkv.decode`) never changes Python state.

Which token goes is decided by an eviction policy (:mod:`trimkv.policies`): TRIM-KV's retention score by default,
heuristic baselines for comparison. The ``logb`` buffer holds the policy's per-slot state (log beta for TRIM-KV).
Without gates (or with gates disabled) tokens get ``logb = -1``: the cache then keeps the most recent tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import CacheError
from .eviction import append_evict_, evict_by_score_, keep_topk_, protect
from .policies import EvictionPolicy, RetentionPolicy


class BoundedLayer(CacheLayerMixin):
    """Base of the memory-bounded cache layers: the one protocol between trimkv's attention and a bounded cache.

    Per layer and forward, in this order::

        layer.stage(logb=..., pos=..., valid=...)     # the attention pre-hook: what the gate says of the new tokens
        k, v = layer.update(k, v)                    # transformers: counts the tokens, returns them unchanged
        out = layer.attend(q, k, v, q_pos=..., scaling=...)   # trimkv's attention function: everything else

    ``attend`` = :meth:`insert` (the new tokens enter; returns the keys to attend over) -> attention over them ->
    :meth:`observe` (attention-based policies see the weights) -> :meth:`compact` (a prefill chunk is cut back to
    the budget). The steps are public so that tests can drive a policy with chosen weights.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: EvictionPolicy | None = None):
        super().__init__()
        self.policy = policy or RetentionPolicy()
        self.tokens_seen: torch.Tensor | None = None   # 0-d int64 on the cache's device, counted in place
        self._staged: dict | None = None
        self._meta: torch.Tensor | None = None         # positions [B, Hkv, S] of what the last insert() returned

    def stage(self, *, logb: torch.Tensor | None, pos: torch.Tensor, valid: torch.Tensor | None,
              gate_fn: Callable | None = None) -> None:
        """The new tokens' log beta [B, Hkv, T] (or a function of (k, v) for rg2 gates), positions [B, T] and
        validity [B, T] (False = padding; None = all real)."""
        self._staged = dict(logb=logb, pos=pos, valid=valid, gate_fn=gate_fn)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Called by transformers before the attention: counts the new tokens and hands them on unchanged (the
        cache is filled by :meth:`attend`, which needs the query too)."""
        if self._staged is None:
            raise CacheError(
                f"{type(self).__name__}.update() without staged gate output: a trimkv bounded cache works only through "
                "trimkv's attention; attach gates first (trimkv.attach_gates / load_gates; gates.disabled() for a "
                "heuristic policy)")
        if self.tokens_seen is None:
            self.tokens_seen = torch.zeros((), dtype=torch.long, device=key_states.device)
        self.tokens_seen.add_(key_states.shape[2])     # in place: a compiled step counts without recompiling
        return key_states, value_states

    @property
    def seen(self) -> int:
        """Tokens seen so far (a host copy of ``tokens_seen``: one device sync)."""
        return 0 if self.tokens_seen is None else int(self.tokens_seen)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """q [B, H, T, D], the new k/v [B, Hkv, T, D], q_pos [B, T] -> attention output [B, H, T, D]."""
        keys, values, k_pos, k_valid = self.insert(k, v)
        need_w = self.policy.needs_attention
        res = slot_attention(q, keys, values, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scaling=scaling,
                             return_weights=need_w)
        out, weights = res if need_w else (res, None)
        if weights is not None:
            self.observe(weights, q_len=q.shape[2])
        self.compact()
        return out

    def _take_staged(self, k: torch.Tensor, v: torch.Tensor):
        """Positions [B, Hkv, T] (-1 = padding), policy state [B, Hkv, T] and validity [B, T] | None of the new
        tokens, from what :meth:`stage` was given."""
        B, H, T, _ = k.shape
        st = self._staged or {}
        self._staged = None
        pos = st.get("pos")
        if pos is None:
            pos = (torch.arange(T, device=k.device) + (self.tokens_seen - T)).expand(B, T)
        valid = st.get("valid")                  # None: every new token is real
        logb = st.get("logb")
        if logb is None and st.get("gate_fn") is not None:
            logb = st["gate_fn"](k, v)
        pos = pos[:, None, :].expand(B, H, T)
        if valid is not None:
            pos = pos.masked_fill(~valid[:, None, :], -1)
        return pos, self.policy.new_state(k, v, logb, pos), valid

    def insert(self, k: torch.Tensor, v: torch.Tensor):
        """The new tokens enter; returns keys, values [B, Hkv, S, D], positions, validity [B, Hkv, S] to attend
        over."""
        raise NotImplementedError

    def observe(self, weights: torch.Tensor, q_len: int = 1) -> None:
        """Attention weights [B, Hkv, G*q_len, S] over what :meth:`insert` returned (attention-based policies)."""

    def compact(self) -> None:
        """After the attention: cut what :meth:`insert` left above the budget back to it."""

    def kept_positions(self) -> torch.Tensor:
        """[B, Hkv, S] positions of the tokens this layer keeps (-1 = empty slot)."""
        raise NotImplementedError

    def attention_meta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity [B, Hkv, S] of the keys the last :meth:`insert` returned."""
        if self._meta is None:
            raise RuntimeError("attention_meta() called before insert()")
        return self._meta, self._meta >= 0

    def reset(self) -> None:
        if self.tokens_seen is not None:
            self.tokens_seen.zero_()
        self._staged = self._meta = None

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:   # the name of get_max_length up to transformers 5.16
        return -1


class RetentionLayer(BoundedLayer):
    """One decoder layer's bounded cache (see module docstring)."""

    def __init__(self, budget: int, *, sink: int = 0, window: int = 0, policy: EvictionPolicy | None = None):
        super().__init__(policy)
        self.budget, self.sink, self.window = budget, sink, window
        self._pending: tuple | None = None   # a chunk's [slots + chunk] candidates, compacted after attention
        self.pos: torch.Tensor | None = None
        self.logb: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(B, H, self.budget, D, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(B, H, self.budget, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.pos = torch.full((B, H, self.budget), -1, dtype=torch.long, device=self.device)
        self.logb = torch.zeros(B, H, self.budget, dtype=torch.float32, device=self.device)
        self.t_now = torch.full((B,), -1, dtype=torch.long, device=self.device)   # latest position seen per row
        self.is_initialized = True

    def insert(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0] or key_states.shape[1] != self.keys.shape[1]:
            raise CacheError(f"this cache holds {self.keys.shape[0]} sequence(s) x {self.keys.shape[1]} KV heads (it was "
                             f"allocated for batch {self.keys.shape[0]}, the input has {key_states.shape[0]} rows x "
                             f"{key_states.shape[1]} KV heads): a RetentionCache holds one batch of sequences; build a "
                             "new RetentionCache for another batch size")
        self.compact()  # a chunk left pending by a caller that skipped compact()
        T = key_states.shape[2]
        pos_new, state_new, valid = self._take_staged(key_states, value_states)   # [B,H,T], [B,H,T], [B,T]|None
        t_now = self.t_now.copy_(torch.maximum(self.t_now, pos_new.amax(dim=(1, 2))))  # [B], in place
        if T == 1 and (valid is None or bool(valid.all())):   # the hooks pass None: no host sync
            self._decode_step(key_states, value_states, pos_new, state_new, t_now)
            self._meta = self.pos
            return self.keys, self.values, self.pos, self.pos >= 0
        k_all = torch.cat([self.keys, key_states.to(self.dtype)], dim=2)
        v_all = torch.cat([self.values, value_states.to(self.dtype)], dim=2)
        pos_all = torch.cat([self.pos, pos_new], dim=2)
        state_all = torch.cat([self.logb, state_new], dim=2)
        self._meta = pos_all
        self._pending = (k_all, v_all, pos_all, state_all, t_now)
        return k_all, v_all, pos_all, pos_all >= 0

    def _decode_step(self, k, v, pos_new, state_new, t_now) -> None:
        if self.policy.fused:
            # eager: the fused Triton kernel on CUDA; compiled: the PyTorch reference, which inductor fuses itself
            backend = "torch" if torch.compiler.is_compiling() else "auto"
            append_evict_(self.keys, self.values, self.pos, self.logb, k, v, pos_new, state_new, t_now,
                          sink=self.sink, window=self.window, backend=backend, return_victim=False)
            return
        score = protect(self._scores(self.logb, self.pos, t_now, self.keys), self.pos, t_now,
                        sink=self.sink, window=self.window)
        evict_by_score_(self.keys, self.values, self.pos, self.logb, k, v, pos_new, state_new, score)

    def observe(self, weights: torch.Tensor, q_len: int = 1) -> None:
        pending = self._pending
        state, pos = (pending[3], pending[2]) if pending is not None else (self.logb, self.pos)
        self.policy.observe(state, weights, pos, q_len)

    def compact(self) -> None:
        """Keep the best ``budget`` tokens of a pending chunk's [slots + chunk] candidates."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        k_all, v_all, pos_all, state_all, t_now = pending
        score = protect(self._scores(state_all, pos_all, t_now, k_all), pos_all, t_now,
                        sink=self.sink, window=self.window)
        keep_topk_(self.keys, self.values, self.pos, self.logb, k_all, v_all, pos_all, state_all, score)

    def _scores(self, state, pos, t_now, keys):
        if self.policy.needs_keys:   # e.g. KeyDiff: scores depend on all candidates' keys [B, H, N, D]
            return self.policy.scores(state, pos, t_now, keys=keys)
        return self.policy.scores(state, pos, t_now)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.budget + query_length, 0

    def kept_positions(self) -> torch.Tensor:
        return self.pos

    def num_kept(self) -> torch.Tensor:
        """[B, Hkv] number of occupied slots."""
        return (self.pos >= 0).sum(-1) if self.pos is not None else torch.zeros(0)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.logb))

    def reset(self) -> None:
        """Forget every token: the next forward starts a new sequence of the same batch size, in the same buffers
        (their addresses stay, so a compiled decode step still fits; for another batch size, make a new cache)."""
        super().reset()
        if self.is_initialized:
            self.keys.zero_(), self.values.zero_(), self.pos.fill_(-1), self.logb.zero_(), self.t_now.fill_(-1)
        self._pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "pos", "logb", "t_now"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))


class BoundedCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`BoundedLayer` s: what trimkv's attention recognises as a
    bounded cache. Subclasses: :class:`RetentionCache` (a budget per head), ``GlobalRetentionCache`` (one pool)."""

    def nbytes(self) -> int:
        """Bytes of K, V and slot metadata the cache holds."""
        return sum(layer.nbytes() for layer in self.layers)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(f"a {type(self).__name__} cannot be cropped (evicted tokens are gone)")


class RetentionCache(BoundedCache):
    """Memory-bounded cache: ``budget`` tokens per (layer, batch row, KV head), evicting the lowest retention.

    ``sink`` first tokens and the ``window`` most recent tokens are always kept and count toward the budget.
    ``policy`` picks the victims (default: TRIM-KV retention); one policy object is shared by all layers.
    ``lookahead=n`` > 0 ranks tokens by DBTrimKV's future utility over the next n steps (TRIM-KV policy only).
    """

    def __init__(self, budget: int, num_layers: int, *, sink: int = 0, window: int = 0,
                 policy: EvictionPolicy | None = None, lookahead: int = 0):
        for name, value in (("budget", budget), ("num_layers", num_layers), ("sink", sink), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise CacheError(f"RetentionCache {name} must be an integer (tokens), got {value!r}")
        if budget < 1:
            raise CacheError(f"budget must be >= 1 token per KV head, got {budget}")
        if sink < 0 or window < 0:
            raise CacheError(f"sink and window must be >= 0, got sink={sink}, window={window}")
        if budget <= sink + window:
            raise CacheError(
                f"budget={budget} leaves no room for eviction: it must exceed sink + window = {sink} + {window}; "
                "raise the budget or shrink the sink/window"
            )
        if lookahead and policy is not None:
            raise CacheError(f"lookahead={lookahead} is an option of the TRIM-KV retention policy; pass either "
                             f"lookahead or policy={policy!r}, not both")
        self.policy = policy or RetentionPolicy(lookahead)
        layers = [RetentionLayer(budget, sink=sink, window=window, policy=self.policy) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.budget, self.sink, self.window = budget, sink, window

    @classmethod
    def for_model(cls, model, budget: int, **kwargs) -> "RetentionCache":
        cfg = getattr(model.config, "text_config", None) or model.config
        return cls(budget, cfg.num_hidden_layers, **kwargs)



def slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   k_valid: torch.Tensor, scaling: float, return_weights: bool = False):
    """Attention over slot buffers with per-head validity, GQA folded (k/v never repeated).

    q [B, H, T, D], k/v [B, Hkv, S, D], q_pos [B, T], k_pos/k_valid [B, Hkv, S] -> out [B, H, T, D]
    (and, with ``return_weights``, the softmax weights [B, Hkv, G*T, S] for attention-based policies).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.reshape(B, Hkv, G * T, D)                                          # query group folded into rows
    qp = q_pos.repeat(1, G)                                                   # [B, G*T]
    mask = k_valid[:, :, None, :] & (k_pos[:, :, None, :] <= qp[:, None, :, None])   # [B, Hkv, G*T, S]
    empty = ~mask.any(-1, keepdim=True)
    if return_weights:
        logits = (qf.float() @ k.float().transpose(-1, -2)) * scaling
        w = logits.masked_fill(~mask, float("-inf")).softmax(-1).masked_fill(empty, 0.0)
        out = (w.to(v.dtype) @ v).reshape(B, H, T, D)
        return out, w
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scaling)
    return out.masked_fill(empty, 0.0).reshape(B, H, T, D)


def dynamic_cache_nbytes(cache) -> int:
    """Bytes of K/V held by a transformers DynamicCache (for side-by-side reports)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total

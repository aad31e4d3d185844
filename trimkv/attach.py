"""Attaching retention gates to a frozen Hugging Face causal LM, by hooks (no copied modeling files).

Two pieces of transformers' public machinery do all the work:

* a forward pre-hook on every decoder layer's ``self_attn`` computes the gate from the attention input
  (``kwargs["hidden_states"]``, already normalised) and hands the layer's log beta and positions to the attention
  call that follows (``GateHandle._inputs``, owned by the handle; the only attribute set on a transformers module is
  ``_trimkv``, the reference to the handle); with a bounded cache it also ``stage`` s them on the cache layer;
* the attention implementation ``"trimkv"`` registered with ``transformers.AttentionInterface`` replaces the
  model's attention function. Without a bounded cache it computes retention-gated attention (the paper's
  Eq. 3, training and soft-gated inference); with one it is a dispatch: ``layer.attend(q, k, v, ...)`` inserts,
  attends over the kept slots and evicts (the protocol of :class:`trimkv.cache.BoundedLayer`).

The decode path is therefore: pre-hook -> ``layer.stage`` -> ``cache.update`` (transformers) -> attention ->
``layer.attend``.

No mask function is registered under ``"trimkv"``, so transformers passes ``attention_mask=None`` and this
module masks by itself (causal, padding from the 2-D mask seen by a pre-hook on the decoder, packed
documents from ``position_ids``, per-head slot validity from the cache).

Adding a model family = making :func:`attention_modules` find its attention modules (usually nothing to do).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import retention_attention
from .cache import BoundedCache, BoundedLayer
from .compat import cache_from
from .gate import GateConfig, RetentionGates, check_compatible

ATTN_NAME = "trimkv"
GATES_ATTR = "trimkv_gates"  # the gates live on the model as a submodule, so .to(), DDP and DeepSpeed see them


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer, in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(
            f"trimkv cannot find decoder layers on {type(model).__name__} (looked for `.get_decoder().layers`); "
            "add this family to trimkv.attach.attention_modules"
        )
    mods = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None for m in mods):
        raise TypeError(f"{type(model).__name__}: some decoder layers have no `self_attn` module; unsupported family")
    return mods


@dataclass
class Record:
    """What one layer's gate produced in the last forward (kept for the capacity loss)."""

    logb: torch.Tensor          # [B, Hkv, T] fp32
    pos: torch.Tensor           # [B, T] int64 positions within each document
    seg: torch.Tensor | None    # [B, T] document ids, None = one document per row


@dataclass
class LayerInput:
    """What the attention pre-hook of one layer worked out for the attention call that follows it."""

    logb: torch.Tensor | None   # [B, Hkv, S] fp32 log beta of every key (None: gates off, or gates that read [k; v])
    pos: torch.Tensor           # [B, T] positions of the new tokens
    bounded: BoundedLayer | None  # the layer of a bounded cache, when the model runs with one


@dataclass
class GateHandle:
    """Handle returned by :func:`attach_gates` (also ``model.trimkv``). ``handle.disabled()`` gives the frozen
    teacher; ``handle.recording()`` collects each layer's log beta; ``handle.detach()`` removes everything."""

    model: nn.Module
    gates: RetentionGates
    attn_impl: str = "auto"                     # training attention, one of trimkv.attention.IMPLS
    adapters: Any = None                        # peft.PeftModel of LoRA adapters injected into the model (or None)
    adapter_params: list = field(default_factory=list)   # their trainable parameters (LoRA co-training)
    enabled: bool = True
    record: bool = False                        # keep per-layer logb for the capacity loss
    records: dict[int, Record] = field(default_factory=dict)
    original_attn: str | None = None
    _hooks: list[Any] = field(default_factory=list)
    _mask2d: torch.Tensor | None = None         # [B, past + T] padding mask of the current forward
    _new_valid: tuple | None = None             # (T, [B, T] mask or None = all real), once per forward
    _meta: tuple | None = None                  # (T, S, positions/segments/validity), once per forward
    _inputs: dict[int, LayerInput] = field(default_factory=dict)   # pre-hook -> attention, per layer
    packed: bool | None = None                  # training rows hold several documents? None = look (a host sync)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model exactly as without gates (the teacher pass): gates off, and LoRA adapters attached with them
        off too (the frozen original model)."""
        prev, self.enabled = self.enabled, False
        adapters_off = self.adapters.disable_adapter() if (prev and self.adapters is not None) \
            else contextlib.nullcontext()
        try:
            with adapters_off:
                yield
        finally:
            self.enabled = prev

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What trains: the gates' parameters (rg10's shared projection once), then the LoRA adapters' if any."""
        return [p for p in self.gates.parameters() if p.requires_grad] + list(self.adapter_params)

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, Record]]:
        """Collect each layer's log beta during the forwards run inside the block."""
        prev, self.record = self.record, True
        self.records = {}
        try:
            yield self.records
        finally:
            self.record = prev

    @contextlib.contextmanager
    def rows_packed(self, packed: bool | None) -> Iterator[None]:
        """Tell the forwards inside the block whether the rows hold several documents (computed on the host by the
        training step, so the GPU never waits to find out); ``None`` = find out from ``position_ids``."""
        prev, self.packed = self.packed, packed
        try:
            yield
        finally:
            self.packed = prev

    def detach(self) -> RetentionGates | None:
        return detach_gates(self.model)


def attach_gates(model: nn.Module, gates: RetentionGates | None = None, *, gate_config: GateConfig | None = None,
                 attn_impl: str = "auto", adapters: Any = None, **gate_overrides: Any) -> GateHandle:
    """Attach ``gates`` (or fresh ones built from ``gate_config`` / the model's config) to ``model``.

    The base model is frozen (``requires_grad=False``); only the gates train, and the LoRA ``adapters`` (a
    ``peft.PeftModel`` already injected into ``model``, see :mod:`trimkv.lora`) keep their trainable parameters.
    Returns the :class:`GateHandle` handle, also reachable as ``model.trimkv``.
    """
    from transformers import AttentionInterface

    if getattr(model, "trimkv", None) is not None:
        raise RuntimeError("gates are already attached to this model; call model.trimkv.detach() first")
    mods = attention_modules(model)
    if gates is None:
        cfg = gate_config or GateConfig.for_model(model.config, **gate_overrides)
        gates = RetentionGates(cfg)
    check_compatible(gates.config, model)
    place_gates(gates, mods)
    adapter_params = [p for p in adapters.parameters() if p.requires_grad] if adapters is not None else []
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_params:
        p.requires_grad_(True)
    model.add_module(GATES_ATTR, gates)

    AttentionInterface.register(ATTN_NAME, trimkv_attention)
    handle = GateHandle(model=model, gates=gates, attn_impl=attn_impl, adapters=adapters,
                        adapter_params=adapter_params, original_attn=model.config._attn_implementation)
    model.trimkv = handle
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handle._hooks.append(decoder.register_forward_pre_hook(_decoder_pre_hook(handle), with_kwargs=True))
    for idx, mod in enumerate(mods):
        mod._trimkv = (handle, idx)
        handle._hooks.append(mod.register_forward_pre_hook(_attn_pre_hook(handle, idx), with_kwargs=True))
    model.set_attn_implementation(ATTN_NAME)
    return handle


def place_gates(gates: RetentionGates, mods: list[nn.Module]) -> None:
    """fp32, and each layer's gate on the device of that layer's attention weights, so a model split over devices
    (``device_map="auto"``) runs every gate where its layer runs."""
    for gate, mod in zip(gates.layers, mods):
        gate.to(device=module_device(mod), dtype=torch.float32)
    if gates.shared is not None:   # rg10: one head for every layer, beside the first (it follows its input's device)
        gates.shared.to(device=module_device(mods[0]), dtype=torch.float32)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights live (the first parameter or buffer; CPU for a module without either)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def detach_gates(model: nn.Module) -> RetentionGates | None:
    """Remove hooks, gates and the LoRA adapters attached with them; restore the original attention implementation.
    Returns the gates."""
    handle: GateHandle | None = getattr(model, "trimkv", None)
    if handle is None:
        return None
    for h in handle._hooks:
        h.remove()
    for mod in attention_modules(model):
        mod.__dict__.pop("_trimkv", None)
    if handle.original_attn is not None:
        model.set_attn_implementation(handle.original_attn)
    delattr(model, GATES_ATTR)
    del model.trimkv
    if handle.adapters is not None:
        handle.adapters.unload()                 # the LoRA layers give their base layers back, unmerged
    return handle.gates


@contextlib.contextmanager
def gates_disabled(model: nn.Module) -> Iterator[None]:
    """``with gates_disabled(model):`` runs the frozen model as if no gates were attached."""
    handle: GateHandle | None = getattr(model, "trimkv", None)
    if handle is None:
        yield
        return
    with handle.disabled():
        yield


# ----------------------------------------------------------------------------------------------- hooks
def _decoder_pre_hook(handle: GateHandle):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        handle._mask2d = mask if (torch.is_tensor(mask) and mask.dim() == 2) else None
        handle._new_valid = handle._meta = None   # the first attention layer of this forward computes them
    return hook


def _attn_pre_hook(handle: GateHandle, layer_idx: int):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [B, T, d]
        cache = cache_from(kwargs)                      # "cache" from transformers 5.24, "past_key_values" before
        pos = kwargs.get("position_ids")
        B, T = hidden.shape[:2]
        if pos is None:
            past = cache.get_seq_length(layer_idx) if cache is not None else 0
            pos = torch.arange(past, past + T, device=hidden.device)[None]
        pos = pos.expand(B, T)
        gate = handle.gates[layer_idx]
        logb = gate(hidden) if (handle.enabled and not gate.reads_kv) else None  # [B, Hkv, T]
        bounded = cache.layers[layer_idx] if isinstance(cache, BoundedCache) else None
        if logb is not None and bounded is None and cache is not None:
            logb = _with_cached_logb(cache, layer_idx, logb)               # [B, Hkv, past + T]
        handle._inputs[layer_idx] = LayerInput(logb=logb, pos=pos, bounded=bounded)
        if bounded is not None:
            if handle._new_valid is None or handle._new_valid[0] != T:
                handle._new_valid = (T, _new_token_mask(handle._mask2d, T, hidden.device))
            gate_fn = None
            if gate.reads_kv and handle.enabled:
                gate_fn = lambda k, v: gate(torch.cat([k, v], dim=-1))  # noqa: E731  [B,Hkv,T,2D] -> [B,Hkv,T]
            bounded.stage(logb=logb, pos=pos, valid=handle._new_valid[1], gate_fn=gate_fn)
    return hook


def _with_cached_logb(cache: Any, layer_idx: int, logb: torch.Tensor) -> torch.Tensor:
    """A full (non-evicting) cache, e.g. generate() with a DynamicCache: the gated attention needs log beta of every
    cached key too, so the cache object carries that history per layer (reordered with it in beam search).
    logb [B, Hkv, T] -> [B, Hkv, S]."""
    past = cache.get_seq_length(layer_idx)
    history = _logb_history(cache)
    hist = history.get(layer_idx)
    if past == 0:
        full = logb
    elif hist is not None and hist.shape[-1] == past and hist.shape[0] == logb.shape[0]:
        full = torch.cat([hist, logb], dim=-1)
    else:
        raise RuntimeError(
            f"layer {layer_idx}: the cache holds {past} tokens whose log retention is unknown (it was filled with the "
            "gates disabled or detached); fill it with the gates enabled, or use a trimkv.RetentionCache")
    history[layer_idx] = full
    return full


def _logb_history(cache: Any) -> dict[int, torch.Tensor]:
    """The per-layer log-beta history stored on ``cache``; its ``reorder_cache`` (beam search) reorders it too."""
    history = getattr(cache, "_trimkv_logb", None)
    if history is None:
        history = cache._trimkv_logb = {}
        reorder = cache.reorder_cache

        def reorder_with_history(beam_idx: torch.LongTensor) -> None:
            reorder(beam_idx)
            for idx, h in history.items():
                history[idx] = h.index_select(0, beam_idx.to(h.device))

        cache.reorder_cache = reorder_with_history
    return history


def _new_token_mask(mask2d: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """[B, T] bool: which of the T new tokens are real (not padding); None when all are (no mask, or a mask whose
    last T columns are all set). Called once per forward: the one host sync here spares one per layer."""
    if mask2d is None:
        return None
    new = mask2d[:, -T:].to(device=device, dtype=torch.bool)
    return None if bool(new.all()) else new


# ------------------------------------------------------------------------------- attention function
def trimkv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q [B, H, T, D], k/v [B, Hkv, S, D] -> out [B, T, H, D]."""
    handle, layer_idx = module._trimkv
    inp = handle._inputs.pop(layer_idx)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if inp.bounded is not None:  # a bounded cache: it inserts, attends over its kept slots and evicts
        return inp.bounded.attend(query, key, value, q_pos=inp.pos, scaling=scaling).transpose(1, 2), None
    T, S = query.shape[2], key.shape[2]
    if handle._meta is None or handle._meta[:2] != (T, S):   # the same for every layer of one forward
        handle._meta = (T, S, _positions(inp.pos, handle._mask2d, T, S, handle.packed))
    q_pos, k_pos, seg, k_valid = handle._meta[2]
    logb = None
    if handle.enabled:
        logb = inp.logb
        if logb is not None:
            logb = logb[..., -key.shape[2]:]                              # a sliding-window cache keeps the tail
        if logb is None:  # rg2 / rg2-all / rg3: the gate reads post-RoPE [k; v]
            logb = handle.gates[layer_idx](torch.cat([key, value], dim=-1))
        if handle.record and key.shape[2] == query.shape[2]:
            handle.records[layer_idx] = Record(logb=logb, pos=k_pos, seg=seg)
    if logb is None:
        out = _plain_attention(query, key, value, q_pos, k_pos, seg, k_valid, scaling)
    else:
        out = retention_attention(query, key, value, logb, scaling=scaling, q_pos=q_pos, k_pos=k_pos,
                                  q_seg=seg, k_seg=seg, k_valid=k_valid, impl=handle.attn_impl)
    return out.transpose(1, 2).contiguous(), None


def _positions(pos: torch.Tensor, mask2d: torch.Tensor | None, T: int, S: int, packed: bool | None = None):
    """Positions, document ids and key validity for the no-bounded-cache path.

    Without past (T == S, training): positions are ``position_ids``; a packed row starts a new document wherever
    its positions do not increase by one. ``packed`` (known on the host by the training step) says whether any row
    does; ``None`` finds out, at the cost of one host sync per forward. With a past (a DynamicCache while
    generating): positions are indices.
    """
    B, device = pos.shape[0], pos.device
    seg = None
    if T == S and mask2d is None:
        q_pos = k_pos = pos
        if packed is None:
            packed = bool((pos[:, 1:] != pos[:, :-1] + 1).any())
        if packed:
            restart = torch.ones_like(pos, dtype=torch.bool)
            restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            seg = restart.long().cumsum(-1)                               # [B, T]
    else:
        k_pos = torch.arange(S, device=device).expand(B, S)
        q_pos = k_pos[:, S - T:]
    k_valid = None if mask2d is None else mask2d[:, -S:].to(device=device, dtype=torch.bool)
    return q_pos, k_pos, seg, k_valid


def _plain_attention(q, k, v, q_pos, k_pos, seg, k_valid, scaling):
    """Causal softmax attention with padding / packing masks, via SDPA (GQA without repeating k/v)."""
    T, S = q.shape[2], k.shape[2]
    if seg is None and k_valid is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    mask = k_pos[:, None, :] <= q_pos[:, :, None]                         # [B, T, S]
    if seg is not None:
        mask = mask & (seg[:, None, :] == seg[:, :, None])
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    return out.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)          # rows with no visible key -> 0

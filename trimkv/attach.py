"""Attaching trimkv to a frozen Hugging Face causal LM, by hooks (no copied modeling files).

Two pieces of transformers' public machinery do all the work:

* a forward pre-hook on every decoder layer's ``self_attn`` works out what the attention call that follows needs
  (:class:`LayerInputs`: the attention input, positions, which new tokens are padding, the layer's gate) and hands
  it over: to the cache layer when the model runs with one of trimkv's caches (``layer.stage(inputs)``), else to
  the attention call through the handle;
* the attention implementation ``"trimkv"`` (:mod:`trimkv.attention_impl`) replaces the model's attention function.

:func:`install_hooks` installs both, with or without gates: heuristic eviction policies need the hooks, not gates.
:func:`attach_gates` installs them if needed and adds the gates (the only parameters that train). Either way the
handle is ``model.trimkv``; ``handle.detach()`` removes everything. The only attribute set on a transformers module
is ``_trimkv``, a reference to the handle.

Gates are computed lazily, by whoever needs them: the attention in its training form, or an eviction policy that
reads log beta (:meth:`LayerInputs.log_beta`). A policy that does not read them never runs them.

Adding a model family = making :func:`attention_modules` find its attention modules (usually nothing to do).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AttentionInterface

from .attention_impl import Record, trimkv_attention
from .compat import cache_from
from .errors import CacheError
from .gate import GateConfig, RetentionGate, RetentionGates, check_compatible

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


# ------------------------------------------------------------------------------------------- hand-over
@dataclass
class LayerInputs:
    """What the attention pre-hook of one layer worked out for the attention call that follows it."""

    pos: torch.Tensor                           # [B, T] positions of the new tokens
    valid: torch.Tensor | None = None           # [B, T] False = padding; None = every new token is real
    hidden: torch.Tensor | None = None          # [B, T, d] the attention input (what "rg" gates read)
    gate: RetentionGate | None = None           # this layer's gate; None = no gates, or gates disabled
    mask2d: torch.Tensor | None = None          # [B, past + T] the forward's padding mask (training form, soft cache)
    attn_impl: str = "auto"                     # retention-gated attention implementation (trimkv.attention.IMPLS)
    logb: torch.Tensor | None = None            # [B, Hkv, T] log beta given directly (tests, trace replays)

    def log_beta(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """fp32 log beta [B, Hkv, N] of the tokens whose post-RoPE ``keys`` / ``values`` [B, Hkv, N, D] are given
        ("rg2"-style gates read them; "rg"-style gates read the attention input of the new tokens, N = T)."""
        if self.logb is not None:
            return self.logb
        if self.gate is None:
            raise CacheError("this eviction policy ranks tokens by the gates' log retention, but no gates are attached "
                             "(or they are disabled): load trained gates first (trimkv.load_gates(model, path)), or "
                             "pick a policy that needs none (e.g. 'streaming', 'snapkv')")
        if self.gate.reads_kv:
            return self.gate(torch.cat([keys, values], dim=-1))               # [B, Hkv, N, 2D] -> [B, Hkv, N]
        return self.gate(self.hidden)                                         # [B, T, d] -> [B, Hkv, T]


class CacheLayer:
    """The protocol of trimkv's cache layers (bounded, pooled or soft-gated), per layer and forward::

        layer.stage(inputs)                            # the attention pre-hook
        k, v = layer.update(k, v)                      # transformers
        out = layer.attend(q, k, v, scaling=...)       # trimkv's attention function: everything else

    Subclasses mix this into a transformers ``CacheLayerMixin``; the pre-hook recognises them by this class."""

    def stage(self, inputs: LayerInputs) -> None:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float) -> torch.Tensor:
        """q [B, H, T, D], k/v as returned by ``update`` -> attention output [B, H, T, D]."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- the handle
@dataclass
class GateHandle:
    """What trimkv attached to a model (``model.trimkv``): the hooks, and the gates when there are any.

    ``handle.disabled()`` gives the frozen model (the teacher); ``handle.recording()`` collects each layer's log beta;
    ``handle.detach()`` removes everything."""

    model: nn.Module
    gates: RetentionGates | None = None
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
    _inputs: dict[int, tuple] = field(default_factory=dict)   # pre-hook -> attention, per layer
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

    def gate(self, layer_idx: int) -> RetentionGate | None:
        """Layer ``layer_idx``'s gate when gates are attached and enabled, else None."""
        return self.gates[layer_idx] if (self.gates is not None and self.enabled) else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What trains: the gates' parameters (rg10's shared projection once), then the LoRA adapters' if any."""
        gates = [p for p in self.gates.parameters() if p.requires_grad] if self.gates is not None else []
        return gates + list(self.adapter_params)

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


def install_hooks(model: nn.Module) -> GateHandle:
    """The hooks and the ``"trimkv"`` attention implementation on ``model`` (no gates); returns ``model.trimkv``.
    Idempotent: a model that has them already keeps its handle (and its gates). What a bounded cache with a
    heuristic policy needs; :func:`attach_gates` calls it too."""
    handle: GateHandle | None = getattr(model, "trimkv", None)
    if handle is not None:
        return handle
    mods = attention_modules(model)
    AttentionInterface.register(ATTN_NAME, trimkv_attention)
    handle = GateHandle(model=model, original_attn=model.config._attn_implementation)
    model.trimkv = handle
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handle._hooks.append(decoder.register_forward_pre_hook(_decoder_pre_hook(handle), with_kwargs=True))
    for idx, mod in enumerate(mods):
        mod._trimkv = (handle, idx)
        handle._hooks.append(mod.register_forward_pre_hook(_attn_pre_hook(handle, idx), with_kwargs=True))
    model.set_attn_implementation(ATTN_NAME)
    _check_prompts_in_generate(model)
    return handle


def _check_prompts_in_generate(model: nn.Module) -> None:
    """``model.generate`` hands every step's whole sequence to ``prepare_inputs_for_generation``: a trimkv cache
    checks there that what it holds is the start of that sequence (a cache reused for another prompt would otherwise
    be continued as if it were its beginning). The wrapper keeps the method's signature (transformers reads it)."""
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(input_ids, *args, **kwargs):
        check = getattr(cache_from(kwargs), "check_prompt", None)
        # generate passes next_sequence_length with the whole sequence (a chunk of a chunked prefill comes without)
        if check is not None and torch.is_tensor(input_ids) and "next_sequence_length" in kwargs:
            check(input_ids)
        return original(input_ids, *args, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs_for_generation


def attach_gates(model: nn.Module, gates: RetentionGates | None = None, *, gate_config: GateConfig | None = None,
                 attn_impl: str = "auto", adapters: Any = None, **gate_overrides: Any) -> GateHandle:
    """Attach ``gates`` (or fresh ones built from ``gate_config`` / the model's config) to ``model``.

    The base model is frozen (``requires_grad=False``); only the gates train, and the LoRA ``adapters`` (a
    ``peft.PeftModel`` already injected into ``model``, see :mod:`trimkv.lora`) keep their trainable parameters.
    Returns the :class:`GateHandle`, also reachable as ``model.trimkv``.
    """
    existing: GateHandle | None = getattr(model, "trimkv", None)
    if existing is not None and existing.gates is not None:
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
    handle = install_hooks(model)
    handle.gates, handle.attn_impl, handle.adapters, handle.adapter_params = gates, attn_impl, adapters, adapter_params
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
    Returns the gates (None when there were none)."""
    handle: GateHandle | None = getattr(model, "trimkv", None)
    if handle is None:
        return None
    for h in handle._hooks:
        h.remove()
    for mod in attention_modules(model):
        mod.__dict__.pop("_trimkv", None)
    model.__dict__.pop("prepare_inputs_for_generation", None)
    if handle.original_attn is not None:
        model.set_attn_implementation(handle.original_attn)
    if handle.gates is not None:
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
        note = getattr(cache_from(kwargs), "note_input_ids", None)
        if note is not None and not torch.compiler.is_compiling():   # the compiled decoder keeps no record
            note(kwargs.get("input_ids", args[0] if args else None))
    return hook


def _attn_pre_hook(handle: GateHandle, layer_idx: int):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [B, T, d]
        cache = cache_from(kwargs)                      # "cache" from transformers 5.24, "past_key_values" before
        B, T = hidden.shape[:2]
        pos = kwargs.get("position_ids")
        if pos is None:
            past = cache.get_seq_length(layer_idx) if cache is not None else 0
            pos = torch.arange(past, past + T, device=hidden.device)[None]
        layer = trimkv_layer(cache, layer_idx)
        if layer is not None and (handle._new_valid is None or handle._new_valid[0] != T):
            handle._new_valid = (T, _new_token_mask(handle._mask2d, T, hidden.device))
        inputs = LayerInputs(pos=pos.expand(B, T), valid=handle._new_valid[1] if layer is not None else None,
                             hidden=hidden, gate=handle.gate(layer_idx), mask2d=handle._mask2d,
                             attn_impl=handle.attn_impl)
        if layer is not None:
            layer.stage(inputs)
        handle._inputs[layer_idx] = (inputs, layer)
    return hook


def trimkv_layer(cache: Any, layer_idx: int) -> CacheLayer | None:
    """Layer ``layer_idx`` of ``cache`` when it is one of trimkv's cache layers, else None."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, CacheLayer) else None


def _new_token_mask(mask2d: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """[B, T] bool: which of the T new tokens are real (not padding); None when all are (no mask, or a mask whose
    last T columns are all set). Called once per forward: the one host sync here spares one per layer."""
    if mask2d is None:
        return None
    new = mask2d[:, -T:].to(device=device, dtype=torch.bool)
    return None if bool(new.all()) else new

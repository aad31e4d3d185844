"""The gates the paper's authors released (``ngocbh/trimkv``), read into trimkv's :class:`~trimkv.gate.GateConfig`
and state-dict names.

An official checkpoint folder (or Hub repo, e.g. ``ngocbh/TrimKV-Qwen3-4B-Math``) holds::

    config.json          the base model's config plus the TRIM-KV fields (TrimKVQwen3Config and friends):
                         base_model, retention_gate ("rg" | "rg2" | "rg3"), retention_gate_intermediate_size,
                         retention_gate_bias_init, memory_size, buffer_size, trainable_params, ...
    trimkv_weights.pth   torch.save of the gate entries of the model's state dict:
                         model.layers.{l}.self_attn.retention_gate.{linear1.weight, linear1.bias, linear2.weight, bias}
                         (rg3: gate_proj.weight, up_proj.weight, down_proj.weight, bias)

Their gate is ``logsigmoid(linear2(act(linear1 x)) + bias)`` with ``act = ACT2FN[config.hidden_act]``; "rg" reads the
attention input, "rg2" / "rg3" the post-RoPE [k; v] of all KV heads of the layer flattened head by head (trimkv's
``"rg2-all"`` / ``"rg3"``; trimkv's own ``"rg2"`` shares one small MLP across heads instead). The mapping is exact:
the same inputs give the same log beta.

The weights file is a pickle: it is read with ``torch.load(weights_only=True)`` (no code runs) and anything but a
flat mapping of names to tensors is refused.

Writing the layout (``trimkv export --format authors``, :func:`trimkv.share.export_checkpoint`) is the exact inverse:
:func:`official_config` (the base model's config plus their fields, ``trainable_params: retention_gate`` so that
their loader finds the gate keys) and :func:`official_weights`. Their package serves Llama, Qwen3 and Phi-3 models
(``TrimKV{Llama,Qwen3,Phi3}ForCausalLM.from_pretrained(folder)`` loads ``config.base_model`` and then these gates).
"""
from __future__ import annotations

import pathlib
import pickle
import re
from typing import Any

import torch

from ..errors import CorruptCheckpointError, GateCheckpointError
from ..gate import ACTIVATIONS, GateConfig, RetentionGates, check_compatible

OFFICIAL_WEIGHTS = "trimkv_weights.pth"
GATE_TYPE_OF = {"rg": "rg", "rg2": "rg2-all", "rg3": "rg3"}     # the authors' name -> trimkv's gate_type
AUTHORS_NAME = {mine: theirs for theirs, mine in GATE_TYPE_OF.items()}   # trimkv's gate_type -> the authors' name
ARCHITECTURES = {"llama": "TrimKVLlamaForCausalLM", "qwen3": "TrimKVQwen3ForCausalLM", "phi3": "TrimKVPhi3ForCausalLM"}
TRAINABLE = "retention_gate"          # their config.trainable_params: the substring that names every gate key
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.retention_gate\.(.+)$")
_NAMES = {  # their parameter name -> trimkv's, per body
    "mlp": {"linear1.weight": "w1.weight", "linear1.bias": "w1.bias", "linear2.weight": "w2.weight",
            "bias": "bias"},
    "swiglu": {"gate_proj.weight": "w1.weight", "up_proj.weight": "w3.weight", "down_proj.weight": "w2.weight",
               "bias": "bias"},
}
# The authors' config fields kept (under GateConfig.extra["official"]) for the record; the maths does not read them.
_KEPT = ("retention_gate", "memory_size", "buffer_size", "floor_budget_ratio", "compress_strategy",
         "trainable_params", "max_seq_len", "retention_weight", "base_loss", "architectures", "model_type")


def is_official(folder: pathlib.Path) -> bool:
    """A folder in the authors' layout (their weights file, no trimkv safetensors)."""
    return (folder / OFFICIAL_WEIGHTS).is_file()


def official_gate_config(folder: pathlib.Path, data: dict[str, Any], source: str) -> GateConfig:
    """The :class:`GateConfig` of an official checkpoint, from its parsed ``config.json`` (``data``)."""
    file = folder / "config.json"
    kind = data.get("retention_gate")
    if kind not in GATE_TYPE_OF:
        raise CorruptCheckpointError(
            f"{file}: retention_gate={kind!r}; trimkv reads the authors' gates of type {sorted(GATE_TYPE_OF)}")
    cfg = data.get("text_config") or data
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        fields = dict(
            num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            gate_hidden=int(data["retention_gate_intermediate_size"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} lacks a field an official TRIM-KV config has: {err!r}") from err
    activation = cfg.get("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise CorruptCheckpointError(f"{file}: hidden_act={activation!r}, which the gates use as their activation; "
                                     f"trimkv supports {ACTIVATIONS}")
    base = data.get("base_model")
    return GateConfig(
        **fields, gate_type=GATE_TYPE_OF[kind], activation=activation,
        bias_init=float(data.get("retention_gate_bias_init", 18.0)),
        base_model=base, train_budget=data.get("memory_size"),
        base_load_kwargs={"name": base} if base else {},
        extra={"official": {k: data[k] for k in _KEPT if k in data}, "converted_from": source},
    )


def official_state_dict(folder: pathlib.Path, config: GateConfig) -> dict[str, torch.Tensor]:
    """The weights of an official checkpoint under trimkv's names (``layers.{l}.w1.weight``, ...), fp32."""
    file = folder / OFFICIAL_WEIGHTS
    raw = _load_tensors(file)
    names = _NAMES["swiglu" if config.gate_type == "rg3" else "mlp"]
    out, unknown = {}, []
    for key, tensor in raw.items():
        match = _KEY.search(key)
        name = names.get(match.group(2)) if match else None
        if name is None:
            unknown.append(key)
            continue
        out[f"layers.{int(match.group(1))}.{name}"] = tensor.detach().to("cpu", torch.float32)
    if unknown:
        raise CorruptCheckpointError(
            f"{file} holds entries that are not {config.gate_type} retention-gate weights: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; expected keys like "
            f"model.layers.0.self_attn.retention_gate.{next(iter(names))}")
    return out


def _load_tensors(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat {name: tensor} mapping; anything else is refused."""
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CorruptCheckpointError(
            f"{file} is not a plain tensor file that torch.load(weights_only=True) reads ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); trimkv never runs code from a checkpoint") from err
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{file} holds a {type(data).__name__}, not a mapping of names to tensors")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in data.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CorruptCheckpointError(f"{file} holds entries that are not tensors: {', '.join(bad[:5])}; "
                                     "only a flat mapping of names to tensors is read")
    return data



# ------------------------------------------------------------------------------------------- writing


def official_config(config: GateConfig, base_config: Any) -> dict[str, Any]:
    """The ``config.json`` of the authors' layout for gates of ``config``: ``base_config`` (the base model's
    transformers config) with their TRIM-KV fields. GateCheckpointError when their package cannot hold these gates."""
    kind = AUTHORS_NAME.get(config.gate_type)
    if kind is None:
        raise GateCheckpointError(
            f"{config.gate_type} gates have no equivalent in the authors' package (it has {sorted(GATE_TYPE_OF)}, "
            f"trimkv's {sorted(AUTHORS_NAME)}): keep them in trimkv's layout")
    check_compatible(config, base_config)
    data = base_config.to_dict()
    text = data.get("text_config") or data
    if text.get("hidden_act", "silu") != config.activation:
        raise GateCheckpointError(
            f"the gates use {config.activation!r}, but the authors' gates use the base model's hidden_act "
            f"({text.get('hidden_act')!r}): their package would compute other betas; keep these gates in trimkv's layout")
    if not config.base_model:
        raise GateCheckpointError("the gate checkpoint does not record its base model, which the authors' loader "
                                  "needs (config.base_model): re-save the gates with base_model set")
    kept = config.extra.get("official", {})
    data.update({k: v for k, v in kept.items() if k not in ("architectures", "model_type")})
    arch = ARCHITECTURES.get(text.get("model_type"))
    if arch is not None:
        data["architectures"] = [arch]
    data.update(base_model=config.base_model, retention_gate=kind, retention_gate_intermediate_size=config.gate_hidden,
                retention_gate_bias_init=float(config.bias_init), trainable_params=TRAINABLE)
    if config.train_budget is not None:
        data["memory_size"] = int(config.train_budget)
    return data


def official_weights(gates: RetentionGates) -> dict[str, torch.Tensor]:
    """The gates' weights under the authors' names (``model.layers.{l}.self_attn.retention_gate.linear1.weight``, ...),
    fp32 CPU copies: what ``trimkv_weights.pth`` holds."""
    if gates.config.gate_type not in AUTHORS_NAME:
        raise GateCheckpointError(f"{gates.config.gate_type} gates have no equivalent in the authors' package")
    theirs = {mine: name for name, mine in _NAMES["swiglu" if gates.config.gate_type == "rg3" else "mlp"].items()}
    out = {}
    for key, tensor in gates.fp32_state_dict().items():
        layer, name = key.split(".", 2)[1:]
        out[f"model.layers.{int(layer)}.self_attn.{TRAINABLE}.{theirs[name]}"] = tensor
    return out

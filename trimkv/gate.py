"""The retention gate: one small MLP per decoder layer that predicts log beta per KV head.

For token i entering layer l, the gate reads the layer's attention input x_i (the hidden state after the
input norm, the tensor q/k/v projections read) and emits

    log beta_i = logsigmoid(W2 silu(W1 x_i + b1) + b)          # [B, T, H_kv], fp32

Token i's retention at step t is beta_i^(t - i), i.e. log alpha_{t,i} = (t - i) * log beta_i <= 0.
The per-head bias b starts at 18 so that beta ~ 1 and the gated model starts equal to the frozen one.

Variants (``GateConfig.gate_type``):
  * ``"rg"``     - input is the attention input x_i (default, the paper's gate).
  * ``"rg2"``    - input is the post-RoPE key and the value of token i, concatenated per KV head
                   ([k_h; v_h] -> one logit for head h; weights shared across heads of a layer).
  * ``"rg2-all"`` - the authors' released ``rg2``: one MLP reads [k_1; v_1; ...; k_H; v_H] (every KV head of the
                   layer, flattened head by head) and emits one logit per head.
  * ``"rg3"``    - the authors' released ``rg3``: the ``rg2-all`` input through a SwiGLU body,
                   ``W2 (act(W1 x) * W3 x)`` (no biases but the per-head b).
  * ``"rg10"``   - DBTrimKV (arXiv 2605.09649, the authors' ``rg10`` with ``tie_retention_gate_layers``): a deeper
                   body per layer, x -> act(W1 x + b1) -> act(W2 . + b2), and ONE final projection and per-head bias
                   shared by all layers (:class:`SharedHead`, ``RetentionGates.shared``: one tensor each, stored
                   once, one gradient summed over layers), so one scale calibrates the scores of every layer and head
                   (what a global top-k over all of them needs).
``GateConfig.activation`` names the nonlinearity (transformers' ``ACT2FN`` names; ``"silu"`` by default; the
authors' gates use their base model's ``hidden_act``). The gate always runs in fp32, whatever the model's dtype:
beta^(t-i) over 10^4+ steps underflows in bf16.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .errors import GateMismatchError

GATE_TYPES = ("rg", "rg2", "rg2-all", "rg3", "rg10")   # the one list of gate types (the recipe's gates.gate_type)
KV_GATE_TYPES = ("rg2", "rg2-all", "rg3")     # gates that read the post-RoPE [k; v] instead of the attention input
SHARED_HEAD_TYPES = ("rg10",)                 # gates whose final projection and bias are shared by all layers
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu",
               "tanh", "sigmoid")             # parameter-free names of transformers' ACT2FN


@dataclass
class GateConfig:
    """Everything needed to rebuild a set of gates and to check them against a base model."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    gate_type: str = "rg"
    gate_hidden: int = 512
    bias_init: float = 18.0
    init_std: float = 0.02
    activation: str = "silu"
    # Provenance / training metadata, written into config.json (not used by the math).
    base_model: str | None = None
    base_revision: str | None = None
    train_budget: int | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    base_load_kwargs: dict[str, Any] = field(default_factory=dict)  # base_model.load_model(**kw) rebuilds the base
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type={self.gate_type!r} is unknown; choose one of {GATE_TYPES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; choose one of {ACTIVATIONS}")
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "gate_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GateConfig.{name} must be a positive integer, got {value!r}")
        for name in ("bias_init", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GateConfig.{name} must be a finite number, got {value!r}")
        if self.init_std < 0:
            raise ValueError(f"GateConfig.init_std must be >= 0, got {self.init_std!r}")

    @property
    def reads_kv(self) -> bool:
        """True when the gate reads the post-RoPE [k; v] of the new tokens (not the attention input)."""
        return self.gate_type in KV_GATE_TYPES

    @property
    def in_features(self) -> int:
        if self.gate_type in ("rg", "rg10"):
            return self.hidden_size
        per_head = 2 * self.head_dim
        return per_head if self.gate_type == "rg2" else self.num_kv_heads * per_head

    def num_parameters(self) -> int:
        """Gate parameters of all layers, as built by :class:`RetentionGates` (nothing is allocated; a shared head
        counts once)."""
        with torch.device("meta"):
            return sum(p.numel() for p in RetentionGates(self).parameters())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown gate config field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    @classmethod
    def for_model(cls, model_config: Any, **overrides: Any) -> "GateConfig":
        """Read layer count, hidden size and KV heads from a Hugging Face config."""
        cfg = getattr(model_config, "text_config", None) or model_config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        base = dict(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            base_model=getattr(cfg, "_name_or_path", None) or None,
        )
        base.update(overrides)
        return cls(**base)


class SharedHead(nn.Module):
    """The final projection and per-head bias that rg10 gates share across layers: h [..., width] -> logit [..., Hkv]."""

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.gate_hidden, cfg.num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((cfg.num_kv_heads,), float(cfg.bias_init)))
        nn.init.normal_(self.proj.weight, std=cfg.init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., width] on any device (layers split over devices share this head) -> logit [..., Hkv] on h's."""
        return (self.proj(h.to(self.bias.device)) + self.bias).to(h.device)


class RetentionGate(nn.Module):
    """Gate of one decoder layer: x -> log beta per KV head (fp32, <= 0).

    rg10 gates get the :class:`SharedHead` of all layers as ``shared``; it is held by reference, not registered
    here, so it appears once in the state dict (``shared.*`` of :class:`RetentionGates`) and in ``parameters()``.
    """

    def __init__(self, cfg: GateConfig, shared: SharedHead | None = None):
        super().__init__()
        self.gate_type = cfg.gate_type
        self.reads_kv = cfg.reads_kv          # called with the post-RoPE [k; v], else with the attention input
        self.num_kv_heads = cfg.num_kv_heads
        swiglu = cfg.gate_type == "rg3"
        self.w1 = nn.Linear(cfg.in_features, cfg.gate_hidden, bias=not swiglu)
        self.w3 = nn.Linear(cfg.in_features, cfg.gate_hidden, bias=False) if swiglu else None
        if cfg.gate_type in SHARED_HEAD_TYPES:
            if shared is None:
                raise ValueError(f"{cfg.gate_type} gates share their final projection: pass the SharedHead of all "
                                 "layers (build the gates with RetentionGates)")
            self.w2 = nn.Linear(cfg.gate_hidden, cfg.gate_hidden, bias=True)   # second body layer, per layer
            self.__dict__["shared"] = shared            # a reference, not a submodule: the tensors stay one
        else:
            self.w2 = nn.Linear(cfg.gate_hidden, 1 if cfg.gate_type == "rg2" else cfg.num_kv_heads, bias=False)
            self.bias = nn.Parameter(torch.full((cfg.num_kv_heads,), float(cfg.bias_init)))
        self.act = ACT2FN[cfg.activation]
        for lin in (self.w1, self.w3, self.w2):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.init_std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """rg / rg10: x [B, T, d]; rg2 / rg2-all / rg3: x = [k; v] [B, H_kv, T, 2*D]. Returns log beta [B, H_kv, T]."""
        return F.logsigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logit before the log-sigmoid, the per-head bias included: log beta = logsigmoid(logits) [B, H_kv, T]
        (fp32; what :mod:`trimkv.trace.pool` shifts per head)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.gate_type in ("rg2-all", "rg3"):
                x = x.transpose(1, 2).flatten(2)                    # [B, T, Hkv * 2D], head by head
            h = self.act(self.w1(x))
            if self.w3 is not None:
                h = h * self.w3(x)                                  # SwiGLU
            if self.gate_type in SHARED_HEAD_TYPES:
                return self.shared(self.act(self.w2(h))).transpose(1, 2)   # [B, Hkv, T]
            h = self.w2(h)                                          # rg2: [B, Hkv, T, 1]; else [B, T, Hkv]
            logit = h.squeeze(-1) if self.gate_type == "rg2" else h.transpose(1, 2)
            return logit + self.bias[:, None]                       # [B, Hkv, T]


class RetentionGates(nn.Module):
    """All gates of a model: ``gates[l]`` is layer l's :class:`RetentionGate`; ``gates.shared`` the final projection
    shared by all layers (rg10 only, else None)."""

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.config = cfg
        self.shared = SharedHead(cfg) if cfg.gate_type in SHARED_HEAD_TYPES else None
        self.layers = nn.ModuleList(RetentionGate(cfg, self.shared) for _ in range(cfg.num_layers))

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.cuda()`` / ``.half()`` on the model reach the gates through this: they follow device moves
        but stay fp32 (beta^(t-i) over 10^4+ steps underflows in bf16/fp16), so ``model.to(torch.bfloat16)`` after
        attaching keeps working."""
        def device_only(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return fn(t)
            return t.to(device=fn(t.new_empty(0)).device)
        return super()._apply(device_only, recurse)

    def __getitem__(self, idx: int) -> RetentionGate:
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """12 hex digits identifying the weights (evaluation results name the gates they measured by it)."""
        h = hashlib.sha1()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU fp32 contiguous clones of the weights: what checkpoints store (safetensors rejects shared or strided
        storage)."""
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in self.state_dict().items()}


def check_compatible(gate_config: GateConfig, model: Any) -> None:
    """Raise GateMismatchError, listing every difference, if the gates do not fit ``model``'s shape."""
    theirs = GateConfig.for_model(getattr(model, "config", model))
    checks = [
        ("num_layers", "{} layers", "{}"),
        ("hidden_size", "hidden size {}", "{}"),
        ("num_kv_heads", "{} KV heads", "{}"),
        ("head_dim", "head dim {}", "{}"),
    ]
    problems = [
        f"gates were trained for {what.format(getattr(gate_config, name))}, "
        f"this model has {has.format(getattr(theirs, name))}"
        for name, what, has in checks
        if getattr(gate_config, name) != getattr(theirs, name)
    ]
    if problems:
        raise GateMismatchError(
            "; ".join(problems)
            + f": wrong base model? (gates' base_model: {gate_config.base_model or 'unrecorded'}, "
            f"this model: {theirs.base_model or 'unknown'})"
        )


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an inf (gate weights must be finite everywhere)."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]

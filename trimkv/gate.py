"""The retention gate: one small MLP per decoder layer that predicts log beta per KV head.

For token i entering layer l, the gate reads the layer's attention input x_i (the hidden state after the
input norm, the tensor q/k/v projections read) and emits

    log beta_i = logsigmoid(W2 silu(W1 x_i + b1) + b)          # [B, T, H_kv], fp32

Token i's retention at step t is beta_i^(t - i), i.e. log alpha_{t,i} = (t - i) * log beta_i <= 0.
The per-head bias b starts at 18 so that beta ~ 1 and the gated model starts equal to the frozen one.

Variants (``GateConfig.gate_type``):
  * ``"rg"``  - input is the attention input x_i (default, the paper's gate).
  * ``"rg2"`` - input is the post-RoPE key and the value of token i, concatenated per KV head
                ([k_h; v_h] -> one logit for head h; weights shared across heads of a layer).
  * ``"rg10"`` - DBTrimKV (arXiv 2605.09649, the authors' ``rg10`` with ``tie_retention_gate_layers``): a deeper
                body per layer, x -> silu(W1 x + b1) -> silu(W2 . + b2), and ONE final projection W3 and per-head
                bias b shared by all layers, so one scale calibrates the scores of every layer and head (what a
                global top-k over all of them needs). The shared parameters are one tensor each
                (``RetentionGates.shared``): stored once, one gradient summed over layers.
The gate always runs in fp32, whatever the model's dtype: beta^(t-i) over 10^4+ steps underflows in bf16.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GateMismatchError

GATE_TYPES = ("rg", "rg2", "rg10")   # the one list of gate types (the recipe's gates.gate_type)
SHARED_HEAD_TYPES = ("rg10",)        # gate types whose final projection and bias are shared by all layers


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
    # Provenance / training metadata, written into config.json (not used by the math).
    base_model: str | None = None
    base_revision: str | None = None
    train_budget: int | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type={self.gate_type!r} is unknown; choose one of {GATE_TYPES}")
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "gate_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GateConfig.{name} must be a positive integer, got {getattr(self, name)!r}")

    @property
    def in_features(self) -> int:
        return 2 * self.head_dim if self.gate_type == "rg2" else self.hidden_size

    @property
    def reads_kv(self) -> bool:
        """True when the gate reads the post-RoPE [k; v] of a token (rg2), False when the attention input."""
        return self.gate_type == "rg2"

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
        return self.proj(h) + self.bias


class RetentionGate(nn.Module):
    """Gate of one decoder layer: x -> log beta per KV head (fp32, <= 0).

    rg10 gates get the :class:`SharedHead` of all layers as ``shared``; it is held by reference, not registered
    here, so it appears once in the state dict (``shared.*`` of :class:`RetentionGates`) and in ``parameters()``.
    """

    def __init__(self, cfg: GateConfig, shared: SharedHead | None = None):
        super().__init__()
        self.gate_type = cfg.gate_type
        self.reads_kv = cfg.reads_kv          # rg2: called with the post-RoPE [k; v], else with the attention input
        self.num_kv_heads = cfg.num_kv_heads
        self.w1 = nn.Linear(cfg.in_features, cfg.gate_hidden, bias=True)
        if cfg.gate_type in SHARED_HEAD_TYPES:
            if shared is None:
                raise ValueError(f"{cfg.gate_type} gates share their final projection: pass the SharedHead of all "
                                 "layers (build the gates with RetentionGates)")
            self.w2 = nn.Linear(cfg.gate_hidden, cfg.gate_hidden, bias=True)   # second body layer, per layer
            self.__dict__["shared"] = shared            # a reference, not a submodule: the tensors stay one
        else:
            self.w2 = nn.Linear(cfg.gate_hidden, 1 if cfg.reads_kv else cfg.num_kv_heads, bias=False)
            self.bias = nn.Parameter(torch.full((cfg.num_kv_heads,), float(cfg.bias_init)))
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=cfg.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """rg / rg10: x [B, T, d] -> log beta [B, H_kv, T].  rg2: x [B, H_kv, T, 2*D] -> log beta [B, H_kv, T]."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            h = F.silu(self.w1(x))
            if self.gate_type in SHARED_HEAD_TYPES:
                logit = self.shared(F.silu(self.w2(h))).transpose(1, 2)  # [B, Hkv, T]
            elif self.gate_type == "rg":
                logit = self.w2(h).transpose(1, 2) + self.bias[:, None]  # [B, Hkv, T]
            else:
                logit = self.w2(h).squeeze(-1) + self.bias[:, None]      # [B, Hkv, T]
            return F.logsigmoid(logit)


class RetentionGates(nn.Module):
    """All gates of a model: ``gates[l]`` is layer l's :class:`RetentionGate`; ``gates.shared`` the final projection
    shared by all layers (rg10 only, else None)."""

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.config = cfg
        self.shared = SharedHead(cfg) if cfg.gate_type in SHARED_HEAD_TYPES else None
        self.layers = nn.ModuleList(RetentionGate(cfg, self.shared) for _ in range(cfg.num_layers))

    def __getitem__(self, idx: int) -> RetentionGate:
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

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

"""KVP rankers (Moschella, Manduchi, Sener, "Learning to Evict from Key-Value Cache", arXiv 2602.10238, Sec. 3.1):
one small MLP per (layer, KV head) scoring a cached token from what the cache holds of it, its key, its value and
its position, ``f(x_i) = MLP_lh(k_i, v_i, pos_i)``; a higher score is a token to keep.

All heads of all layers live in one module with per-head weights (a batched matmul over heads), so one layer's
scores are a handful of kernels whatever the number of heads::

    w1  [L, H, 2D + 1, E]   first linear map of [k, v, phi(pos)] (the last row reads the position feature)
    b1  [L, H, E]
    w2  [L, H, E]           second linear map -> one score
    b2  [L, H]

    score = w2 . silu([k, v, phi(pos)] @ w1 + b1) + b2          # [B, H, T] fp32

Sizes: the paper's agents are 2-layer MLPs with 256 hidden units for Qwen2.5-7B (head dim 128, ~600K parameters
each, 112 agents). For SmolLM2-135M (head dim 64, 30 layers x 3 KV heads) the default here is 2 linear maps with
E = 64 hidden units (129 x 64 + 2 x 64 + 1 ~ 8.4K parameters per head, 0.76M in all, 3 MB in fp32): the model is
~50x smaller and the score runs at every decode step here (the paper scores once, after prefill).

Position feature: the paper feeds the raw position; here ``phi(pos) = log1p(pos) / log1p(pos_scale)`` (pos_scale:
the longest row trained on), which is ~1 at the trained lengths and grows slowly past them, so the score of a
token at a position never seen in training stays near the trained range. Training standardises k and v per
(layer, head, dim) and folds that affine map into ``w1`` / ``b1`` when it ends (:meth:`KVPRankers.fold_inputs_`), so
serving reads raw post-RoPE keys and values.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

FORMAT_KIND = "trimkv-kvp"


@dataclass
class KVPConfig:
    """What a set of rankers is: the base model it reads and the shape of its MLPs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden: int = 64                  # E, hidden units per head (the paper: 256 on a 7B model)
    pos_scale: int = 1024             # phi(pos) = log1p(pos) / log1p(pos_scale)
    base_model: str | None = None     # Hub id or folder name of the model whose keys / values were traced
    base_revision: str | None = None
    target: str = "future"            # the trace store's utility target the rankers were trained on
    objective: str = "expected"       # see trimkv.kvp.objective
    extra: dict = field(default_factory=dict)   # training record: store, steps, seconds, ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVPConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def for_model(cls, model_config, **overrides) -> "KVPConfig":
        """Layers, KV heads and head dim (and the base model's name) from a Hugging Face config."""
        cfg = getattr(model_config, "text_config", None) or model_config
        heads = cfg.num_attention_heads
        base = dict(num_layers=cfg.num_hidden_layers, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                    base_model=getattr(cfg, "_name_or_path", None) or None)
        return cls(**{**base, **overrides})

    @property
    def in_features(self) -> int:
        return 2 * self.head_dim + 1


def position_feature(pos: torch.Tensor, pos_scale: int) -> torch.Tensor:
    """phi(pos) = log1p(pos) / log1p(pos_scale), fp32 (padding, pos -1, reads as position 0)."""
    return torch.log1p(pos.clamp_min(0).to(torch.float32)) * (1.0 / math.log1p(pos_scale))


class KVPRankers(nn.Module):
    """Every (layer, KV head)'s ranker; :meth:`score` is one layer's keep-scores."""

    def __init__(self, config: KVPConfig, *, seed: int | None = None):
        super().__init__()
        self.config = config
        L, H, E, Din = config.num_layers, config.num_kv_heads, config.hidden, config.in_features
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.w1 = nn.Parameter(torch.randn(L, H, Din, E, generator=g) / math.sqrt(Din))
        self.b1 = nn.Parameter(torch.zeros(L, H, E))
        self.w2 = nn.Parameter(torch.randn(L, H, E, generator=g) / math.sqrt(E))
        self.b2 = nn.Parameter(torch.zeros(L, H))

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keep-scores [B, H, T] fp32 of layer ``layer``'s tokens: keys / values [B, H, T, D], pos [B, H, T]."""
        x = torch.cat([keys.float(), values.float(), position_feature(pos, self.config.pos_scale)[..., None]], -1)
        return self.score_features(layer, x)

    def score_features(self, layer: int | slice, x: torch.Tensor) -> torch.Tensor:
        """Scores [B, H, T] from ready features x [B, H, T, 2D + 1] (training passes standardised ones)."""
        B, H, T, Din = x.shape
        x = x.transpose(0, 1).reshape(H, B * T, Din)                          # a view when B = 1 (decode)
        h = torch.baddbmm(self.b1[layer][:, None, :], x, self.w1[layer])       # [H, B*T, E]: one batched matmul
        s = torch.baddbmm(self.b2[layer][:, None, None], F.silu(h), self.w2[layer][..., None])   # [H, B*T, 1]
        return s.view(H, B, T).transpose(0, 1)

    @torch.no_grad()
    def fold_inputs_(self, layer: int, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Make layer ``layer`` read raw features when it was trained on ``(x - shift) / scale`` (shift, scale
        [H, 2D + 1]): w1 <- w1 / scale, b1 <- b1 - (shift / scale) @ w1."""
        w = self.w1[layer] / scale[..., None]                                           # [H, Din, E]
        self.b1[layer] -= torch.einsum("hd,hde->he", shift, w)
        self.w1[layer] = w

    def fingerprint(self) -> str:
        """A short hash of the weights (what identifies the rankers an evaluation measured)."""
        h = hashlib.sha1()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={c.num_layers}, kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, hidden={c.hidden}"

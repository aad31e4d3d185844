"""Splice two gate checkpoints of one model: the gates of ``base``, with some layers' gates taken from ``other``.

Each layer's gate is independent (``RetentionGate``: its own weights and per-head bias), so gates learned two ways can
be combined layer by layer, e.g. distilled gates where the model builds its representations and trace-fitted gates
where it reads the facts back (``results/README.md``, "Which layers"). rg10 gates share their last layer across
layers and cannot be split.

    trimkv splice checkpoints/smollm2-135m-qa-m64 checkpoints/smollm2-135m-qa-fitted --layers 15-29 --out runs/hybrid
"""
from __future__ import annotations

import os

from ..errors import GateMismatchError
from ..gate import SHARED_HEAD_TYPES

# what two checkpoints must agree on for a layer of one to replace a layer of the other
SHAPE = ("gate_type", "gate_hidden", "activation", "num_layers", "num_kv_heads", "hidden_size", "head_dim")


def splice_gates(base, other, layers, *, base_name: str = "base", other_name: str = "other"):
    """``base`` (:class:`~trimkv.share.PretrainedGates`) with the gates of ``layers`` copied from ``other`` (in
    place; returned). The config records where each part came from (``extra["spliced"]``), with the other's
    trace-fit settings when it has them."""
    mine, theirs = base.config, other.config
    diff = [f"{k}: {getattr(mine, k)!r} vs {getattr(theirs, k)!r}" for k in SHAPE
            if getattr(mine, k) != getattr(theirs, k)]
    if diff:
        raise GateMismatchError(f"{base_name} and {other_name} hold gates of different shapes ({'; '.join(diff)}): "
                                "splice gates of one model, type and width")
    if mine.base_model != theirs.base_model:
        raise GateMismatchError(f"{base_name} was trained on {mine.base_model!r} and {other_name} on "
                                f"{theirs.base_model!r}: splice gates of one base model")
    if mine.gate_type in SHARED_HEAD_TYPES:
        raise GateMismatchError(f"{mine.gate_type} gates share their last layer across layers: they cannot be "
                                "spliced layer by layer")
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < mine.num_layers]
    if bad or not layers:
        raise ValueError(f"layers must be among 0..{mine.num_layers - 1} (got {bad or 'none'})")
    record = {"base": base_name, "base_fingerprint": base.fingerprint(), "other": other_name,
              "other_fingerprint": other.fingerprint(), "layers_from_other": layers}
    if "trace_fit" in theirs.extra:            # how the other's layers were fitted (the base's own record stays)
        record["other_trace_fit"] = theirs.extra["trace_fit"]
    for layer in layers:
        base[layer].load_state_dict(other[layer].state_dict())
    mine.extra = {**mine.extra, "spliced": record}
    return base


def splice_checkpoints(base: str | os.PathLike, other: str | os.PathLike, layers, out: str | os.PathLike):
    """Write the splice of two checkpoints (folders or Hub ids) to ``out``; returns its path."""
    from .card import public_name
    from .folder import load_gate_checkpoint, save_gates

    names = dict(base_name=public_name(str(base)) or "base", other_name=public_name(str(other)) or "other")
    gates = splice_gates(load_gate_checkpoint(base), load_gate_checkpoint(other), layers, **names)
    meta = {"spliced": f"{names['base_name']}, layers {layers_text(gates.config.extra['spliced']['layers_from_other'])}"
                       f" from {names['other_name']}"}
    return save_gates(gates, out, metadata=meta)


def layers_text(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            runs.append(f"{start}-{layer}" if layer > start else f"{start}")
            start = None
    return ",".join(runs)

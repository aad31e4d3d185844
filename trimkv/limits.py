"""Bounds on every size that comes from input (a recipe, a command line, a checkpoint's config.json), checked before
anything is allocated: a typo such as ``gate_hidden=1000000000000`` or ``--budget 1000000000`` ends in an error that
names the field, not in a machine that swaps for minutes.

Two kinds of bound:

* **plausibility** (:data:`MAX_TOKENS`, :data:`MAX_GATE_HIDDEN`, ...): far above any real model or run, checked where
  the value is read, before a model loads;
* **memory** (:func:`check_fits`): what an allocation would take against what the device has free, checked once the
  model (its shape and dtype) is known and before the allocation.

Config files are parsed by :func:`load_json` with a size and a nesting-depth limit. Nothing here imports torch at
import time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_TOKENS = 1 << 22          # budgets, prompt / sequence lengths, new tokens: 4M tokens per sequence
MAX_GATE_HIDDEN = 1 << 16     # a gate MLP's width (the paper: 512)
MAX_LAYERS = 1 << 12          # decoder layers a gate config may describe
MAX_HEADS = 1 << 12           # KV heads per layer
MAX_WIDTH = 1 << 18           # hidden size, head dim
MAX_JSON_BYTES = 1 << 20      # a config.json (a gate config is a few hundred bytes)
MAX_JSON_DEPTH = 32           # nesting of objects / arrays in a config.json
MEMORY_FRACTION = 0.9         # of the free memory one allocation may take


def load_json(text: str, *, where: str, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads(text)`` for a config file, refusing (ValueError naming ``where``) a text over ``max_bytes`` or
    nested deeper than ``max_depth`` before it is parsed."""
    if len(text) > max_bytes:
        raise ValueError(f"{where} holds {len(text):,} characters, more than a config file may ({max_bytes:,})")
    depth, deepest, in_string, escaped = 0, 0, False, False
    for ch in text:                        # brackets outside strings
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                raise ValueError(f"{where} nests objects / arrays deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1
    return json.loads(text)


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes free for a new allocation on ``device`` (a CUDA GPU's free memory, the host's available RAM), or None
    when unknown (then nothing is refused)."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if kind != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, device: Any, *, what: str, fix: str, error: type[Exception] = MemoryError) -> None:
    """Raise ``error`` when ``nbytes`` exceed :data:`MEMORY_FRACTION` of what ``device`` has free; the message says
    ``what`` needs it and ``fix``."""
    free = available_memory(device)
    if free is not None and nbytes > MEMORY_FRACTION * free:
        raise error(f"{what} needs {_size(nbytes)} on {device}, which has {_size(free)} free: {fix}")


def kv_bytes(model_config: Any, budget: int, *, element_size: int, batch: int = 1) -> int:
    """Bytes of a bounded cache of ``budget`` tokens per (layer, KV head): keys and values of ``element_size`` bytes
    per number, plus a position (8 bytes) and a score (4 bytes) per slot."""
    cfg = getattr(model_config, "text_config", None) or model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    slots = batch * cfg.num_hidden_layers * kv_heads * budget
    return slots * (2 * head_dim * element_size + 12)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:,.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes} B"

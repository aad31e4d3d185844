"""trimkv: train, share and serve TRIM-KV retention gates on frozen Hugging Face causal LMs.

Importing trimkv has no side effects: the ``"trimkv"`` attention implementation is registered with transformers
when hooks are installed (``attach_gates``, ``load_gates``, ``install_hooks`` or ``make_cache``);
``cache_implementation="trimkv"`` and the ``"trimkv-text-generation"`` pipeline when you call
``register_with_transformers()``. The public names
below are imported on first use, so ``import trimkv`` (and ``trimkv --help`` / ``--version``) does not load torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "GateConfig": ".gate",
    "RetentionGate": ".gate",
    "RetentionGates": ".gate",
    "PretrainedGates": ".share",
    "GateHandle": ".attach",
    "attach_gates": ".attach",
    "detach_gates": ".attach",
    "gates_disabled": ".attach",
    "install_hooks": ".attach",
    "make_cache": ".serve",
    "RetentionCache": ".serve",
    "GlobalRetentionCache": ".serve",
    "SoftRetentionCache": ".serve",
    "EvictionPolicy": ".serve",
    "RetentionPolicy": ".serve",
    "get_policy": ".serve",
    "save_gates": ".share",
    "load_gates": ".share",
    "load_gate_checkpoint": ".share",
    "push_to_hub": ".share",
    "convert_checkpoint": ".share",
    "export_checkpoint": ".share",
    "prefill": ".serve",
    "generate": ".serve",
    "CompiledDecoder": ".serve",
    "fast_generate": ".serve",
    "answer": ".serve",
    "Answers": ".serve",
    "register_with_transformers": ".serve",
    "add_lora": ".lora",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trimkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value          # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:   # what static tools see; at run time the names above resolve on first use
    from .attach import GateHandle, attach_gates, detach_gates, gates_disabled, install_hooks
    from .gate import GateConfig, RetentionGate, RetentionGates
    from .lora import add_lora
    from .serve import (Answers, CompiledDecoder, EvictionPolicy, GlobalRetentionCache, RetentionCache,
                        RetentionPolicy, SoftRetentionCache, answer, fast_generate, generate, get_policy, make_cache,
                        prefill, register_with_transformers)
    from .share import (PretrainedGates, convert_checkpoint, export_checkpoint, load_gate_checkpoint, load_gates,
                        push_to_hub, save_gates)

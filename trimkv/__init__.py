"""trimkv: train, share and serve TRIM-KV retention gates on frozen Hugging Face causal LMs.

Importing trimkv has no side effects: the ``"trimkv"`` attention implementation is registered with transformers
when hooks are installed (``attach_gates``, ``load_gates``, ``install_hooks`` or ``make_cache``);
``cache_implementation="trimkv"`` and the ``"trimkv-text-generation"`` pipeline when you call
``register_with_transformers()``.
"""
from .attach import GateHandle, attach_gates, detach_gates, gates_disabled, install_hooks
from .share import (PretrainedGates, convert_checkpoint, export_checkpoint, load_gate_checkpoint, load_gates,
                    push_to_hub, save_gates)
from .gate import GateConfig, RetentionGate, RetentionGates
from .lora import add_lora
from ._version import __version__
from .serve import (Answers, CompiledDecoder, EvictionPolicy, GlobalRetentionCache, RetentionCache, RetentionPolicy,
                    SoftRetentionCache, answer, fast_generate, generate, get_policy, make_cache, prefill,
                    register_with_transformers)

__all__ = [
    "GateConfig",
    "RetentionGate",
    "RetentionGates",
    "PretrainedGates",
    "GateHandle",
    "attach_gates",
    "detach_gates",
    "gates_disabled",
    "install_hooks",
    "make_cache",
    "RetentionCache",
    "GlobalRetentionCache",
    "SoftRetentionCache",
    "EvictionPolicy",
    "RetentionPolicy",
    "get_policy",
    "save_gates",
    "load_gates",
    "load_gate_checkpoint",
    "push_to_hub",
    "convert_checkpoint",
    "export_checkpoint",
    "prefill",
    "generate",
    "CompiledDecoder",
    "fast_generate",
    "answer",
    "Answers",
    "register_with_transformers",
    "add_lora",
]

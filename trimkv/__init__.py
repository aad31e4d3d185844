"""trimkv: train, share and serve TRIM-KV retention gates on frozen Hugging Face causal LMs.

Importing trimkv has no side effects: the ``"trimkv"`` attention implementation is registered with transformers
when gates are attached.
"""
from .attach import GateHandle, attach_gates, detach_gates, gates_disabled
from .cache import RetentionCache
from .share import convert_checkpoint, load_gate_checkpoint, load_gates, push_to_hub, save_gates
from .decode import CompiledDecoder, fast_generate
from .gate import GateConfig, RetentionGate, RetentionGates
from .generate import generate
from .global_cache import GlobalRetentionCache
from .lora import add_lora
from .pipeline import Answers, answer
from .policies import EvictionPolicy, RetentionPolicy, get_policy

__version__ = "0.1.0"

__all__ = [
    "GateConfig",
    "RetentionGate",
    "RetentionGates",
    "GateHandle",
    "attach_gates",
    "detach_gates",
    "gates_disabled",
    "RetentionCache",
    "GlobalRetentionCache",
    "EvictionPolicy",
    "RetentionPolicy",
    "get_policy",
    "save_gates",
    "load_gates",
    "load_gate_checkpoint",
    "push_to_hub",
    "convert_checkpoint",
    "generate",
    "CompiledDecoder",
    "fast_generate",
    "answer",
    "Answers",
    "add_lora",
]

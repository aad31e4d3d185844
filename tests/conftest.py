"""Shared fixtures: tiny randomly initialised causal LMs of the supported families (one factory for all tests)."""
from __future__ import annotations

import copy

import pytest
import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")

# vocab 128, hidden 64, 2 layers, 4 query heads, 2 KV heads (GQA), head_dim 16; pad/bos/eos = 0/1/2.
_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)
_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", {}),
}


def tiny_config(family: str = "llama", **overrides):
    """The config of a tiny model of ``family`` (a fresh object: from_config mutates the config it gets)."""
    import transformers

    cls_name, extra = _CONFIGS[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra, **overrides})


def build_tiny_model(family: str = "llama", *, seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM in eval mode, fp32, on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config(family, **overrides)))
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("qwen3", seed=1)`` -> a fresh tiny model (each call builds a new one)."""
    return build_tiny_model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param

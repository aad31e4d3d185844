"""Loading base models: the checkpoint's own dtype by default, devices by name, inputs to the embedding's device."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from trimkv import base_model


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory, tokenizer):
    """A tiny model saved in bf16, with its tokenizer (what a Hub checkpoint in bf16 looks like)."""
    folder = tmp_path_factory.mktemp("bf16-model")
    build_tiny_model("qwen3", vocab_size=len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_dtype_auto_keeps_the_checkpoints_dtype(bf16_folder):
    model, tok = base_model.load_model(str(bf16_folder))
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    model, _ = base_model.load_model(str(bf16_folder), dtype="float32", device="cpu")
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_dtype_names_the_choices(bf16_folder):
    with pytest.raises(ValueError, match="auto"):
        base_model.load_model(str(bf16_folder), dtype="fp8")


def test_device_auto_picks_cuda_only_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base_model.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert base_model.resolve_device("auto") == "cuda"
    assert base_model.resolve_device("cuda:1") == "cuda:1" and base_model.resolve_device(None) is None


def test_device_map_is_passed_through(bf16_folder, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        kwargs.pop("device_map")
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    base_model.load_model(str(bf16_folder), device="cuda", device_map={"": "cpu"})   # device_map wins over device
    assert seen["device_map"] == {"": "cpu"} and seen["dtype"] == "auto"


def test_inputs_go_to_the_embeddings_device():
    model = build_tiny_model("llama")
    model.get_input_embeddings().to("meta")
    assert base_model.input_device(model) == torch.device("meta")

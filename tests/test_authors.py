"""The authors' released gates (``ngocbh/trimkv`` layout): read exactly, loaded directly or converted, refused when the
weights file is anything but tensors. Every checkpoint here is written by the test itself in that layout (no network).
"""
from __future__ import annotations

import copy
import json
import pathlib

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from conftest import build_tiny_model, tiny_config
from trimkv import load_gates, make_cache
from trimkv.cli import main as cli_main
from trimkv.compat import cache_kwargs
from trimkv.share import (CorruptCheckpointError, base_model_for, convert_checkpoint, load_gate_checkpoint,
                          load_gate_config)
from trimkv.share.authors import OFFICIAL_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 8                    # retention_gate_intermediate_size of the tiny gates
PARAMS = {"rg": ["linear1.weight", "linear1.bias", "linear2.weight", "bias"],
          "rg2": ["linear1.weight", "linear1.bias", "linear2.weight", "bias"],
          "rg3": ["gate_proj.weight", "up_proj.weight", "down_proj.weight", "bias"]}


def official_weights(kind: str, cfg, *, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """What the authors' ``trimkv_weights.pth`` holds for a model of ``cfg`` (random values, their key names)."""
    g = torch.Generator().manual_seed(seed)
    H, D, d = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    n_in = d if kind == "rg" else 2 * H * D
    shapes = {"linear1.weight": (WIDTH, n_in), "linear1.bias": (WIDTH,), "linear2.weight": (H, WIDTH),
              "gate_proj.weight": (WIDTH, n_in), "up_proj.weight": (WIDTH, n_in), "down_proj.weight": (H, WIDTH),
              "bias": (H,)}
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for name in PARAMS[kind]:
            t = torch.randn(shapes[name], generator=g) * (0.3 if name != "bias" else 1.0)
            if name == "bias":
                t += 3.0                          # beta ~ 0.95: retention matters, tokens are not all forgotten
            out[f"model.layers.{layer}.self_attn.retention_gate.{name}"] = t.to(dtype)
    return out


def write_official(folder: pathlib.Path, kind: str = "rg", *, family: str = "qwen3", hidden_act: str = "silu",
                   seed: int = 0, weights: dict | None = None) -> pathlib.Path:
    """An official checkpoint folder: the base config + TRIM-KV fields, and torch.save of the gate entries."""
    cfg = tiny_config(family, hidden_act=hidden_act)
    folder.mkdir(parents=True, exist_ok=True)
    data = cfg.to_dict()
    data.update(base_model=f"tiny/{family}", retention_gate=kind, retention_gate_intermediate_size=WIDTH,
                retention_gate_bias_init=10.0, trainable_params="self_attn.retention_gate", memory_size=512,
                buffer_size=128, architectures=[f"TrimKV{family.title()}ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(data))
    torch.save(official_weights(kind, cfg, seed=seed) if weights is None else weights, folder / OFFICIAL_WEIGHTS)
    return folder


def authors_gate(weights: dict, layer: int, kind: str, act: str, x: torch.Tensor) -> torch.Tensor:
    """The authors' gate maths: rg reads x [B, T, d]; rg2 / rg3 read [k; v] [B, H, T, 2D], flattened head by head.
    Returns log beta [B, T, H]."""
    w = {k.rsplit("retention_gate.", 1)[1]: v.float() for k, v in weights.items() if f"layers.{layer}." in k}
    f = ACT2FN[act]
    if kind != "rg":
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    if kind == "rg3":
        h = F.linear(f(F.linear(x, w["gate_proj.weight"])) * F.linear(x, w["up_proj.weight"]), w["down_proj.weight"])
    else:
        h = F.linear(f(F.linear(x, w["linear1.weight"], w["linear1.bias"])), w["linear2.weight"])
    return F.logsigmoid(h + w["bias"])


@pytest.mark.parametrize("kind,act", [("rg", "silu"), ("rg2", "silu"), ("rg3", "silu"), ("rg", "gelu_pytorch_tanh")])
def test_converted_gates_compute_the_authors_log_beta(tmp_path, kind, act):
    folder = write_official(tmp_path / "official", kind, hidden_act=act)
    gates = load_gate_checkpoint(folder)
    cfg = gates.config
    assert (cfg.gate_type, cfg.activation, cfg.gate_hidden) == ({"rg": "rg", "rg2": "rg2-all", "rg3": "rg3"}[kind],
                                                                 act, WIDTH)
    assert cfg.base_model == "tiny/qwen3" and cfg.train_budget == 512 and cfg.extra["official"]["buffer_size"] == 128
    weights = torch.load(folder / OFFICIAL_WEIGHTS, weights_only=True)
    x = torch.randn(2, 5, 64) if kind == "rg" else torch.randn(2, 2, 5, 32)
    for layer in range(cfg.num_layers):
        want = authors_gate(weights, layer, kind, act, x)                  # [B, T, H]
        torch.testing.assert_close(gates[layer](x), want.transpose(1, 2), rtol=0, atol=1e-6)


def _logits_and_generation(model, ids):
    """Gated logits (soft retention attention) and a greedy bounded-cache continuation."""
    with torch.no_grad():
        logits = model(ids).logits
        cache = make_cache(model, "trimkv", 12, sink=2, window=4)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
                             prefill_chunk_size=8, pad_token_id=0)
    return logits, out[0, ids.shape[1]:]


@pytest.mark.parametrize("kind", ["rg", "rg2", "rg3"])
def test_official_folder_and_its_conversion_give_equal_outputs(tmp_path, kind):
    folder = write_official(tmp_path / "official", kind)
    base = build_tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    direct = copy.deepcopy(base)
    load_gates(direct, folder)
    logits, tokens = _logits_and_generation(direct, ids)
    with direct.trimkv.disabled(), torch.no_grad():
        assert not torch.allclose(direct(ids).logits, logits, atol=1e-4)   # the gates do act on the outputs
    out = convert_checkpoint(folder, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    converted = copy.deepcopy(base)
    load_gates(converted, out)
    logits2, tokens2 = _logits_and_generation(converted, ids)
    assert torch.equal(logits, logits2) and torch.equal(tokens, tokens2)


def test_hub_id_in_the_authors_layout_and_its_base_model(tmp_path, monkeypatch):
    folder = write_official(tmp_path / "snapshot", "rg")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    config = load_gate_config("ngocbh/TrimKV-Tiny-Math")
    assert OFFICIAL_WEIGHTS in calls[0][1]["allow_patterns"]
    assert base_model_for(config) == "tiny/qwen3"
    gates = load_gate_checkpoint("ngocbh/TrimKV-Tiny-Math@v1")
    assert calls[-1][1]["revision"] == "v1" and len(gates) == 2


def test_cli_convert_writes_a_trimkv_checkpoint_with_public_names(tmp_path, capsys):
    folder = write_official(tmp_path / "official", "rg2")
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 0
    out = pathlib.Path(capsys.readouterr().out.strip())
    gates = load_gate_checkpoint(out)
    assert gates.config.gate_type == "rg2-all" and gates.config.extra["converted_from"] == "official"
    for name in ("config.json", "README.md"):
        assert str(tmp_path) not in (out / name).read_text()             # no absolute local path is published
    assert "load_model('tiny/qwen3')" in (out / "README.md").read_text()


class NotATensor:
    pass


@pytest.mark.parametrize("payload,match", [
    ({"model.layers.0.self_attn.retention_gate.bias": "not a tensor"}, "not tensors"),
    ([torch.zeros(2)], "not a mapping"),
    ({"model.layers.0.self_attn.retention_gate.bias": NotATensor()}, "weights_only"),
])
def test_weights_that_are_not_plain_tensors_are_refused(tmp_path, payload, match):
    folder = write_official(tmp_path / "official", "rg", weights=payload)
    with pytest.raises(CorruptCheckpointError, match=match):
        load_gate_checkpoint(folder)


def test_unknown_or_misshaped_entries_are_named(tmp_path):
    cfg = tiny_config("qwen3")
    weights = official_weights("rg", cfg)
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(CorruptCheckpointError, match="q_proj"):
        load_gate_checkpoint(write_official(tmp_path / "a", "rg", weights=weights))
    weights = official_weights("rg", cfg)
    weights["model.layers.1.self_attn.retention_gate.linear2.weight"] = torch.zeros(3, WIDTH)
    with pytest.raises(CorruptCheckpointError, match="layers.1.w2.weight"):
        load_gate_checkpoint(write_official(tmp_path / "b", "rg", weights=weights))


def test_eval_commands_default_to_the_gates_base_model(tmp_path, monkeypatch):
    from trimkv.eval import cli as eval_cli

    folder = write_official(tmp_path / "official", "rg")
    seen = {}
    monkeypatch.setattr("trimkv.base_model.load_model", lambda name, **kw: seen.update(name=name, **kw) or (None, None))
    parser = __import__("argparse").ArgumentParser()
    eval_cli.add_model_args(parser)
    eval_cli.load_for_gates(parser.parse_args(["--gates", str(folder), "--device", "cpu"]))
    assert seen == {"name": "tiny/qwen3", "dtype": "auto", "device": "cpu", "device_map": None}


def test_pushing_the_authors_layout_asks_for_a_conversion_first(tmp_path, fake_hub):
    from trimkv.share import GateCheckpointError, push_to_hub

    with pytest.raises(GateCheckpointError, match="trimkv convert"):
        push_to_hub(write_official(tmp_path / "official", "rg"), "me/g")
    assert fake_hub.uploads == []

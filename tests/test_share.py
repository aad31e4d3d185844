"""Gate checkpoints: exact round trips, teaching errors, Hub paths (no network), atomic saves."""
from __future__ import annotations

import json
import os
import pathlib

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from trimkv.gate import GateConfig, RetentionGates, check_compatible
from trimkv.share import folder as ckpt
from trimkv.share import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    GateCheckpointError,
    GateMismatchError,
    load_gate_checkpoint,
    parse_source,
    push_to_hub,
    save_gates,
)


def make_gates(gate_type: str = "rg", num_layers: int = 2, seed: int = 0) -> RetentionGates:
    """Small gates shaped like the tiny Llama below, with non-trivial (random) weights everywhere."""
    torch.manual_seed(seed)
    cfg = GateConfig(
        num_layers=num_layers, hidden_size=64, num_kv_heads=2, head_dim=16, gate_type=gate_type, gate_hidden=8,
        base_model="tiny/llama", base_revision="abc123", train_budget=128,
        loss_weights={"kl": 1.0, "ntp": 0.5, "cap": 2.0}, extra={"note": "test"},
    )
    gates = RetentionGates(cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(torch.randn_like(p))
    return gates


@pytest.fixture
def saved(tmp_path) -> pathlib.Path:
    return save_gates(make_gates(), tmp_path / "gates", metadata={"steps": 100, "data": "toy"})


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def assert_same_gates(a: RetentionGates, b: RetentionGates) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k].dtype == torch.float32, k
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("gate_type", ["rg", "rg2", "rg10"])
def test_round_trip_is_exact(tmp_path, gate_type):
    gates = make_gates(gate_type)
    loaded = load_gate_checkpoint(save_gates(gates, tmp_path / "g"))
    assert_same_gates(gates, loaded)
    x = torch.randn(1, 5, 64) if gate_type != "rg2" else torch.randn(1, 2, 5, 32)
    assert torch.equal(gates[0](x), loaded[0](x))


def test_rg10_shared_projection_is_saved_once_and_loaded_tied(tmp_path):
    gates = make_gates("rg10", num_layers=3)
    folder = save_gates(gates, tmp_path / "g")
    stored = load_file(str(folder / "model.safetensors"))
    assert sorted(k for k in stored if "shared" in k) == ["shared.bias", "shared.proj.weight"]
    assert sum(t.numel() for t in stored.values()) == gates.config.num_parameters() == gates.num_parameters()
    loaded = load_gate_checkpoint(folder)
    assert all(layer.shared is loaded.shared for layer in loaded.layers)
    with torch.no_grad():
        loaded.shared.proj.weight.zero_()                     # one tensor: every layer sees the change
    assert all(torch.equal(layer.shared.proj.weight, torch.zeros(2, 8)) for layer in loaded.layers)


def test_round_trip_from_bf16_module_saves_fp32(tmp_path):
    gates = make_gates()
    loaded = load_gate_checkpoint(save_gates(gates.to(torch.bfloat16), tmp_path / "g"))
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, gates.state_dict()[k].float()), k


def test_folder_is_readable_by_a_person(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["base_model"] == "tiny/llama"
    assert config["num_layers"] == 2 and config["num_kv_heads"] == 2 and config["train_budget"] == 128
    assert config["format_version"] == 1 and isinstance(config["trimkv_version"], str)
    assert set(load_file(str(saved / "model.safetensors"))) == set(make_gates().state_dict())


def test_model_card_front_matter_and_metadata(saved):
    text = (saved / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "trimkv", "base_model": "tiny/llama", "tags": ["trimkv", "kv-cache"]}
    for needle in ("`rg`", "| Layers | 2 |", "128 tokens", "kl=1.0", "**steps**: 100", "**data**: toy"):
        assert needle in text, needle


def test_model_card_without_base_model(tmp_path):
    cfg = GateConfig(num_layers=1, hidden_size=8, num_kv_heads=1, head_dim=8, gate_hidden=4)
    text = ckpt.write_model_card(tmp_path / "README.md", cfg).read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in front and front["library_name"] == "trimkv"
    assert f"{RetentionGates(cfg).num_parameters():,}" in text  # parameter count matches the real module


# ------------------------------------------------------------------------------------------ bad folders


def test_truncated_safetensors_is_corrupt(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*truncated"):
        load_gate_checkpoint(saved)


def test_garbage_safetensors_header_is_corrupt(saved):
    (saved / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CorruptCheckpointError, match="safetensors"):
        load_gate_checkpoint(saved)


def test_bad_json_is_corrupt(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_gate_checkpoint(saved)


def test_unknown_config_field_is_corrupt(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_layerz"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="num_layerz"):
        load_gate_checkpoint(saved)


def test_newer_format_version_asks_for_upgrade(saved):
    config = json.loads((saved / "config.json").read_text())
    config["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="upgrade trimkv"):
        load_gate_checkpoint(saved)


def test_missing_and_extra_keys_are_named(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    del tensors["layers.1.w2.weight"]
    tensors["layers.9.bias"] = torch.zeros(2)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError) as err:
        load_gate_checkpoint(saved)
    assert "missing key 'layers.1.w2.weight'" in str(err.value)
    assert "unexpected key 'layers.9.bias'" in str(err.value)


def test_wrong_shape_is_named(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["layers.0.w1.weight"] = torch.zeros(8, 65)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"'layers.0.w1.weight' has shape \(8, 65\)"):
        load_gate_checkpoint(saved)


def test_config_and_weights_from_different_saves(tmp_path):
    a = save_gates(make_gates(num_layers=2), tmp_path / "a")
    b = save_gates(make_gates(num_layers=3), tmp_path / "b")
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(CorruptCheckpointError, match="unexpected key 'layers.2"):
        load_gate_checkpoint(a)


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no gate checkpoint at .*nope.*config.json"):
        load_gate_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file_is_not_found(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match=f"has no {name}"):
        load_gate_checkpoint(saved)
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_gate_checkpoint(saved)


def test_error_hierarchy():
    assert issubclass(CheckpointNotFoundError, GateCheckpointError)
    assert issubclass(CorruptCheckpointError, ValueError)
    assert issubclass(GateMismatchError, GateCheckpointError) and issubclass(GateMismatchError, ValueError)


# ------------------------------------------------------------------------------------------ model check


def test_check_compatible_passes_for_matching_model(tiny_llama):
    check_compatible(make_gates().config, tiny_llama)
    check_compatible(make_gates("rg2").config, tiny_llama)


def test_check_compatible_names_every_mismatch(tiny_llama):
    with pytest.raises(GateMismatchError, match="3 layers, this model has 2.*wrong base model.*tiny/llama"):
        check_compatible(make_gates(num_layers=3).config, tiny_llama)
    cfg = GateConfig(num_layers=3, hidden_size=32, num_kv_heads=4, head_dim=8)
    with pytest.raises(GateMismatchError) as err:
        check_compatible(cfg, tiny_llama)
    for needle in ("layers", "hidden size 32", "4 KV heads", "head dim 8"):
        assert needle in str(err.value)


def test_load_gates_checks_then_attaches(saved, tiny_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(ckpt, "attach_gates", lambda model, gates, **kw: calls.append((model, gates, kw)) or "h")
    assert ckpt.load_gates(tiny_llama, saved, mode="x") == "h"
    model, gates, kw = calls[0]
    assert model is tiny_llama and kw == {"mode": "x", "adapters": None} and gates.layers[0].w1.weight.dtype == torch.float32
    wrong = save_gates(make_gates(num_layers=3), saved.parent / "wrong")
    with pytest.raises(GateMismatchError):
        ckpt.load_gates(tiny_llama, wrong)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- Hub


@pytest.mark.parametrize("source, expected", [
    ("user/name", ("user/name", None)),
    ("user/name@main", ("user/name", "main")),
    ("user/name@v1.0", ("user/name", "v1.0")),
    ("user/name@" + "a" * 40, ("user/name", "a" * 40)),
    ("name", ("name", None)),
])
def test_parse_source(source, expected):
    assert parse_source(source) == expected


@pytest.mark.parametrize("source", ["user/name@", "@main"])
def test_parse_source_rejects_empty_parts(source):
    with pytest.raises(ValueError):
        parse_source(source)


def test_hub_source_goes_through_snapshot_download(saved, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    gates = load_gate_checkpoint("user/gates@v2", local_files_only=True)
    assert gates.config.base_model == "tiny/llama"
    repo_id, kwargs = calls[0]
    assert repo_id == "user/gates" and kwargs["revision"] == "v2" and kwargs["local_files_only"] is True
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "config.json", "lora/adapter_config.json",
                                                "lora/adapter_model.safetensors", "model.safetensors",
                                                "trimkv_weights.pth"]
    load_gate_checkpoint("user/gates", revision="dev")
    assert calls[1][1]["revision"] == "dev"
    with pytest.raises(ValueError, match="give one"):
        load_gate_checkpoint("user/gates@v2", revision="dev")


def test_local_files_only_follows_hf_hub_offline(saved, monkeypatch):
    seen = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda r, **kw: seen.append(kw) or str(saved))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_gate_checkpoint("user/gates")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load_gate_checkpoint("user/gates")
    assert [kw["local_files_only"] for kw in seen] == [True, False]


def test_hub_cache_layout_loads_offline(saved, tmp_path, monkeypatch):
    """A real snapshot_download over a hand-built Hub cache (refs/main -> snapshots/<sha>), no network."""
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--user--gates"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.parent.mkdir()
    os.rename(saved, snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gates = load_gate_checkpoint("user/gates")
    assert_same_gates(make_gates(), gates)


def test_unknown_repo_offline_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="neither a local folder nor a cached/reachable Hub repo"):
        load_gate_checkpoint("nobody-xyz/no-such-gates")


def test_local_folder_wins_over_repo_id(saved, monkeypatch):
    monkeypatch.chdir(saved.parent.parent)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the Hub"))
    load_gate_checkpoint(f"{saved.parent.name}/{saved.name}")


class FakeApi:
    """Records HfApi calls instead of talking to the Hub."""

    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        folder = pathlib.Path(kwargs["folder_path"])
        FakeApi.uploaded = sorted(p.name for p in folder.iterdir())
        FakeApi.card = (folder / "README.md").read_text()
        return "https://huggingface.co/user/gates/commit/abc"


def test_push_to_hub_validates_then_uploads(saved, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(saved, "user/gates", private=True, token="tok", revision="v1")
    assert url == "https://huggingface.co/user/gates/commit/abc"
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[0] == ("init", "tok")
    assert FakeApi.calls[1][2]["private"] is True and FakeApi.calls[1][2]["exist_ok"] is True
    upload = FakeApi.calls[3][1]
    assert pathlib.Path(upload["folder_path"]).name == saved.name and upload["revision"] == "v1"
    assert upload["repo_id"] == "user/gates" and upload["commit_message"] == "Upload trimkv gates"
    assert FakeApi.uploaded == ["README.md", "config.json", "model.safetensors"]
    assert "load_gates(model, 'user/gates@v1')" in FakeApi.card          # the uploaded card names the repo
    assert "user/gates" not in (saved / "README.md").read_text()          # the local folder is not changed


def test_push_to_hub_refuses_a_broken_checkpoint(saved, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (saved / "config.json").write_text("{")
    with pytest.raises(CorruptCheckpointError):
        push_to_hub(saved, "user/gates")
    assert FakeApi.calls == []


# ------------------------------------------------------------------------------------------ atomic save


def test_save_over_existing_checkpoint_replaces_it(tmp_path):
    path = save_gates(make_gates(seed=0), tmp_path / "g")
    new = make_gates(seed=1)
    save_gates(new, path)
    assert_same_gates(new, load_gate_checkpoint(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp or old dirs left behind


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = make_gates(seed=0)
    path = save_gates(old, tmp_path / "g")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_gates(make_gates(seed=1), path)
    assert_same_gates(old, load_gate_checkpoint(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        save_gates(make_gates(), tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "my-model"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GateCheckpointError, match="not a trimkv checkpoint"):
        save_gates(make_gates(), foreign)
    assert (foreign / "config.json").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GateCheckpointError, match="is a file"):
        save_gates(make_gates(), tmp_path / "afile")


def test_save_into_empty_existing_folder(tmp_path):
    (tmp_path / "g").mkdir()
    assert_same_gates(make_gates(), load_gate_checkpoint(save_gates(make_gates(), tmp_path / "g")))

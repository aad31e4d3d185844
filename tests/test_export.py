"""`trimkv export --format authors`: gates trained here, written in the TRIM-KV authors' layout, compute in their
package's maths what they compute here, carry the config fields their loader reads, and read back exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from test_authors import authors_gate
from trimkv import PretrainedGates, save_gates
from trimkv.cli import main as cli_main
from trimkv.errors import RecipeError
from trimkv.gate import GateConfig
from trimkv.share import GateCheckpointError, export_checkpoint, load_gate_checkpoint
from trimkv.share.authors import OFFICIAL_WEIGHTS
from trimkv.shipped import copy_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

THEIR_KIND = {"rg": "rg", "rg2-all": "rg2", "rg3": "rg3"}


def trained(gate_type: str, activation: str = "silu", family: str = "llama") -> PretrainedGates:
    cfg = GateConfig.for_model(tiny_config(family), gate_type=gate_type, gate_hidden=8, activation=activation,
                               base_model=f"tiny/{family}", train_budget=64)
    gates = PretrainedGates(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(torch.randn_like(p) * 0.3)              # not the init: every weight matters
    return gates


@pytest.mark.parametrize("gate_type,act", [("rg", "silu"), ("rg2-all", "silu"), ("rg3", "silu"),
                                           ("rg", "gelu_pytorch_tanh")])
def test_exported_gates_compute_the_same_log_beta_in_the_authors_maths(tmp_path, gate_type, act):
    gates = trained(gate_type, act)
    src = save_gates(gates, tmp_path / "mine")
    out = export_checkpoint(src, tmp_path / "theirs", base_config=tiny_config("llama", hidden_act=act))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", OFFICIAL_WEIGHTS]
    data = json.loads((out / "config.json").read_text())
    kind = THEIR_KIND[gate_type]
    assert (data["retention_gate"], data["retention_gate_intermediate_size"], data["memory_size"]) == (kind, 8, 64)
    assert data["base_model"] == "tiny/llama" and data["architectures"] == ["TrimKVLlamaForCausalLM"]
    assert data["model_type"] == "llama" and data["num_hidden_layers"] == 2 and data["hidden_act"] == act
    weights = torch.load(out / OFFICIAL_WEIGHTS, weights_only=True)
    # their loader: the model keys containing a trainable_params entry must be exactly the file's keys
    assert all(data["trainable_params"] in k and k.startswith("model.layers.") for k in weights)
    assert len(weights) == len(gates.state_dict())
    x = torch.randn(2, 5, 64) if gate_type == "rg" else torch.randn(2, 2, 5, 32)
    for layer in range(2):
        want = authors_gate(weights, layer, kind, act, x).transpose(1, 2)          # [B, H, T]
        torch.testing.assert_close(gates[layer](x), want, rtol=0, atol=1e-6)
    back = load_gate_checkpoint(out)                                              # and trimkv reads it back exactly
    assert back.config.gate_type == gate_type and back.fingerprint() == gates.fingerprint()


def test_exported_folders_get_normal_permissions(tmp_path):
    """An export, a gate checkpoint and a KVP checkpoint are all written through one staged folder: the umask's
    permissions, not mkdtemp's 0700 (the export once kept 0700)."""
    import os
    import stat

    from trimkv.kvp import KVPConfig, KVPRankers, save_rankers

    mask = os.umask(0)
    os.umask(mask)
    src = save_gates(trained("rg"), tmp_path / "mine")
    out = export_checkpoint(src, tmp_path / "theirs", base_config=tiny_config("llama"))
    cfg = KVPConfig(num_layers=2, num_kv_heads=2, head_dim=16, hidden=8, base_model="tiny/llama")
    ranked = save_rankers(KVPRankers(cfg, seed=0), tmp_path / "kvp")
    for folder in (src, out, ranked):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask, folder


def test_export_refuses_what_the_authors_package_cannot_hold(tmp_path):
    base = tiny_config("llama")
    for gate_type in ("rg2", "rg10"):
        src = save_gates(trained(gate_type), tmp_path / gate_type)
        with pytest.raises(GateCheckpointError, match="no equivalent in the authors' package"):
            export_checkpoint(src, tmp_path / f"{gate_type}-out", base_config=base)
    src = save_gates(trained("rg", "gelu"), tmp_path / "gelu")
    with pytest.raises(GateCheckpointError, match="hidden_act"):
        export_checkpoint(src, tmp_path / "gelu-out", base_config=base)
    with pytest.raises(GateCheckpointError, match="layers"):
        export_checkpoint(save_gates(trained("rg"), tmp_path / "rg"), tmp_path / "x",
                          base_config=tiny_config("llama", num_hidden_layers=3))
    assert not (tmp_path / "x").exists() and not (tmp_path / "gelu-out").exists()


def test_export_and_recipes_commands(tmp_path, monkeypatch, capsys):
    """The entry point as a user runs it (trimkv export with the base config from a folder; trimkv recipes list),
    then recipes copy in-process."""
    src = save_gates(trained("rg"), tmp_path / "mine")
    base = tmp_path / "base"
    tiny_config("llama").save_pretrained(base)
    out = subprocess.run([sys.executable, "-m", "trimkv.cli", "export", str(src), "theirs", "--base-model",
                          str(base)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "theirs" / OFFICIAL_WEIGHTS).is_file() and out.stdout.strip().endswith("theirs")
    listed = subprocess.run([sys.executable, "-m", "trimkv.cli", "recipes", "list"], capture_output=True, text=True)
    assert listed.returncode == 0 and "smollm2-135m-qa-m64" in listed.stdout and "Qwen3-4B" in listed.stdout
    monkeypatch.chdir(tmp_path)
    assert cli_main(["recipes", "copy", "smollm2-135m-qa-m64"]) == 0
    assert (tmp_path / "smollm2-135m-qa-m64.yaml").read_text().startswith("# Gates for the embedded SmolLM2")
    assert cli_main(["recipes", "copy", "smollm2-135m-qa-m64.yaml", "sub/my.yaml"]) == 0
    assert (tmp_path / "sub" / "my.yaml").is_file()
    capsys.readouterr()
    assert cli_main(["recipes", "copy", "smollm2-135m-qa-m64"]) == 3               # a RecipeError, in one line
    assert "exists" in capsys.readouterr().err
    assert cli_main(["recipes", "copy", "nope"]) == 3
    assert "no shipped recipe named 'nope'" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="exists"):                                # the Python API raises
        copy_recipe("smollm2-135m-qa-m64")

"""Splicing gate checkpoints (trimkv.share.splice, `trimkv splice`): each layer's gate comes from the checkpoint named
for it, the config says which, and gates of another shape, model or a shared last layer are refused."""
from __future__ import annotations

import pytest
import torch

from _cli import assert_fails, run_cli
from trimkv.errors import GateMismatchError
from trimkv.gate import GateConfig
from trimkv.share import PretrainedGates, load_gate_checkpoint, save_gates
from trimkv.share.splice import layers_text, splice_gates

CFG = dict(num_layers=4, hidden_size=16, num_kv_heads=2, head_dim=4, gate_hidden=8, base_model="tiny/model")


def gates(seed, **kw):
    torch.manual_seed(seed)
    return PretrainedGates(GateConfig(**{**CFG, "bias_init": 2.0 + seed, **kw}))


def test_each_layer_comes_from_the_checkpoint_named_for_it():
    a, b = gates(0), gates(1)
    fa, fb = a.fingerprint(), b.fingerprint()
    want = {layer: {k: v.clone() for k, v in (b if layer in (1, 3) else a)[layer].state_dict().items()}
            for layer in range(4)}
    out = splice_gates(a, b, [3, 1, 3], base_name="A", other_name="B")
    for layer in range(4):
        for k, v in out[layer].state_dict().items():
            assert torch.equal(v, want[layer][k]), (layer, k)
    assert out.config.extra["spliced"] == {"base": "A", "base_fingerprint": fa, "other": "B", "other_fingerprint": fb,
                                           "layers_from_other": [1, 3]}
    assert layers_text([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    fitted = gates(2)
    fitted.config.extra = {"trace_fit": {"settings": {"utility": {"answer": 1.0, "mean": 1.0}}}}
    out = splice_gates(gates(0), fitted, [2])                # how the other's layers were fitted goes with them
    assert out.config.extra["spliced"]["other_trace_fit"] == fitted.config.extra["trace_fit"]


def test_what_cannot_be_spliced():
    with pytest.raises(GateMismatchError, match="gate_hidden: 8 vs 16"):
        splice_gates(gates(0), gates(1, gate_hidden=16), [1])
    with pytest.raises(GateMismatchError, match="base model"):
        splice_gates(gates(0), gates(1, base_model="other/model"), [1])
    with pytest.raises(GateMismatchError, match="share their last layer"):
        splice_gates(gates(0, gate_type="rg10"), gates(1, gate_type="rg10"), [1])
    with pytest.raises(ValueError, match=r"among 0\.\.3"):
        splice_gates(gates(0), gates(1), [4])


def test_splice_command(tmp_path):
    save_gates(gates(0), tmp_path / "a")
    save_gates(gates(1), tmp_path / "b")
    res = run_cli("splice", tmp_path / "a", tmp_path / "b", "--layers", "2-3", "--out", tmp_path / "ab")
    assert res.returncode == 0, res.stderr
    ab, b = load_gate_checkpoint(tmp_path / "ab"), load_gate_checkpoint(tmp_path / "b")
    assert torch.equal(ab[3].bias, b[3].bias) and not torch.equal(ab[1].bias, b[1].bias)
    assert ab.config.extra["spliced"]["layers_from_other"] == [2, 3]
    assert "2-3" in (tmp_path / "ab" / "README.md").read_text()
    assert_fails(run_cli("splice", tmp_path / "a", tmp_path / "b", "--layers", "2", "--out", tmp_path / "ab"), 2,
                 "exists")
    assert_fails(run_cli("splice", tmp_path / "a", tmp_path / "b", "--layers", "9", "--out", tmp_path / "x"), 2,
                 "among 0..3")
    assert_fails(run_cli("splice", tmp_path / "a", tmp_path / "b", "--layers", "a-b", "--out", tmp_path / "x"), 2,
                 "15-29")

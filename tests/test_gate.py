"""The retention gate: shapes, fp32 output, log beta <= 0, config validation and reading a model's shape; rg10's
final projection shared by all layers (one tensor, one gradient)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from trimkv.gate import GateConfig, RetentionGate, RetentionGates


def _cfg(**kw) -> GateConfig:
    return GateConfig(**{**dict(num_layers=3, hidden_size=64, num_kv_heads=2, head_dim=16, gate_hidden=8), **kw})


def test_rg_shape_is_batch_heads_time():
    gate = RetentionGate(_cfg())
    assert gate(torch.randn(2, 7, 64)).shape == (2, 2, 7)          # [B, T, d] -> [B, Hkv, T]


def test_rg2_reads_key_and_value_per_head():
    cfg = _cfg(gate_type="rg2")
    assert cfg.in_features == 2 * 16
    gate = RetentionGate(cfg)
    assert gate(torch.randn(2, 2, 7, 32)).shape == (2, 2, 7)       # [B, Hkv, T, 2D] -> [B, Hkv, T]


@pytest.mark.parametrize("gate_type", ["rg2-all", "rg3"])
def test_authors_kv_gates_read_all_heads_at_once(gate_type):
    """rg2-all / rg3: one MLP over [k_1; v_1; ...; k_H; v_H]: changing head 0's input moves every head's logit."""
    cfg = _cfg(gate_type=gate_type, init_std=0.5, bias_init=0.0)
    assert cfg.in_features == 2 * 2 * 16
    gate = RetentionGate(cfg)
    x = torch.randn(2, 2, 7, 32)
    y = x.clone()
    y[:, 0] += 1.0
    a, b = gate(x), gate(y)
    assert a.shape == (2, 2, 7) and not torch.allclose(a[:, 1], b[:, 1])
    names = sorted(n for n, _ in gate.named_parameters())
    assert names == (["bias", "w1.weight", "w2.weight", "w3.weight"] if gate_type == "rg3"
                     else ["bias", "w1.bias", "w1.weight", "w2.weight"])


@pytest.mark.parametrize("gate_type", ["rg", "rg2", "rg2-all", "rg3"])
def test_parameter_count_matches_the_module(gate_type):
    cfg = _cfg(gate_type=gate_type)
    assert cfg.num_parameters() == RetentionGates(cfg).num_parameters()


def test_activation_is_configurable_and_validated():
    x = torch.randn(1, 4, 64)
    silu = RetentionGate(_cfg(init_std=0.5, bias_init=0.0))
    gelu = RetentionGate(_cfg(init_std=0.5, bias_init=0.0, activation="gelu"))
    gelu.load_state_dict(silu.state_dict())
    assert not torch.allclose(silu(x), gelu(x))
    with pytest.raises(ValueError, match="activation"):
        _cfg(activation="softmax")


@pytest.mark.parametrize("gate_type", ["rg", "rg2", "rg2-all", "rg3"])
def test_output_is_fp32_for_bf16_input(gate_type):
    gate = RetentionGate(_cfg(gate_type=gate_type))
    x = torch.randn(1, 5, 64) if gate_type == "rg" else torch.randn(1, 2, 5, 32)
    out = gate(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gate(x.bfloat16().float()))  # the bf16 input is upcast, not the math downcast


def test_log_beta_is_non_positive_and_starts_near_zero():
    torch.manual_seed(0)
    gate = RetentionGate(_cfg(init_std=1.0, bias_init=0.0))          # wild weights: logits of both signs
    logb = gate(10 * torch.randn(4, 50, 64))
    assert (logb <= 0).all() and torch.isfinite(logb).all()
    fresh = RetentionGate(_cfg())                                    # default bias 18: beta ~ 1 at step 0
    assert fresh(torch.randn(2, 9, 64)).exp().min() > 1 - 1e-6


def test_bias_initialisation_and_gate_stack():
    gates = RetentionGates(_cfg(bias_init=3.0))
    assert len(gates) == 3
    assert all(torch.equal(g.bias, torch.full((2,), 3.0)) for g in gates.layers)
    assert gates.num_parameters() == sum(p.numel() for p in gates.parameters())


def test_from_dict_round_trips_and_rejects_unknown_fields():
    cfg = _cfg(gate_type="rg2", base_model="x/y", loss_weights={"kl": 1.0})
    assert GateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="gate_hiden"):
        GateConfig.from_dict({**cfg.to_dict(), "gate_hiden": 4})


@pytest.mark.parametrize("bad", [dict(gate_type="rg9"), dict(num_kv_heads=0), dict(gate_hidden=-1)])
def test_invalid_config_raises_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg(**bad)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_for_model_reads_layers_kv_heads_and_head_dim(family):
    cfg = GateConfig.for_model(tiny_config(family, num_hidden_layers=3), gate_hidden=16)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim) == (3, 64, 2, 16)
    assert cfg.gate_hidden == 16


def test_for_model_defaults_kv_heads_and_head_dim():
    from types import SimpleNamespace

    mha = SimpleNamespace(num_hidden_layers=2, hidden_size=96, num_attention_heads=6)   # no GQA, no head_dim
    cfg = GateConfig.for_model(mha)
    assert (cfg.num_kv_heads, cfg.head_dim) == (6, 16)
    wrapped = SimpleNamespace(text_config=tiny_config("llama"))                         # multimodal wrapper
    assert GateConfig.for_model(wrapped).num_layers == 2


# ------------------------------------------------------------------------------- rg10: shared final projection


def test_rg10_final_projection_and_bias_are_one_tensor_for_all_layers():
    gates = RetentionGates(_cfg(gate_type="rg10", bias_init=5.0))
    assert all(g.shared is gates.shared for g in gates.layers)
    assert torch.equal(gates.shared.bias, torch.full((2,), 5.0))
    names = [n for n, _ in gates.named_parameters()]
    assert names.count("shared.proj.weight") == 1 and names.count("shared.bias") == 1
    assert not any(n.startswith("layers.") and "shared" in n for n in gates.state_dict())   # stored once
    assert gates[1].w2.weight.shape == (8, 8)                      # the second body layer is per layer
    x = torch.randn(2, 7, 64)
    assert gates[0](x).shape == (2, 2, 7) and (gates[0](x) <= 0).all()


def test_rg10_shared_projection_gets_one_gradient_summed_over_layers():
    torch.manual_seed(0)
    gates = RetentionGates(_cfg(gate_type="rg10", bias_init=0.0, init_std=0.5))
    x = torch.randn(2, 5, 64)
    grads = []
    for layer in range(3):                                           # each layer's contribution alone
        gates.zero_grad()
        gates[layer](x).sum().backward()
        grads.append(gates.shared.proj.weight.grad.clone())
    gates.zero_grad()
    sum(gates[layer](x).sum() for layer in range(3)).backward()
    torch.testing.assert_close(gates.shared.proj.weight.grad, sum(grads))
    assert gates.shared.bias.grad is not None and gates.shared.bias.grad.shape == (2,)


def test_rg10_moves_and_copies_stay_tied():
    gates = RetentionGates(_cfg(gate_type="rg10"))
    head = gates.shared.proj.weight
    gates.double()                                                 # casts are refused (gates stay fp32) ...
    assert gates[2].shared is gates.shared and gates[2].shared.proj.weight.dtype == torch.float32
    gates.to("meta")                                               # ... moves reach the layers' head
    assert gates[2].shared.proj.weight.device.type == "meta" and head.device.type == "cpu"
    gates = RetentionGates(_cfg(gate_type="rg10"))
    twin = copy.deepcopy(gates)
    assert all(g.shared is twin.shared for g in twin.layers) and twin.shared is not gates.shared
    with torch.no_grad():
        twin.shared.bias.fill_(-3.0)
    assert torch.equal(twin[1].shared.bias, torch.full((2,), -3.0, dtype=torch.float64))

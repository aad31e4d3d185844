"""Attaching gates to frozen Hugging Face models by hooks: equivalence at init, teacher mode, detach, packing,
gradients (with and without activation checkpointing), across model families."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import GATES_ATTR, attach_gates, gates_disabled
from trimkv.train.run import enable_activation_checkpointing

IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


def test_gates_at_init_leave_logits_unchanged_and_disabled_is_exact(family):
    model = build_tiny_model(family)
    before = logits(model)
    handle = attach_gates(model, gate_hidden=16)
    torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=0)
    with handle.disabled():
        assert torch.equal(logits(model), before)
    with gates_disabled(model):
        assert torch.equal(logits(model), before)
    assert handle.enabled


def test_detach_restores_the_model(family):
    model = build_tiny_model(family)
    impl, before = model.config._attn_implementation, logits(model)
    handle = attach_gates(model, gate_hidden=16, bias_init=1.0)     # strong decay: logits really change
    assert not torch.allclose(logits(model), before, atol=1e-3)
    gates = handle.detach()
    assert gates is handle.gates
    assert model.config._attn_implementation == impl
    assert not hasattr(model, GATES_ATTR) and getattr(model, "trimkv", None) is None
    assert not any(n.startswith(GATES_ATTR) for n, _ in model.named_parameters())
    assert torch.equal(logits(model), before)
    attach_gates(model, gate_hidden=16)                              # and it can be attached again


def test_base_is_frozen_gates_train_and_double_attach_raises():
    model = build_tiny_model("llama")
    handle = attach_gates(model, gate_hidden=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{GATES_ATTR}.{n}" for n, _ in handle.gates.named_parameters()}
    assert all(p.dtype == torch.float32 for p in handle.gates.parameters())
    with pytest.raises(RuntimeError, match="already attached"):
        attach_gates(model, gate_hidden=16)


def test_gates_must_fit_the_model():
    from trimkv.share import GateMismatchError
    from trimkv.gate import GateConfig, RetentionGates

    gates = RetentionGates(GateConfig(num_layers=3, hidden_size=64, num_kv_heads=2, head_dim=16, gate_hidden=8))
    with pytest.raises(GateMismatchError, match="3 layers"):
        attach_gates(build_tiny_model("llama"), gates)


@pytest.mark.parametrize("gate_type", ["rg2", "rg2-all", "rg3"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kv_gates_run_and_start_equal_to_the_frozen_model(family, gate_type):
    model = build_tiny_model(family)
    before = logits(model)
    attach_gates(model, gate_type=gate_type, gate_hidden=16)
    torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gate_type", ["rg", "rg2"])
def test_packed_rows_equal_separate_documents(family, gate_type):
    """position_ids restarting at 0 mid-row start a new document: no attention across the boundary."""
    model = build_tiny_model(family)
    handle = attach_gates(model, gate_type=gate_type, gate_hidden=16, bias_init=2.0)
    a, b = IDS[0, :10], IDS[1, :14]
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    for ctx in (handle.disabled, _enabled):
        with ctx():
            out = logits(model, packed, position_ids=pos)
            torch.testing.assert_close(out[0, :10], logits(model, a[None])[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out[0, 10:], logits(model, b[None])[0], atol=1e-5, rtol=0)


class _enabled:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _gate_grads(model, handle, ids=IDS) -> list[torch.Tensor]:
    handle.gates.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False).logits
    (out.float().pow(2).mean()).backward()
    return [torch.cat([p.grad.flatten() for p in g.parameters()]) for g in handle.gates.layers]


def test_gradient_reaches_every_gate_layer(family):
    model = build_tiny_model(family)
    handle = attach_gates(model, gate_hidden=16, bias_init=2.0)
    grads = _gate_grads(model, handle)
    for idx, g in enumerate(grads):
        assert torch.isfinite(g).all() and g.abs().max() > 1e-6, f"layer {idx} got no gradient"
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(GATES_ATTR))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gate_gradient(family):
    model = build_tiny_model(family)
    handle = attach_gates(model, gate_hidden=16, bias_init=2.0)
    model.train()
    plain = _gate_grads(model, handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)           # the current API, not the deprecated alias
        enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ckpt = _gate_grads(model, handle)
    for idx, (a, b) in enumerate(zip(plain, ckpt)):
        assert b.abs().max() > 1e-6, f"layer {idx}: no gradient under checkpointing"
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_each_gate_lives_on_its_layers_device(tiny_model):
    """A model split over devices (device_map="auto"): gate l goes where layer l's attention runs. The CPU stand-in
    for a second device is the meta device (a placement check, no forward)."""
    model = tiny_model("qwen3")
    model.model.layers[1].to("meta")
    handle = attach_gates(model, gate_hidden=8)
    devices = [{p.device.type for p in gate.parameters()} for gate in handle.gates.layers]
    assert devices == [{"cpu"}, {"meta"}]
    assert all(p.dtype == torch.float32 for p in handle.gates.parameters())

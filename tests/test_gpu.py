"""The GPU paths users run, checked against the CPU references (skipped without CUDA).

* the default training attention on CUDA is the compiled Triton kernel; an fp32 gate-training step on CUDA gives
  the CPU reference step's losses and gradients, and one under bf16 autocast (the recipe default there) the fp32
  step's within bf16 tolerance;
* that step runs without a single host sync (forward, losses, capacity sums, backward);
* the capacity sums dispatch to the Triton S_t kernel;
* generation with a bounded cache (Triton append+evict inside ``generate``) gives the PyTorch eviction's tokens.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build_tiny_model, requires_cuda
from test_train import fixed_batch
from trimkv.attach import attach_gates
from trimkv.attention import capacity_sums, resolve_impl
from trimkv.serve import make_cache
from trimkv.compat import cache_kwargs
from trimkv.recipe import LossSection
from trimkv.train.step import prepare_batch, training_step

pytestmark = requires_cuda
pytest.importorskip("triton")


def _gated(device, seed=0):
    model = build_tiny_model("llama", seed=seed).to(device)
    torch.manual_seed(seed)
    handle = attach_gates(model, gate_hidden=16, bias_init=3.0)
    return model, handle


def _step(model, handle, device, autocast: bool):
    batch = prepare_batch(fixed_batch(T=160), device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = training_step(model, handle, batch, LossSection(budget=16, chunk_size=64))
    out.loss.backward()
    grads = torch.cat([p.grad.flatten().float().cpu() for p in handle.gates.parameters()])
    return out, grads


def test_auto_is_triton_on_cuda():
    q = torch.zeros(1, 1, 8, 16, device="cuda")
    assert resolve_impl("auto", q, 8) == "triton"
    assert resolve_impl("auto", q.cpu(), 8) == "reference"


def test_bf16_autocast_step_matches_the_fp32_step():
    ref_model, ref_handle = _gated("cuda")
    ref, ref_g = _step(ref_model, ref_handle, "cuda", autocast=False)          # fp32 Triton
    model, handle = _gated("cuda")
    out, g = _step(model, handle, "cuda", autocast=True)                      # bf16 autocast, the recipe default
    for name in ("loss", "kl", "ntp", "cap"):
        a, b = getattr(out, name).item(), getattr(ref, name).item()
        assert a == pytest.approx(b, rel=5e-2, abs=5e-3), name
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(g, ref_g, dim=0).item()
    assert cos > 0.97, f"bf16 gate gradient direction differs from fp32: cosine {cos:.4f}"


def test_fp32_triton_step_matches_the_cpu_reference_step():
    cpu_model, cpu_handle = _gated("cpu")
    ref, ref_g = _step(cpu_model, cpu_handle, "cpu", autocast=False)
    model, handle = _gated("cuda")
    out, g = _step(model, handle, "cuda", autocast=False)
    for name in ("loss", "kl", "ntp", "cap"):
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-3, abs=1e-4), name
    torch.testing.assert_close(g, ref_g, rtol=1e-2, atol=1e-4)


def test_training_step_has_no_host_sync():
    model, handle = _gated("cuda")
    batch = prepare_batch(fixed_batch(T=160), "cuda")
    _step(model, handle, "cuda", autocast=True)                    # warm-up: Triton compiles, caches fill
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = training_step(model, handle, batch, LossSection(budget=16, chunk_size=64))
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, f"{len(syncs)} host syncs in the training step, first: {syncs[0]}"


def test_capacity_sums_use_the_triton_kernel_and_match():
    g = torch.Generator().manual_seed(0)
    logb = (-0.1 * torch.rand(2, 6, 300, generator=g)).cuda().requires_grad_(True)
    pos = torch.arange(300).repeat(2, 1).cuda()
    fast = capacity_sums(logb, pos)                                 # auto -> triton on CUDA
    assert "Triton" in type(fast.grad_fn).__name__
    ref = capacity_sums(logb.detach().cpu().double(), pos.cpu(), impl="chunked")
    torch.testing.assert_close(fast.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [8, 24])
def test_triton_eviction_inside_generate_gives_the_torch_path_tokens(budget, monkeypatch):
    """generate() on CUDA evicts with the Triton kernel; forcing the PyTorch reference eviction (same device, same
    model numerics) must give the same tokens and the same kept slots."""
    import trimkv.serve.policies.retention as retention

    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3)).cuda()
    model, _ = _gated("cuda", seed=1)
    runs = []
    for backend in ("auto", "torch"):
        real = retention.append_evict_
        monkeypatch.setattr(retention, "append_evict_", lambda *a, **kw: real(*a, **{**kw, "backend": backend}))
        cache = make_cache(model, "trimkv", budget, sink=2, window=4)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                                 max_new_tokens=12, do_sample=False, prefill_chunk_size=16, pad_token_id=0)
        runs.append((out.cpu(), [layer.pos.sort(-1).values.cpu() for layer in cache.layers]))
        assert (cache.layers[0].num_kept() <= budget).all()
        monkeypatch.setattr(retention, "append_evict_", real)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_pipeline_on_cuda_answers_like_the_cpu(tokenizer):
    """The pipeline entry on a GPU (gates on the layers' device, the bounded cache allocated there, inputs on the
    embedding's device) answers with the CPU's tokens (fp32, greedy)."""
    from trimkv.serve import answer

    context = "The grass is green. The sky is blue. " * 8 + "The pass key is 71432. " + "Here we go. " * 6
    outs = {}
    for device in ("cpu", "cuda"):
        model = build_tiny_model("llama", vocab_size=len(tokenizer)).to(device)
        attach_gates(model, gate_hidden=16, bias_init=3.0)
        assert {p.device.type for p in model.trimkv.gates.parameters()} == {device}
        outs[device] = answer(model, tokenizer, context, ["What is the pass key?", "Sky?"], budget=32,
                              max_new_tokens=5)
    assert outs["cuda"].answers == outs["cpu"].answers and outs["cuda"].kv_bytes == outs["cpu"].kv_bytes


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_answers_like_one_gpu(tokenizer):
    """device_map over two GPUs: each gate on its layer's GPU, each cache layer allocated there, same answers."""
    from accelerate import dispatch_model

    def tiny():
        return build_tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)

    single = _answer(tiny().to("cuda:0"), tokenizer)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    split = dispatch_model(tiny(), device_map=device_map)
    out = _answer(split, tokenizer)
    assert out.answers == single.answers
    assert [g.w1.weight.device.index for g in split.trimkv.gates.layers] == [0, 0, 1, 1]


def _answer(model, tokenizer):
    from trimkv.serve import answer

    torch.manual_seed(0)                                       # the same fresh gates for both placements
    attach_gates(model, gate_hidden=16, bias_init=3.0)
    return answer(model, tokenizer, "The sky is blue. " * 12, "Sky?", budget=32, max_new_tokens=4)

"""Fast paths equal their PyTorch references: Triton attention / capacity sums / fused eviction (compiled on a GPU,
run under the Triton interpreter on CPU: conftest sets TRITON_INTERPRET=1 there) and FlexAttention."""
from __future__ import annotations

import os

import pytest
import torch

from trimkv.attention import capacity_sums_reference, retention_attention, retention_attention_reference
from trimkv.serve.policies.retention import append_evict_

from test_attention import _capacity_case, _grads, make_case

triton = pytest.importorskip("triton", reason="the Triton fast paths need the triton package ([triton] extra)")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (conftest sets it for triton >= 3.9): Triton kernels cannot run",
                allow_module_level=True)

from trimkv.kernels.triton_attention import capacity_sums_triton, retention_attention_triton  # noqa: E402
from trimkv.kernels.triton_evict import append_evict_triton_  # noqa: E402

from conftest import DEVICE as DEV  # noqa: E402

ATTN_CASES = {
    "gqa2_odd37": dict(H=4, Hkv=2, T=37),
    "gqa3_segments_valid": dict(H=6, Hkv=2, T=53, segments=True, valid=True),
    "cache_T_lt_S_permuted_all": dict(H=6, Hkv=2, T=21, S=70, permute=True, segments=True, valid=True),
    "single_query": dict(H=4, Hkv=1, T=1, S=45, permute=True),
    "d_not_pow2": dict(H=2, Hkv=1, T=29, D=12),
}


def _fp32(case: dict) -> dict:
    """fp64 test case -> fp32 floats on the test device (the kernels take fp16 / bf16 / fp32)."""
    return {n: (x.to(DEV, torch.float32) if x.is_floating_point() else x.to(DEV)) if torch.is_tensor(x) else x
            for n, x in case.items()}


def _assert_close_to_reference(case, out, grads, tol=2e-5):
    out_r, g_r = _grads(retention_attention_reference, case)
    torch.testing.assert_close(out.double().cpu(), out_r, rtol=tol, atol=tol)
    for which, a, b in zip("q k v logb".split(), grads, g_r):
        scale = max(1.0, b.abs().max().item())  # dlogb sums over many queries: compare relative to its size
        torch.testing.assert_close(a.double().cpu() / scale, b / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"grad {which}: {m}")


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_triton_attention_matches_reference(name):
    case = make_case(**ATTN_CASES[name])
    out, grads = _grads(retention_attention_triton, _fp32(case), block_q=16, block_k=16)
    assert out.dtype == torch.float32 and grads[3].dtype == torch.float32
    _assert_close_to_reference(case, out, grads)


def test_triton_attention_through_dispatch_with_default_tiles():
    case = make_case(H=4, Hkv=2, T=70)
    out, grads = _grads(retention_attention, _fp32(case), impl="triton")
    _assert_close_to_reference(case, out, grads)


def test_triton_rows_without_visible_keys_are_zero_with_finite_grads():
    case = make_case(H=2, Hkv=1, T=20, valid=True)
    case["k_valid"][1] = False  # row 1: no key at all
    case["k_valid"][0, :5] = False  # row 0: first 5 queries see nothing
    out, grads = _grads(retention_attention_triton, _fp32(case), block_q=16, block_k=16)
    assert out[1].abs().max() == 0 and out[0, :, :5].abs().max() == 0
    assert all(torch.isfinite(g).all() for g in grads)
    _assert_close_to_reference(case, out, grads)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the Triton 3.9 CPU interpreter computes tl.dot on bf16 tiles wrongly (GPU only)")
def test_triton_bf16_inputs_keep_dtypes():
    case = make_case(H=4, Hkv=2, T=33, dtype=torch.bfloat16)
    out, grads = _grads(retention_attention_triton, {k: v.to(DEV) if torch.is_tensor(v) else v
                                                     for k, v in case.items()}, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]
    out_r, _ = _grads(retention_attention_reference, case)
    torch.testing.assert_close(out.float().cpu(), out_r.float(), rtol=3e-2, atol=3e-2)


def test_triton_rejects_bad_tiles_and_fp64():
    case = _fp32(make_case(T=8))
    with pytest.raises(ValueError, match="power of two"):
        retention_attention_triton(**case, block_q=24)
    with pytest.raises(ValueError, match="fp16 / bf16 / fp32"):
        retention_attention_triton(**make_case(T=8))


@pytest.mark.parametrize("segments,valid,permute", [(False, False, False), (True, True, False), (True, True, True)])
def test_triton_capacity_sums_match_reference(segments, valid, permute):
    logb, pos, seg, val = _capacity_case(segments, valid, permute, T=70)
    lb = logb.float().to(DEV).requires_grad_(True)
    S = capacity_sums_triton(lb, pos.to(DEV), None if seg is None else seg.to(DEV),
                             None if val is None else val.to(DEV), block=16)
    ref_lb = logb.clone().requires_grad_(True)
    S_r = capacity_sums_reference(ref_lb, pos, seg, val)
    torch.testing.assert_close(S.double().cpu(), S_r, rtol=1e-5, atol=1e-5)
    g = torch.randn(S_r.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (d,) = torch.autograd.grad(S, lb, g.float().to(DEV))
    (d_r,) = torch.autograd.grad(S_r, ref_lb, g)
    scale = max(1.0, d_r.abs().max().item())
    torch.testing.assert_close(d.double().cpu() / scale, d_r / scale, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- fused eviction
def _slots(B=2, H=3, C=13, D=8, *, fill=10, seed=0):
    """Slot buffers with ``fill`` occupied slots per (row, head) at random positions < 40, the rest empty."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.full((B, H, C), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            slots = torch.randperm(C, generator=g)[:fill]
            pos[b, h, slots] = torch.randperm(40, generator=g)[:fill]
    return dict(keys=torch.randn(B, H, C, D, generator=g), values=torch.randn(B, H, C, D, generator=g),
                pos=pos, logb=-torch.rand(B, H, C, generator=g))


@pytest.mark.parametrize("sink,window,fill", [(0, 0, 13), (0, 0, 9), (2, 3, 13), (4, 0, 13)])
def test_triton_append_evict_equals_reference_over_steps(sink, window, fill):
    ref = _slots(fill=fill, seed=sink + window + fill)
    fast = {n: t.clone().to(DEV) for n, t in ref.items()}
    g = torch.Generator().manual_seed(7)
    B, H, _, D = ref["keys"].shape
    for step in range(6):
        t = torch.tensor([40 + step, 41 + step])
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        pos_new = t.view(B, 1, 1).expand(B, H, 1).contiguous()
        logb_new = -torch.rand(B, H, 1, generator=g)
        vr = append_evict_(*ref.values(), k, v, pos_new, logb_new, t, sink=sink, window=window)
        vf = append_evict_(*fast.values(), k.to(DEV), v.to(DEV), pos_new.to(DEV), logb_new.to(DEV), t.to(DEV),
                           sink=sink, window=window, backend="triton")
        assert torch.equal(vr, vf.cpu()), f"step {step}: victims differ"
        for n in ref:
            assert torch.equal(ref[n], fast[n].cpu()), f"step {step}: {n} differs"


def test_triton_append_evict_never_picks_a_disabled_slot():
    """Per-head budgets: the last slots of a head are disabled (pos -2); both paths evict within the others."""
    ref = _slots(fill=13)
    ref["pos"][:, 0, 9:] = -2                                  # head 0 owns 9 slots, head 1 owns 11, head 2 all 13
    ref["pos"][:, 1, 11:] = -2
    fast = {n: t.clone().to(DEV) for n, t in ref.items()}
    g = torch.Generator().manual_seed(11)
    B, H, _, D = ref["keys"].shape
    for step in range(8):
        t = torch.tensor([40 + step, 41 + step])
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        pos_new, logb_new = t.view(B, 1, 1).expand(B, H, 1).contiguous(), -torch.rand(B, H, 1, generator=g)
        vr = append_evict_(*ref.values(), k, v, pos_new, logb_new, t, sink=1, window=2)
        vf = append_evict_(*fast.values(), k.to(DEV), v.to(DEV), pos_new.to(DEV), logb_new.to(DEV), t.to(DEV),
                           sink=1, window=2, backend="triton")
        assert torch.equal(vr, vf.cpu()) and (vr[:, 0] < 9).all() and (vr[:, 1] < 11).all()
    assert (ref["pos"][:, 0, 9:] == -2).all() and (ref["pos"][:, 1, 11:] == -2).all()
    assert torch.equal(ref["pos"], fast["pos"].cpu())


def test_triton_append_evict_ties_pick_first_slot_like_torch():
    ref = _slots(fill=13)
    ref["logb"].zero_()  # every kept token scores 0: argmin ties everywhere
    fast = {n: t.clone().to(DEV) for n, t in ref.items()}
    B, H, _, D = ref["keys"].shape
    args = (torch.ones(B, H, 1, D), torch.ones(B, H, 1, D), torch.full((B, H, 1), 50), torch.zeros(B, H, 1),
            torch.tensor([50, 50]))
    want = append_evict_(*ref.values(), *args)
    assert torch.equal(want, append_evict_triton_(*fast.values(), *(a.to(DEV) for a in args)).cpu())


def test_triton_append_evict_reads_strided_newcomers():
    """The cache hands the kernel a position broadcast over heads (stride 0) and k/v views: no copies needed."""
    ref = _slots(fill=13, seed=5)
    fast = {n: t.clone().to(DEV) for n, t in ref.items()}
    B, H, _, D = ref["keys"].shape
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(B, 1, H, 2 * D, generator=g).transpose(1, 2)         # [B, H, 1, 2D], non-contiguous heads
    k, v = kv[..., :D], kv[..., D:]
    t = torch.tensor([60, 61])
    pos_new = t.view(B, 1, 1).expand(B, H, 1)                             # stride 0 over heads
    logb_new = -torch.rand(B, 1, 1, generator=g).expand(B, H, 1)
    want = append_evict_(*ref.values(), k.contiguous(), v.contiguous(), pos_new.contiguous(),
                         logb_new.contiguous(), t)
    got = append_evict_triton_(*fast.values(), k.to(DEV), v.to(DEV), pos_new.to(DEV), logb_new.to(DEV), t.to(DEV))
    assert torch.equal(want, got.cpu())
    for n in ref:
        assert torch.equal(ref[n], fast[n].cpu()), n


def test_append_evict_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        append_evict_(*_slots().values(), None, None, None, None, None, backend="cuda")


# ------------------------------------------------------------------------------------------------- flex
def test_flex_forward_matches_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from trimkv.kernels.flex import retention_attention_flex

    empty = make_case(H=2, Hkv=1, T=20, valid=True)
    empty["k_valid"][1] = False  # a row that sees no key at all -> zeros
    cases = [make_case(H=4, Hkv=2, T=37), make_case(H=6, Hkv=2, T=21, S=70, permute=True, segments=True, valid=True),
             empty]
    for case in cases:
        out = retention_attention_flex(**_fp32(case))
        torch.testing.assert_close(out.double().cpu(), retention_attention_reference(**case), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_grads_match_reference_on_gpu():
    case = make_case(H=4, Hkv=2, T=67, segments=True)
    out, grads = _grads(retention_attention, _fp32(case), impl="flex")
    _assert_close_to_reference(case, out, grads, tol=1e-4)

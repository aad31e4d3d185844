"""Retention attention and capacity sums: the chunked kernels equal the references (values and grads)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trimkv.attention import (
    capacity_sums,
    capacity_sums_reference,
    retention_attention,
    retention_attention_chunked,
    retention_attention_reference,
)


def _segments_of(pos: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Document id of each position given per-row sorted cut positions: [B, N], [B, C] -> [B, N]."""
    return torch.searchsorted(cuts, pos, right=True)


def make_case(B=2, H=4, Hkv=2, T=37, S=None, D=8, *, dtype=torch.float64, seed=0, segments=False,
              valid=False, permute=False, logb_scale=0.2):
    """Random inputs. Positions: S distinct sorted positions per row (gaps when permute, like an evicting
    cache), queries are the last T of them; with permute the key slots are in arbitrary order."""
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    if permute:
        pos = torch.stack([torch.randperm(3 * S, generator=g)[:S].sort().values for _ in range(B)])
    else:
        pos = torch.arange(S).repeat(B, 1)
    q_pos = pos[:, S - T:].clone()  # [B, T]
    k_pos = pos.clone()  # [B, S]
    if permute:
        k_pos = torch.stack([row[torch.randperm(S, generator=g)] for row in k_pos])
    case = dict(
        q=torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype),
        k=torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype),
        v=torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype),
        logb=-(torch.rand(B, Hkv, S, generator=g, dtype=torch.float64) * logb_scale),
        scaling=1 / math.sqrt(D), q_pos=q_pos, k_pos=k_pos,
    )
    if dtype != torch.float64:
        case["logb"] = case["logb"].float()
    if segments:  # different document boundaries in each row
        top = int(pos.max()) + 1
        cuts = torch.stack([torch.randperm(top, generator=g)[:3].sort().values for _ in range(B)])
        case["q_seg"], case["k_seg"] = _segments_of(q_pos, cuts), _segments_of(k_pos, cuts)
    if valid:
        kv = torch.rand(B, S, generator=g) > 0.25
        kv[0, :5] = False  # a run of padding at the start of row 0
        case["k_valid"] = kv
    return case


def _grads(fn, case, **kw):
    inputs = [case[n].clone().requires_grad_(True) for n in ("q", "k", "v", "logb")]
    args = {n: x for n, x in case.items() if n not in ("q", "k", "v", "logb")}
    out = fn(*inputs, **args, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(device=out.device, dtype=out.dtype)             # device-generic: the gradient lives where out does
    grads = torch.autograd.grad(out, inputs, g)
    return out, grads


CASES = {
    "gqa2_odd37": dict(H=4, Hkv=2, T=37),
    "gqa3_odd130": dict(H=6, Hkv=2, T=130),
    "mha_segments": dict(H=2, Hkv=2, T=130, segments=True),
    "gqa_valid": dict(H=4, Hkv=2, T=67, valid=True),
    "segments_valid": dict(H=6, Hkv=2, T=53, segments=True, valid=True),
    "cache_T_lt_S_permuted": dict(H=4, Hkv=2, T=19, S=101, permute=True),
    "cache_all": dict(H=6, Hkv=2, T=33, S=90, permute=True, segments=True, valid=True),
    "single_query": dict(H=4, Hkv=1, T=1, S=45, permute=True),
}


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (7, 32)])
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_matches_reference_values_and_grads(name, blocks):
    case = make_case(**CASES[name])
    out_r, g_r = _grads(retention_attention_reference, case)
    out_c, g_c = _grads(retention_attention_chunked, case, block_q=blocks[0], block_k=blocks[1])
    torch.testing.assert_close(out_c, out_r, rtol=1e-10, atol=1e-10)
    for which, a, b in zip("q k v logb".split(), g_c, g_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {which}: {m}")


def test_bf16_inputs_compute_in_fp32_and_keep_dtypes():
    case = make_case(H=4, Hkv=2, T=45, dtype=torch.bfloat16)
    out_r, g_r = _grads(retention_attention_reference, case)
    out_c, g_c = _grads(retention_attention_chunked, case, block_q=16, block_k=16)
    assert out_c.dtype == torch.bfloat16
    assert [x.dtype for x in g_c] == [torch.bfloat16] * 3 + [torch.float32]
    torch.testing.assert_close(out_c, out_r, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_zero_decay_is_causal_softmax_attention(impl):
    case = make_case(H=6, Hkv=2, T=41)
    case["logb"] = torch.zeros_like(case["logb"])
    out = retention_attention(**case, impl=impl, block_q=16, block_k=16)
    G = 3
    expected = F.scaled_dot_product_attention(case["q"], case["k"].repeat_interleave(G, 1),
                                              case["v"].repeat_interleave(G, 1), is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    case["logb"] = None  # None means "no decay"
    torch.testing.assert_close(retention_attention(**case, impl=impl, block_q=16, block_k=16), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_very_negative_logb_is_exact_eviction(impl):
    case = make_case(H=4, Hkv=2, T=40)
    j = 11  # evict key at position 11 in every KV head
    case["logb"][:, :, j] = -1e4
    soft = retention_attention(**case, impl=impl, block_q=16, block_k=16)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, j] = False
    hard = retention_attention(**{**case, "k_valid": valid}, impl=impl, block_q=16, block_k=16)
    later = case["q_pos"][0] > j  # the query at j itself still sees key j with d = 0
    torch.testing.assert_close(soft[:, :, later], hard[:, :, later], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_rows_without_visible_keys_are_zero_with_finite_grads(impl):
    case = make_case(H=2, Hkv=1, T=20, valid=True)
    case["k_valid"][1] = False  # row 1: no key at all
    case["k_valid"][0, :5] = False  # row 0: first 5 queries see nothing
    out, grads = _grads(retention_attention, case, impl=impl, block_q=8, block_k=8)
    assert out[1].abs().max() == 0 and out[0, :, :5].abs().max() == 0
    assert all(torch.isfinite(g).all() for g in grads)


def test_auto_dispatch_and_errors():
    case = make_case(H=4, Hkv=2, T=30)
    torch.testing.assert_close(retention_attention(**case), retention_attention_reference(**case))
    with pytest.raises(ValueError, match="impl"):
        retention_attention(**case, impl="flash")
    with pytest.raises(ValueError, match="multiple"):
        retention_attention(**{**case, "q": case["q"][:, :3]})
    with pytest.raises(ValueError, match="logb"):
        retention_attention(**{**case, "logb": case["logb"][:, :1]})
    with pytest.raises(ValueError, match="k_seg"):
        retention_attention(**case, q_seg=torch.zeros_like(case["q_pos"]))


def test_gradcheck_chunked_function():
    case = make_case(B=2, H=2, Hkv=1, T=5, S=7, D=3, permute=True, valid=True, logb_scale=0.5)
    case["k_valid"][0, :5] = True  # keep at least one visible key for most queries
    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("q", "k", "v", "logb"))
    meta = {n: x for n, x in case.items() if n not in ("q", "k", "v", "logb")}

    def fn(q, k, v, logb):
        return retention_attention_chunked(q, k, v, logb, **meta, block_q=2, block_k=3)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# Capacity sums
# ----------------------------------------------------------------------------------------------------
def _capacity_case(segments: bool, valid: bool, permute: bool, T=150, seed=0):
    c = make_case(B=2, H=3, Hkv=3, T=T, segments=segments, valid=valid, permute=permute, seed=seed,
                  logb_scale=0.1)
    return c["logb"], c["k_pos"], c.get("k_seg"), c.get("k_valid")


@pytest.mark.parametrize("segments,valid,permute", [(False, False, False), (True, False, False),
                                                    (True, True, True), (False, True, True)])
def test_capacity_sums_match_reference(segments, valid, permute):
    logb, pos, seg, kv = _capacity_case(segments, valid, permute)
    x_r = logb.clone().requires_grad_(True)
    x_c = logb.clone().requires_grad_(True)
    s_r = capacity_sums_reference(x_r, pos, seg, kv)
    s_c = capacity_sums(x_c, pos, seg, kv, block=32)
    torch.testing.assert_close(s_c, s_r, rtol=1e-12, atol=1e-12)
    g = torch.randn(s_r.shape, dtype=s_r.dtype, generator=torch.Generator().manual_seed(2))
    (d_r,) = torch.autograd.grad(s_r, x_r, g)
    (d_c,) = torch.autograd.grad(s_c, x_c, g)
    torch.testing.assert_close(d_c, d_r, rtol=1e-10, atol=1e-10)


def test_capacity_sums_bounds_and_segment_starts():
    logb, pos, seg, _ = _capacity_case(segments=True, valid=False, permute=False)
    s = capacity_sums(logb, pos, seg, block=16)  # [B, Hkv, T]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert torch.equal(s[starts[:, None].expand_as(s)], torch.ones(int(starts.sum()) * 3, dtype=s.dtype))
    n_visible = ((pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])).sum(-1)
    assert (s <= n_visible[:, None] + 1e-9).all() and (s >= 1 - 1e-12).all()
    no_decay = capacity_sums(torch.zeros_like(logb), pos, seg, block=16)
    torch.testing.assert_close(no_decay, n_visible[:, None].expand_as(s).to(s.dtype))


def test_capacity_sums_fp32_gradcheck():
    logb, pos, seg, kv = _capacity_case(True, True, True, T=9, seed=3)
    x = logb.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: capacity_sums(t, pos, seg, kv, block=4), (x,))
    s32 = capacity_sums(logb.float(), pos, seg, kv, block=4)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), capacity_sums_reference(logb, pos, seg, kv), rtol=1e-5, atol=1e-5)

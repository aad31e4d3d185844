r"""Retention-gated attention ("soft eviction", TRIM-KV Eq. 3) and the soft cache size S_t.

Math. Query i (position ``q_pos[i]``) attends to key j (position ``k_pos[j]``) with weight

    w_ij = exp(scaling * q_i . k_j + d_ij * logb_j) / sum_{j' visible} exp(...),
    d_ij = q_pos[i] - k_pos[j] >= 0,

where ``logb_j = log beta_j <= 0`` is key j's log retention for its KV head. Key j is *visible* to query i
iff ``k_pos[j] <= q_pos[i]``, both belong to the same segment (packed document) and the key slot is
valid. A query row with no visible key returns zeros. ``logb_j -> -inf`` removes key j exactly for every
later query (soft eviction becomes hard eviction); ``logb = 0`` is plain causal attention.

GQA: query head h uses KV head ``h // G`` (``G = H // Hkv``) and that head's logb. Inside the kernels the
G query heads of a KV head are folded into the query-row dimension (``q -> [B, Hkv, G*T, D]``), so keys
and values are never repeated in memory.

Gradients (used by the chunked backward, FlashAttention-2 style, recomputed from the saved log-sum-exp):

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dQ = scaling dS K,  dK = scaling dS^T Q,  dlogb_j = sum_{g, i} dS_ij * d_ij.

Soft cache size (capacity loss): ``S_t = sum_{i visible to t} exp((pos_t - pos_i) * logb_i)``, the token
itself counting 1, with ``dlogb_i = sum_t g_t * exp(...) * (pos_t - pos_i)``.

Every fast path has a reference that materialises the full ``T x S`` matrices; the tests compare them.
The chunked paths use O(T x block) memory and never build a ``T x S`` tensor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import has_triton
from .shapes import I64_MIN, block_ranges, check_capacity, check_meta, check_qkv

__all__ = [
    "retention_attention",
    "retention_attention_reference",
    "retention_attention_chunked",
    "capacity_sums",
    "capacity_sums_reference",
]

IMPLS = ("auto", "reference", "chunked", "triton", "flex")   # the one list of training-attention implementations
CAPACITY_IMPLS = ("auto", "chunked", "triton")                # implementations of the soft cache sizes S_t
_AUTO_CHUNK_ABOVE = 1024 * 1024  # on CPU, "auto" uses the chunked path when T * S exceeds this


# ----------------------------------------------------------------------------------------------------
# Shared helpers: visibility, decay, block skipping (input checks: trimkv.shapes)
# ----------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 stays fp64 (tests use it for tight tolerances)."""
    return torch.promote_types(dtype, torch.float32)


def _visible(qp: Tensor, kp: Tensor, qs: Tensor | None, ks: Tensor | None, kv: Tensor | None) -> Tensor:
    """[B, tq], [B, tk] -> [B, tq, tk] bool: key at or before the query, same segment, valid slot."""
    vis = kp[:, None, :] <= qp[:, :, None]
    if qs is not None:
        vis = vis & (qs[:, :, None] == ks[:, None, :])
    if kv is not None:
        vis = vis & kv[:, None, :]
    return vis


def _decay(qp: Tensor, kp: Tensor, vis: Tensor, dtype: torch.dtype) -> Tensor:
    """d_ij = q_pos[i] - k_pos[j] as [B, tq, tk]; 0 where not visible (keeps d * logb finite there)."""
    d = (qp[:, :, None] - kp[:, None, :]).to(dtype)
    return d.masked_fill(~vis, 0.0)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _block_table(q_pos, k_pos, q_seg, k_seg, k_valid, bq: int, bk: int) -> list[list[bool]]:
    """live[qi][kj] is False only if no query of block qi can see any key of block kj in any batch row.

    Safe skips: every valid key is after every query (min k_pos > max q_pos), the segment-id ranges of
    queries and valid keys do not overlap, or the key block holds no valid slot.
    """
    _, q_max = block_ranges(q_pos, bq, I64_MIN, None)  # [B, nqb]
    k_min, _ = block_ranges(k_pos, bk, I64_MIN, k_valid)  # [B, nkb]; I64_MAX if no valid key
    live = k_min[:, None, :] <= q_max[:, :, None]  # [B, nqb, nkb]
    if q_seg is not None:
        qs_min, qs_max = block_ranges(q_seg, bq, I64_MIN, None)
        ks_min, ks_max = block_ranges(k_seg, bk, I64_MIN, k_valid)
        live &= (ks_min[:, None, :] <= qs_max[:, :, None]) & (qs_min[:, :, None] <= ks_max[:, None, :])
    return live.any(0).tolist()


# ----------------------------------------------------------------------------------------------------
# Retention attention: reference
# ----------------------------------------------------------------------------------------------------
def retention_attention_reference(q, k, v, logb, *, scaling, q_pos, k_pos, q_seg=None, k_seg=None,
                                  k_valid=None) -> Tensor:
    """Ground truth: materialises the full [B, H, T, S] weights. Differentiable by autograd.

    Shapes: q [B, H, T, D]; k, v [B, Hkv, S, D]; logb [B, Hkv, S] (None = no decay); q_pos, q_seg [B, T];
    k_pos, k_seg, k_valid [B, S]. Returns [B, H, T, D] in q's dtype (math in fp32, or fp64 for fp64).
    """
    Hkv, G = check_qkv(q, k, v, logb)
    B, H, T, _ = q.shape
    S = k.shape[2]
    q_pos, k_pos, q_seg, k_seg, k_valid = check_meta(q_pos, k_pos, q_seg, k_seg, k_valid, B, T, S)
    cdt = _compute_dtype(q.dtype)
    q5 = q.to(cdt).unflatten(1, (Hkv, G))  # [B, Hkv, G, T, D]
    s = torch.einsum("bhgtd,bhsd->bhgts", q5, k.to(cdt)) * scaling  # [B, Hkv, G, T, S]
    vis = _visible(q_pos, k_pos, q_seg, k_seg, k_valid)  # [B, T, S]
    if logb is not None:
        d = _decay(q_pos, k_pos, vis, cdt)  # [B, T, S]
        s = s + d[:, None, None] * logb.to(cdt)[:, :, None, None, :]
    s = s.masked_fill(~vis[:, None, None], -math.inf)
    m = s.detach().amax(-1, keepdim=True)
    m = m.masked_fill(m == -math.inf, 0.0)  # rows with no visible key
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    w = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhgts,bhsd->bhgtd", w, v.to(cdt))  # [B, Hkv, G, T, D]
    return out.flatten(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Retention attention: chunked (online softmax forward, recompute backward)
# ----------------------------------------------------------------------------------------------------
def _block_scores(qb: Tensor, kb: Tensor, logb_b: Tensor, d: Tensor, vis: Tensor, scaling: float) -> Tensor:
    """qb [B, Hkv, G, bq, D], kb [B, Hkv, bk, D], logb_b [B, Hkv, bk], d / vis [B, bq, bk]
    -> masked scores [B, Hkv, G, bq, bk] (-inf where not visible)."""
    B, Hkv, G, bq, _ = qb.shape
    s = (qb.flatten(2, 3) @ kb.transpose(-1, -2)).view(B, Hkv, G, bq, -1) * scaling
    s = s + d[:, None, None] * logb_b[:, :, None, None, :]
    return s.masked_fill(~vis[:, None, None], -math.inf)


def _fold_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [B, Hkv, G, bq, X] @ b [B, Hkv, X, Y] -> [B, Hkv, G, bq, Y] with G folded into rows."""
    B, Hkv, G, bq, _ = a.shape
    return (a.flatten(2, 3) @ b).view(B, Hkv, G, bq, -1)


def _chunked_forward(q5, k, v, logb, meta, scaling, bq, bk) -> tuple[Tensor, Tensor]:
    """Online-softmax forward. q5 [B, Hkv, G, T, D] -> out [B, Hkv, G, T, Dv], lse [B, Hkv, G, T]."""
    q_pos, k_pos, q_seg, k_seg, k_valid = meta
    B, Hkv, G, T, _ = q5.shape
    out = q5.new_zeros(B, Hkv, G, T, v.shape[-1])
    lse = q5.new_zeros(B, Hkv, G, T)
    live = _block_table(q_pos, k_pos, q_seg, k_seg, k_valid, bq, bk)
    for qi, (i0, i1) in enumerate(_blocks(T, bq)):
        qb = q5[:, :, :, i0:i1]
        m = q5.new_full((B, Hkv, G, i1 - i0), -math.inf)  # running max
        l = q5.new_zeros(B, Hkv, G, i1 - i0)  # running sum of exp
        acc = q5.new_zeros(B, Hkv, G, i1 - i0, v.shape[-1])
        for kj, (j0, j1) in enumerate(_blocks(k.shape[2], bk)):
            if not live[qi][kj]:
                continue
            qp, kp = q_pos[:, i0:i1], k_pos[:, j0:j1]
            vis = _visible(qp, kp, _sl(q_seg, i0, i1), _sl(k_seg, j0, j1), _sl(k_valid, j0, j1))
            d = _decay(qp, kp, vis, q5.dtype)
            s = _block_scores(qb, k[:, :, j0:j1], logb[:, :, j0:j1], d, vis, scaling)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # nothing visible yet
            p = torch.exp(s - m_safe[..., None])  # [B, Hkv, G, bq, bk]
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + _fold_matmul(p, v[:, :, j0:j1])
            m = m_new
        has = l > 0
        out[:, :, :, i0:i1] = acc / torch.where(has, l, torch.ones_like(l))[..., None]
        lse[:, :, :, i0:i1] = torch.where(has, m + torch.log(l), torch.zeros_like(l))
    return out, lse


def _sl(x: Tensor | None, a: int, b: int) -> Tensor | None:
    return None if x is None else x[:, a:b]


def _chunked_backward(do5, q5, k, v, logb, out5, lse, meta, scaling, bq, bk):
    """Recompute P from lse block by block; returns dq5, dk, dv, dlogb (compute dtype)."""
    q_pos, k_pos, q_seg, k_seg, k_valid = meta
    T = q5.shape[3]
    delta = (do5 * out5).sum(-1)  # [B, Hkv, G, T]
    dq, dk, dv, dlogb = (torch.zeros_like(x) for x in (q5, k, v, logb))
    live = _block_table(q_pos, k_pos, q_seg, k_seg, k_valid, bq, bk)
    for qi, (i0, i1) in enumerate(_blocks(T, bq)):
        qb, dob = q5[:, :, :, i0:i1], do5[:, :, :, i0:i1]
        for kj, (j0, j1) in enumerate(_blocks(k.shape[2], bk)):
            if not live[qi][kj]:
                continue
            qp, kp = q_pos[:, i0:i1], k_pos[:, j0:j1]
            vis = _visible(qp, kp, _sl(q_seg, i0, i1), _sl(k_seg, j0, j1), _sl(k_valid, j0, j1))
            d = _decay(qp, kp, vis, q5.dtype)  # [B, bq, bk]
            kb, vb = k[:, :, j0:j1], v[:, :, j0:j1]
            s = _block_scores(qb, kb, logb[:, :, j0:j1], d, vis, scaling)
            p = torch.exp(s - lse[:, :, :, i0:i1, None])  # [B, Hkv, G, bq, bk]
            dv[:, :, j0:j1] += p.flatten(2, 3).transpose(-1, -2) @ dob.flatten(2, 3)
            dp = _fold_matmul(dob, vb.transpose(-1, -2))
            ds = p * (dp - delta[:, :, :, i0:i1, None])
            dq[:, :, :, i0:i1] += _fold_matmul(ds, kb) * scaling
            dk[:, :, j0:j1] += (ds.flatten(2, 3).transpose(-1, -2) @ qb.flatten(2, 3)) * scaling
            dlogb[:, :, j0:j1] += torch.einsum("bhgqk,bqk->bhk", ds, d)
    return dq, dk, dv, dlogb


class _RetentionAttentionFn(torch.autograd.Function):
    """Chunked retention attention with a hand-written backward (grads for q, k, v and logb)."""

    @staticmethod
    def forward(ctx, q, k, v, logb, q_pos, k_pos, q_seg, k_seg, k_valid, scaling, bq, bk):
        Hkv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        q5 = q.to(cdt).unflatten(1, (Hkv, q.shape[1] // Hkv))  # [B, Hkv, G, T, D]
        meta = (q_pos, k_pos, q_seg, k_seg, k_valid)
        out5, lse = _chunked_forward(q5, k.to(cdt), v.to(cdt), logb.to(cdt), meta, scaling, bq, bk)
        ctx.save_for_backward(q, k, v, logb, out5, lse, q_pos, k_pos, q_seg, k_seg, k_valid)
        ctx.cfg = (scaling, bq, bk)
        return out5.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, logb, out5, lse, *meta = ctx.saved_tensors
        scaling, bq, bk = ctx.cfg
        cdt = out5.dtype
        do5 = dout.to(cdt).unflatten(1, out5.shape[1:3])  # [B, Hkv, G, T, Dv]
        q5 = q.to(cdt).unflatten(1, out5.shape[1:3])
        dq5, dk, dv, dlogb = _chunked_backward(do5, q5, k.to(cdt), v.to(cdt), logb.to(cdt), out5, lse,
                                               tuple(meta), scaling, bq, bk)
        need = ctx.needs_input_grad
        return (dq5.flatten(1, 2).to(q.dtype) if need[0] else None,
                dk.to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None,
                dlogb.to(logb.dtype) if need[3] else None,
                *([None] * 8))


def retention_attention_chunked(q, k, v, logb, *, scaling, q_pos, k_pos, q_seg=None, k_seg=None,
                                k_valid=None, block_q=128, block_k=128) -> Tensor:
    """Same result as :func:`retention_attention_reference` with O(T x block) memory.

    Query blocks x key blocks with an online softmax; the backward recomputes each block from the saved
    log-sum-exp. Key blocks that no query of a block can see are skipped.
    """
    Hkv, _ = check_qkv(q, k, v, logb)
    B, _, T, _ = q.shape
    S = k.shape[2]
    meta = check_meta(q_pos, k_pos, q_seg, k_seg, k_valid, B, T, S)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    if logb is None:
        logb = q.new_zeros(B, Hkv, S, dtype=torch.float32)
    return _RetentionAttentionFn.apply(q, k, v, logb, *meta, float(scaling), int(block_q), int(block_k))


def retention_attention(q, k, v, logb, *, scaling, q_pos, k_pos, q_seg=None, k_seg=None, k_valid=None,
                        impl="auto", block_q=128, block_k=128) -> Tensor:
    """Retention-gated attention; see the module docstring for the math.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; logb [B, Hkv, S] fp32 or None (plain attention);
    q_pos [B, T], k_pos [B, S] int64; q_seg [B, T] / k_seg [B, S] document ids or None;
    k_valid [B, S] bool or None. Returns [B, H, T, D] in q's dtype.
    impl: "reference" (materialises T x S), "chunked" (O(T x block) memory), or the GPU fast paths of
    :mod:`trimkv.kernels`: "triton" (FlashAttention-style kernels, own 64 x 64 tiles; CPU only under
    TRITON_INTERPRET=1) and "flex" (FlexAttention score_mod; no backward on CPU). "auto" is "triton" on CUDA tensors
    (when triton is installed) and, on CPU, "reference" up to T * S = 1024 * 1024, "chunked" above.
    block_q / block_k apply to the chunked path.
    """
    impl = resolve_impl(impl, q, k.shape[2])
    kw = dict(scaling=scaling, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, k_valid=k_valid)
    if impl == "reference":
        return retention_attention_reference(q, k, v, logb, **kw)
    if impl == "triton":
        from .kernels.triton_attention import retention_attention_triton

        return retention_attention_triton(q, k, v, logb, **kw)
    if impl == "flex":
        from .kernels.flex import retention_attention_flex

        return retention_attention_flex(q, k, v, logb, **kw)
    return retention_attention_chunked(q, k, v, logb, block_q=block_q, block_k=block_k, **kw)


def resolve_impl(impl: str, q: Tensor, S: int) -> str:
    """The implementation ``impl="auto"`` stands for with queries ``q`` [B, H, T, D] and S keys (see
    :func:`retention_attention`); any other name is checked against :data:`IMPLS` and returned."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if q.is_cuda and has_triton():
        return "triton"
    return "chunked" if q.shape[2] * S > _AUTO_CHUNK_ABOVE else "reference"


# ----------------------------------------------------------------------------------------------------
# Soft cache size S_t for the capacity loss
# ----------------------------------------------------------------------------------------------------
def _retention_block(logb_b: Tensor, pos, seg, valid, t0, t1, i0, i1) -> tuple[Tensor, Tensor]:
    """alpha_ti = exp((pos_t - pos_i) logb_i) for t in [t0, t1), i in [i0, i1): ([B, Hkv, bt, bi], d)."""
    vis = _visible(pos[:, t0:t1], pos[:, i0:i1], _sl(seg, t0, t1), _sl(seg, i0, i1), _sl(valid, i0, i1))
    d = _decay(pos[:, t0:t1], pos[:, i0:i1], vis, logb_b.dtype)  # [B, bt, bi]
    alpha = torch.exp(d[:, None] * logb_b[:, :, None, :]).masked_fill(~vis[:, None], 0.0)
    return alpha, d


class _CapacitySumsFn(torch.autograd.Function):
    """S_t = sum_i alpha_ti, blockwise; backward dlogb_i = sum_t g_t alpha_ti d_ti."""

    @staticmethod
    def forward(ctx, logb, pos, seg, valid, block):
        T = logb.shape[2]
        lc = logb.to(_compute_dtype(logb.dtype))
        out = torch.zeros_like(lc)  # [B, Hkv, T]
        live = _block_table(pos, pos, seg, seg, valid, block, block)
        for ti, (t0, t1) in enumerate(_blocks(T, block)):
            for ii, (i0, i1) in enumerate(_blocks(T, block)):
                if live[ti][ii]:
                    alpha, _ = _retention_block(lc[:, :, i0:i1], pos, seg, valid, t0, t1, i0, i1)
                    out[:, :, t0:t1] += alpha.sum(-1)
        ctx.save_for_backward(logb, pos, seg, valid)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, g):
        logb, pos, seg, valid = ctx.saved_tensors
        block, T = ctx.block, logb.shape[2]
        lc = logb.to(_compute_dtype(logb.dtype))
        g = g.to(lc.dtype)
        dlogb = torch.zeros_like(lc)
        live = _block_table(pos, pos, seg, seg, valid, block, block)
        for ti, (t0, t1) in enumerate(_blocks(T, block)):
            for ii, (i0, i1) in enumerate(_blocks(T, block)):
                if live[ti][ii]:
                    alpha, d = _retention_block(lc[:, :, i0:i1], pos, seg, valid, t0, t1, i0, i1)
                    dlogb[:, :, i0:i1] += (g[:, :, t0:t1, None] * alpha * d[:, None]).sum(-2)
        return dlogb.to(logb.dtype), None, None, None, None


def capacity_sums(logb, pos, seg=None, valid=None, block=256, impl="auto") -> Tensor:
    """Soft cache size S_t = sum_{i visible to t} exp((pos_t - pos_i) logb_i), blockwise.

    logb [B, Hkv, T] fp32; pos [B, T] int64; seg [B, T] document ids or None; valid [B, T] bool or None.
    Returns [B, Hkv, T] in fp32 (fp64 for fp64 logb). Differentiable w.r.t. logb, O(T x block) memory.
    ``impl``: "chunked" (PyTorch blocks of ``block``), "triton" (one kernel; 64-wide blocks) or "auto" (triton on
    CUDA tensors when triton is installed and logb is not fp64, else chunked).
    """
    if impl not in CAPACITY_IMPLS:
        raise ValueError(f"capacity impl must be one of {CAPACITY_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if logb.is_cuda and logb.dtype != torch.float64 and has_triton() else "chunked"
    if impl == "triton":
        from .kernels.triton_attention import capacity_sums_triton

        return capacity_sums_triton(logb, pos, seg, valid)
    pos, seg, valid = check_capacity(logb, pos, seg, valid)
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    return _CapacitySumsFn.apply(logb, pos, seg, valid, int(block))


def capacity_sums_reference(logb, pos, seg=None, valid=None) -> Tensor:
    """Brute-force S_t through a [B, Hkv, T, T] matrix; the ground truth for :func:`capacity_sums`."""
    pos, seg, valid = check_capacity(logb, pos, seg, valid)
    lc = logb.to(_compute_dtype(logb.dtype))
    vis = _visible(pos, pos, seg, seg, valid)  # [B, T, T]
    d = _decay(pos, pos, vis, lc.dtype)
    alpha = torch.exp(d[:, None] * lc[:, :, None, :])  # [B, Hkv, T, T]
    return torch.where(vis[:, None], alpha, torch.zeros_like(alpha)).sum(-1)

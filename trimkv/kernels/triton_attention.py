r"""Triton retention attention (FlashAttention-2 style) and the soft cache sizes S_t, forward and backward.

Same math and the same signature as :func:`trimkv.attention.retention_attention_reference` (see that module's
docstring): for query i and key j

    s_ij = scaling * q_i . k_j + (q_pos_i - k_pos_j) * logb_j      (visible: k_pos_j <= q_pos_i, same segment,
                                                                      valid key slot; otherwise -inf)

Kernels (all fp32 accumulation; q/k/v may be fp16 / bf16 / fp32, logb is fp32):

* ``_attn_fwd``      one program per (query block, batch x query head): online softmax over key blocks,
                     writes out [B, H, T, D] and the log-sum-exp [B, H, T] (0 for rows with no visible key).
* ``_attn_bwd_dkdv`` one program per (key block, batch x KV head): loops over the G query heads of the group and
                     the query blocks, accumulates dK, dV and ``dlogb_j = sum_i dS_ij (q_pos_i - k_pos_j)`` in
                     registers (no atomics, GQA keys never repeated).
* ``_attn_bwd_dq``   one program per (query block, batch x query head): dQ.
* ``_cap_kernel``: S_t = sum_{i visible to t} exp((pos_t - pos_i) logb_i), or (``BACKWARD``) its logb gradient.

The attention kernels share their tile helpers (``_load_q_tile``, ``_load_kv_tile``, ``_score_tile``,
``_probs_and_ds``), so the forward and both backward passes compute one score formula from the same loads.

Key blocks that no query of a query block can see (every valid key position after every query position) are
skipped with a per-block table computed on the host side, as in the chunked PyTorch path. Nothing of size T x S
is ever allocated. On CPU the kernels run under ``TRITON_INTERPRET=1`` (slow; tests only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shapes import I64_MIN, block_ranges, check_capacity, check_meta, check_qkv


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _visible(qp, kp, q_ok, k_ok, QSEG, KSEG, KVALID, q_off, k_off, seg_q_ok, HAS_SEG: tl.constexpr,
             HAS_VALID: tl.constexpr):
    """[BM], [BN] positions -> [BM, BN] visibility (causal by position, segment, valid slot, in range)."""
    vis = (kp[None, :] <= qp[:, None]) & q_ok[:, None] & k_ok[None, :]
    if HAS_SEG:
        qs = tl.load(QSEG + q_off, mask=seg_q_ok, other=-1)
        ks = tl.load(KSEG + k_off, mask=k_ok, other=-2)
        vis = vis & (qs[:, None] == ks[None, :])
    if HAS_VALID:
        kv = tl.load(KVALID + k_off, mask=k_ok, other=0)
        vis = vis & (kv[None, :] != 0)
    return vis


@triton.jit
def _query_program(H, HKV):
    """A (query block, batch x query head) program -> its query block, batch x query head, batch, batch x KV head
    (GQA: query head h reads KV head h // (H / HKV))."""
    mb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    return mb, bh, b, b * HKV + (bh % H) // (H // HKV)


@triton.jit
def _load_q_tile(Q, QPOS, bh, b, mb, T, D, offs_d, d_ok, BLOCK_M: tl.constexpr):
    """Query block ``mb`` of (batch x query head) ``bh`` -> offsets [BM], in range [BM], q [BM, BD], positions [BM]."""
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    qp = tl.load(QPOS + b * T + offs_m, mask=m_ok, other=-1)
    return offs_m, m_ok, q, qp


@triton.jit
def _query_block(Q, QPOS, QMAX, H, HKV, T, D, NQB, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a (query block, batch x query head) program starts from: its ids, the head-dim lanes, its query tile
    and positions, and the block's largest query position (for skipping key blocks)."""
    mb, bh, b, kvh = _query_program(H, HKV)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_m, m_ok, q, qp = _load_q_tile(Q, QPOS, bh, b, mb, T, D, offs_d, d_ok, BLOCK_M)
    q_max = tl.load(QMAX + b * NQB + mb)
    return bh, b, kvh, offs_d, d_ok, offs_m, m_ok, q, qp, q_max


@triton.jit
def _load_grad_rows(DO, LSE, DELTA, bh, offs_m, m_ok, T, D, offs_d, d_ok):
    """The backward's per-query inputs of a query block: dO [BM, BD], log-sum-exp [BM], delta = rowsum(dO * O) [BM]."""
    do = tl.load(DO + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                 other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
    return do, lse, delta


@triton.jit
def _load_kv_tile(K, V, KPOS, LOGB, kvh, b, nb, S, D, offs_d, d_ok, BLOCK_N: tl.constexpr):
    """Key block ``nb`` of (batch x KV head) ``kvh`` -> offsets [BN], in range [BN], k / v [BN, BD], positions [BN],
    log retentions [BN]."""
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    kd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kvh * S * D + offs_n[:, None] * D + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + kvh * S * D + offs_n[:, None] * D + offs_d[None, :], mask=kd_mask, other=0.0)
    kp = tl.load(KPOS + b * S + offs_n, mask=n_ok, other=0)
    lb = tl.load(LOGB + kvh * S + offs_n, mask=n_ok, other=0.0)
    return offs_n, n_ok, k, v, kp, lb


@triton.jit
def _score_tile(q, k, lb, qp, kp, m_ok, n_ok, q_off, k_off, QSEG, KSEG, KVALID, scaling,
                HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    """One tile of scores: s = scaling * q.k + dist * logb [BM, BN] (-inf where not visible) and
    dist = q_pos - k_pos [BM, BN] (0 where not visible)."""
    vis = _visible(qp, kp, m_ok, n_ok, QSEG, KSEG, KVALID, q_off, k_off, m_ok, HAS_SEG, HAS_VALID)
    dist = tl.where(vis, (qp[:, None] - kp[None, :]).to(tl.float32), 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling + dist * lb[None, :]
    return tl.where(vis, s, float("-inf")), dist


@triton.jit
def _key_block_scores(K, V, KPOS, LOGB, QSEG, KSEG, KVALID, kvh, b, nb, S, T, D, offs_d, d_ok, q, qp, offs_m, m_ok,
                      scaling, HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """A query-block program's step over key block ``nb``: the block's k, v [BN, BD] and the scores [BM, BN]."""
    offs_n, n_ok, k, v, kp, lb = _load_kv_tile(K, V, KPOS, LOGB, kvh, b, nb, S, D, offs_d, d_ok, BLOCK_N)
    s, _ = _score_tile(q, k, lb, qp, kp, m_ok, n_ok, b * T + offs_m, b * S + offs_n, QSEG, KSEG, KVALID, scaling,
                       HAS_SEG, HAS_VALID, PREC)
    return k, v, s


@triton.jit
def _probs_and_ds(s, lse, do, v, delta, PREC: tl.constexpr):
    """Backward of one tile: probabilities p = exp(s - lse) (0 where s is -inf) and dS = p * (dO.v - delta)."""
    p = tl.exp(s - lse[:, None])                                                    # [BM, BN]
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_fwd(Q, K, V, LOGB, QPOS, KPOS, QSEG, KSEG, KVALID, QMAX, KMIN, OUT, LSE,
              scaling, H, HKV, T, S, D, NQB, NKB,
              HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    bh, b, kvh, offs_d, d_ok, offs_m, m_ok, q, qp, q_max = _query_block(Q, QPOS, QMAX, H, HKV, T, D, NQB,
                                                                        BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, NKB):
        if tl.load(KMIN + b * NKB + nb) <= q_max:
            k, v, s = _key_block_scores(K, V, KPOS, LOGB, QSEG, KSEG, KVALID, kvh, b, nb, S, T, D, offs_d, d_ok, q, qp,
                                        offs_m, m_ok, scaling, HAS_SEG, HAS_VALID, PREC, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            corr = tl.exp(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, 1)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(OUT + bh * T * D + offs_m[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * T + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, LOGB, QPOS, KPOS, QSEG, KSEG, KVALID, QMAX, KMIN, DO, LSE, DELTA, DK, DV, DLOGB,
                   scaling, H, HKV, T, S, D, NQB, NKB,
                   HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    nb = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = kvh // HKV
    hk = kvh % HKV
    G = H // HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n, n_ok, k, v, kp, lb = _load_kv_tile(K, V, KPOS, LOGB, kvh, b, nb, S, D, offs_d, d_ok, BLOCK_N)
    k_min = tl.load(KMIN + b * NKB + nb)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dl = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, G):
        bh = b * H + hk * G + g
        for mb in range(0, NQB):
            q_max = tl.load(QMAX + b * NQB + mb)
            if k_min <= q_max:
                offs_m, m_ok, q, qp = _load_q_tile(Q, QPOS, bh, b, mb, T, D, offs_d, d_ok, BLOCK_M)
                do, lse, delta = _load_grad_rows(DO, LSE, DELTA, bh, offs_m, m_ok, T, D, offs_d, d_ok)
                s, dist = _score_tile(q, k, lb, qp, kp, m_ok, n_ok, b * T + offs_m, b * S + offs_n, QSEG, KSEG,
                                      KVALID, scaling, HAS_SEG, HAS_VALID, PREC)
                p, ds = _probs_and_ds(s, lse, do, v, delta, PREC)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
                dl += tl.sum(ds * dist, 0)
    kd_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + kvh * S * D + offs_n[:, None] * D + offs_d[None, :], dk * scaling, mask=kd_mask)
    tl.store(DV + kvh * S * D + offs_n[:, None] * D + offs_d[None, :], dv, mask=kd_mask)
    tl.store(DLOGB + kvh * S + offs_n, dl, mask=n_ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, LOGB, QPOS, KPOS, QSEG, KSEG, KVALID, QMAX, KMIN, DO, LSE, DELTA, DQ,
                 scaling, H, HKV, T, S, D, NQB, NKB,
                 HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    bh, b, kvh, offs_d, d_ok, offs_m, m_ok, q, qp, q_max = _query_block(Q, QPOS, QMAX, H, HKV, T, D, NQB,
                                                                        BLOCK_M, BLOCK_D)
    do, lse, delta = _load_grad_rows(DO, LSE, DELTA, bh, offs_m, m_ok, T, D, offs_d, d_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, NKB):
        if tl.load(KMIN + b * NKB + nb) <= q_max:
            k, v, s = _key_block_scores(K, V, KPOS, LOGB, QSEG, KSEG, KVALID, kvh, b, nb, S, T, D, offs_d, d_ok, q, qp,
                                        offs_m, m_ok, scaling, HAS_SEG, HAS_VALID, PREC, BLOCK_N)
            _, ds = _probs_and_ds(s, lse, do, v, delta, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq * scaling,
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _retention_tile(LOGB, POS, SEG, VALID, kvh, b, T, tb, ib, HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr,
                    BLOCK: tl.constexpr):
    """alpha_ti = exp((pos_t - pos_i) logb_i) for t in block ``tb``, i in block ``ib`` ([BT, BI], 0 where i is not
    visible to t), with dist = pos_t - pos_i and the t / i offsets and range masks."""
    offs_t = tb * BLOCK + tl.arange(0, BLOCK)
    offs_i = ib * BLOCK + tl.arange(0, BLOCK)
    t_ok, i_ok = offs_t < T, offs_i < T
    tp = tl.load(POS + b * T + offs_t, mask=t_ok, other=-1)
    ip = tl.load(POS + b * T + offs_i, mask=i_ok, other=0)
    lb = tl.load(LOGB + kvh * T + offs_i, mask=i_ok, other=0.0)
    vis = _visible(tp, ip, t_ok, i_ok, SEG, SEG, VALID, b * T + offs_t, b * T + offs_i, t_ok, HAS_SEG, HAS_VALID)
    dist = tl.where(vis, (tp[:, None] - ip[None, :]).to(tl.float32), 0.0)
    alpha = tl.where(vis, tl.exp(dist * lb[None, :]), 0.0)
    return alpha, dist, offs_t, t_ok, offs_i, i_ok


@triton.jit
def _cap_kernel(LOGB, POS, SEG, VALID, TMAX, IMIN, GRAD, OUT, HKV, T, NB,
                HAS_SEG: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per (block j, batch x KV head). Forward: S_t for the t of block j (sum over the i blocks they can
    see). BACKWARD: dlogb_i = sum_t g_t alpha_ti (pos_t - pos_i) for the i of block j (GRAD = dL/dS)."""
    j = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = kvh // HKV
    own = tl.load(IMIN + b * NB + j) if BACKWARD else tl.load(TMAX + b * NB + j)
    acc = tl.zeros([BLOCK], tl.float32)
    for o in range(0, NB):
        live = own <= tl.load(TMAX + b * NB + o) if BACKWARD else tl.load(IMIN + b * NB + o) <= own
        if live:
            tb = o if BACKWARD else j
            ib = j if BACKWARD else o
            alpha, dist, offs_t, t_ok, _, _ = _retention_tile(LOGB, POS, SEG, VALID, kvh, b, T, tb, ib, HAS_SEG,
                                                              HAS_VALID, BLOCK)
            if BACKWARD:
                g = tl.load(GRAD + kvh * T + offs_t, mask=t_ok, other=0.0)
                acc += tl.sum(g[:, None] * alpha * dist, 0)
            else:
                acc += tl.sum(alpha, 1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + kvh * T + offs, acc, mask=offs < T)


# ------------------------------------------------------------------------------------------- host side
def _tables(q_pos, k_pos, k_valid, bq: int, bk: int) -> tuple[Tensor, Tensor]:
    """Per-block max query position [B, nqb] and min valid key position [B, nkb] (int64, contiguous)."""
    _, q_max = block_ranges(q_pos, bq, I64_MIN, None)
    k_min, _ = block_ranges(k_pos, bk, I64_MIN, k_valid)
    return q_max.contiguous(), k_min.contiguous()


def _aux(x: Tensor | None, like: Tensor) -> Tensor:
    """Optional int tensor -> contiguous int64 (a dummy pointer when absent)."""
    return like if x is None else x.to(torch.int64).contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The one dtype the kernels read q, k and v in (``tl.dot`` never mixes dtypes).

    Under autocast it is the autocast dtype, as for ``F.scaled_dot_product_attention`` (inside a bf16-autocast
    Llama, RoPE returns fp32 q/k while v stays bf16); otherwise the inputs' dtype, promoted if they differ.
    """
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


class _TritonRetentionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, logb, q_pos, k_pos, q_seg, k_seg, k_valid, scaling, bq, bk):
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        dt = compute_dtype(q, k, v)
        q, k, v = q.to(dt).contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous()
        logb = logb.float().contiguous()
        q_max, k_min = _tables(q_pos, k_pos, k_valid, bq, bk)
        meta = (q_pos.contiguous(), k_pos.contiguous(), _aux(q_seg, q_pos), _aux(k_seg, k_pos),
                _aux(k_valid, k_pos), q_max, k_min)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        cfg = dict(HAS_SEG=q_seg is not None, HAS_VALID=k_valid is not None, BLOCK_M=bq, BLOCK_N=bk,
                   BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=_prec(q.dtype))
        sizes = (scaling, H, Hkv, T, S, D, q_max.shape[1], k_min.shape[1])
        _attn_fwd[(q_max.shape[1], B * H)](q, k, v, logb, *meta, out, lse, *sizes, **cfg)
        ctx.save_for_backward(q, k, v, logb, out, lse, *meta)
        ctx.cfg, ctx.sizes = cfg, sizes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, logb, out, lse, *meta = ctx.saved_tensors
        cfg, sizes = ctx.cfg, ctx.sizes
        B, H = q.shape[:2]
        Hkv = k.shape[1]
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()                   # [B, H, T]
        dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
        dlogb = torch.empty_like(logb)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        nqb, nkb = sizes[-2], sizes[-1]
        _attn_bwd_dkdv[(nkb, B * Hkv)](q, k, v, logb, *meta, dout, lse, delta, dk, dv, dlogb, *sizes, **cfg)
        _attn_bwd_dq[(nqb, B * H)](q, k, v, logb, *meta, dout, lse, delta, dq, *sizes, **cfg)
        q_dt, k_dt, v_dt = ctx.in_dtypes
        return dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), dlogb, *([None] * 8)


def retention_attention_triton(q, k, v, logb, *, scaling, q_pos, k_pos, q_seg=None, k_seg=None, k_valid=None,
                               block_q=64, block_k=64) -> Tensor:
    """Retention attention through the Triton kernels; same contract as ``retention_attention_reference``.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; logb [B, Hkv, S] fp32 or None; q_pos / q_seg [B, T]; k_pos / k_seg /
    k_valid [B, S]. fp16 / bf16 / fp32 inputs (fp32 accumulation), read in :func:`compute_dtype` (the autocast
    dtype under autocast); returns [B, H, T, D] in that dtype, gradients in the inputs' dtypes. Block sizes must be
    powers of two >= 16.
    """
    Hkv, _ = check_qkv(q, k, v, logb)
    B, _, T, _ = q.shape
    S = k.shape[2]
    q_pos, k_pos, q_seg, k_seg, k_valid = check_meta(q_pos, k_pos, q_seg, k_seg, k_valid, B, T, S)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton path takes fp16 / bf16 / fp32 inputs, got {name} in {x.dtype}; "
                             "use impl='chunked'")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {blk}")
    if logb is None:
        logb = q.new_zeros(B, Hkv, S, dtype=torch.float32)
    return _TritonRetentionAttention.apply(q, k, v, logb, q_pos, k_pos, q_seg, k_seg, k_valid, float(scaling),
                                           int(block_q), int(block_k))


class _TritonCapacitySums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logb, pos, seg, valid, block):
        B, Hkv, T = logb.shape
        lc = logb.float().contiguous()
        t_max, i_min = _tables(pos, pos, valid, block, block)
        meta = (pos.contiguous(), _aux(seg, pos), _aux(valid, pos), t_max, i_min)
        out = torch.empty_like(lc)
        cfg = dict(HAS_SEG=seg is not None, HAS_VALID=valid is not None, BLOCK=block)
        _cap_kernel[(t_max.shape[1], B * Hkv)](lc, *meta, lc, out, Hkv, T, t_max.shape[1], BACKWARD=False, **cfg)
        ctx.save_for_backward(lc, *meta)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, grad):
        lc, *meta = ctx.saved_tensors
        B, Hkv, T = lc.shape
        dlogb = torch.empty_like(lc)
        nb = meta[-2].shape[1]
        _cap_kernel[(nb, B * Hkv)](lc, *meta, grad.float().contiguous(), dlogb, Hkv, T, nb, BACKWARD=True, **ctx.cfg)
        return dlogb, None, None, None, None


def capacity_sums_triton(logb, pos, seg=None, valid=None, block=64) -> Tensor:
    """S_t = sum_{i visible to t} exp((pos_t - pos_i) logb_i) through Triton; same contract as
    :func:`trimkv.attention.capacity_sums` (logb [B, Hkv, T] -> [B, Hkv, T] fp32, differentiable)."""
    pos, seg, valid = check_capacity(logb, pos, seg, valid)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return _TritonCapacitySums.apply(logb, pos, seg, valid, int(block))

"""The training losses: quality (KL + next-token CE) and capacity.

Quality. The teacher is the frozen model with gates off; the student is the same model with gates on.
Hidden state h_t (after the final norm, what the LM head reads) predicts token t+1, so position t is
scored iff ``loss_mask[b, t+1]`` (e.g. assistant tokens in chat data). Over the set P of scored positions

    L_KL  = 1/|P| sum_{t in P} sum_v p_T(v | h^T_t) (log p_T(v | h^T_t) - log p_S(v | h^S_t))
    L_NTP = 1/|P| sum_{t in P} -log p_S(x_{t+1} | h^S_t)

with p = softmax(softcap(lm_head(h))) computed in fp32. Vocabularies are large (~150k) and sequences
long (16k-128k), so logits are never materialised for the whole sequence: the scored positions are
gathered and pushed through the LM head ``chunk_size`` rows at a time. Each chunk's loss runs under
non-reentrant activation checkpointing, so only the chunk's inputs ([chunk, d]) are kept for backward
and its [chunk, V] logits are recomputed there; memory is O(chunk x V) in forward and backward.

Capacity. S_t = sum_{i<=t} beta_i^(t-i) is the soft cache size of one (layer, KV head) after t tokens
(the newest token counts 1). With budget M and t = pos + 1 (1-based count of tokens seen):

    "paper":  L_cap = mean_{b,h,t} relu(S_t - M) / t                  # (1/T) sum_t (1/t) relu(S_t - M)
    "code":   L_cap = sum_{b,h,t} relu(S_t - M) / max(t - M, 1)  /  #{(b,h,t): t > M}

"paper" is Eq. (capacity loss) of arXiv 2512.03324; "code" is what the authors' later code does.
Callers average ``capacity_loss`` over layers.

Scope. "per_head" (TRIM-KV) bounds every (layer, head) by M. "global" (DBTrimKV, arXiv 2605.09649) bounds the sum
over the N = layers x KV heads rows of S by M_global = N * M, so heads and layers trade budget:

    "paper":  L_cap = mean_{b,t} relu(sum_n S_t^n - N M) / t / N
    "code":   L_cap = sum_{b,t} relu(sum_n S_t^n - N M) / max(t - M, 1) / N  /  #{(b,t): t > M}

The 1/N keeps the two scopes on one scale: when every head exceeds M by the same x, both give the same loss.
The S_t are the per-head sums of :func:`trimkv.attention.capacity_sums` (any implementation), summed afterwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CAPACITY_FORMS = ("paper", "code")
CAPACITY_SCOPES = ("per_head", "global")   # the recipe's loss.capacity_scope


# --------------------------------------------------------------------------------------------- quality


def _logprobs(hidden: torch.Tensor, lm_head: nn.Module, logit_softcap: float | None) -> torch.Tensor:
    """[N, d] hidden -> [N, V] log-probabilities in fp32 (fp64 stays fp64), optionally soft-capped."""
    logits = lm_head(hidden)  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return F.log_softmax(logits, dim=-1)


def _chunk_loss_sums(
    student: torch.Tensor,  # [N, d]
    teacher: torch.Tensor,  # [N, d]
    targets: torch.Tensor,  # [N]
    lm_head: nn.Module,
    logit_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) KL(p_T || p_S) and CE over the N rows of one chunk, fp32 scalars."""
    with torch.no_grad():
        t_logp = _logprobs(teacher, lm_head, logit_softcap)  # [N, V]
    s_logp = _logprobs(student, lm_head, logit_softcap)  # [N, V]
    kl = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True)
    ce = F.nll_loss(s_logp, targets, reduction="sum")
    return kl, ce


def _softcapped(logits: torch.Tensor, logit_softcap: float | None) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if logit_softcap is None else logit_softcap * torch.tanh(logits / logit_softcap)


class _FusedDistillation(torch.autograd.Function):
    """Summed KL(p_T || p_S) and CE over the scored rows, through a frozen linear LM head, with the gradient w.r.t.
    the student rows computed in the same pass, chunk by chunk.

    With l = softcap(z), z = W h + b the student logits: dKL/dl = p_S - p_T, dCE/dl = p_S - onehot(target), and
    dl/dz = 1 - (l / cap)^2 with a softcap. The forward keeps two [P, d] gradients (for KL and for CE) instead of
    any [P, V] tensor, so the backward is a scale-and-add: the teacher and student logits are computed once
    (the checkpointed reference path computes both twice). Same numbers as :func:`_chunk_loss_sums`.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, weight, bias, logit_softcap, chunk_size):
        acc = torch.promote_types(student.dtype, torch.float32)           # fp32 (fp64 stays fp64)
        grad_kl = torch.empty(student.shape, dtype=acc, device=student.device)   # [P, d]
        grad_ce = torch.empty_like(grad_kl)
        kl_sum = ce_sum = student.new_zeros((), dtype=acc)
        for a in range(0, student.shape[0], chunk_size):
            b = min(a + chunk_size, student.shape[0])
            t_logp = _softcapped(F.linear(teacher[a:b], weight, bias), logit_softcap).log_softmax(-1)   # [N, V]
            s_logits = _softcapped(F.linear(student[a:b], weight, bias), logit_softcap)
            s_logp = s_logits.log_softmax(-1)
            p_t = t_logp.exp()
            kl_sum = kl_sum + (p_t * (t_logp - s_logp)).sum()
            tgt = targets[a:b, None]
            ce_sum = ce_sum - s_logp.gather(-1, tgt).sum()
            g_kl = s_logp.exp_()                                           # p_S, in place of s_logp
            g_ce = g_kl.clone().scatter_add_(-1, tgt, torch.full_like(tgt, -1, dtype=g_kl.dtype))
            g_kl.sub_(p_t)
            del p_t, t_logp
            if logit_softcap is not None:
                dcap = 1 - (s_logits / logit_softcap) ** 2
                g_kl.mul_(dcap)
                g_ce.mul_(dcap)
            del s_logits
            grad_kl[a:b] = g_kl.to(weight.dtype) @ weight                  # [N, V] @ [V, d]
            grad_ce[a:b] = g_ce.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_kl, grad_ce)
        ctx.student_dtype = student.dtype
        return kl_sum, ce_sum

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        grad_kl, grad_ce = ctx.saved_tensors
        grad = grad_kl * g_kl.to(grad_kl.dtype) + grad_ce * g_ce.to(grad_kl.dtype)
        return grad.to(ctx.student_dtype), None, None, None, None, None, None


def _fusable(lm_head: nn.Module) -> bool:
    """The fused loss needs a plain linear LM head that does not train (every trimkv base model's)."""
    return (type(lm_head) is nn.Linear and not lm_head.weight.requires_grad
            and (lm_head.bias is None or not lm_head.bias.requires_grad))


def scored_rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*T rows) of hidden states whose NEXT token is a target: [P] int64."""
    scored = torch.zeros_like(loss_mask, dtype=torch.bool)  # [B, T]
    scored[:, :-1] = loss_mask[:, 1:]
    return scored.reshape(-1).nonzero().squeeze(-1)  # [P]


def distillation_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    chunk_size: int = 512,
    logit_softcap: float | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL(p_teacher || p_student) and next-token cross-entropy, computed in position chunks.

    student_hidden [B, T, d] (requires grad), teacher_hidden [B, T, d] (no grad): final hidden states after
    the model's final norm, i.e. what ``lm_head`` reads. lm_head: frozen d -> vocab module (e.g.
    ``model.get_output_embeddings()``). input_ids [B, T] int64. loss_mask [B, T] bool: True where
    input_ids[b, t] is a target token (predicted from position t-1; position 0 is never a target).
    The hidden state at t is scored iff loss_mask[b, t+1]; ``rows`` may give those positions precomputed
    (``scored_rows(loss_mask)``, e.g. on the host, which spares the GPU a host sync).

    Both losses are means over scored positions (KL summed over the vocabulary per position). Returns
    (kl, ntp) fp32 scalars (fp64 for fp64 inputs; log-softmax never runs below fp32). With no scored position both are zeros still connected to student_hidden, so
    ``backward()`` works. ``logit_softcap`` (Gemma-2 final softcap, ``cap * tanh(logits / cap)``) is
    applied to both teacher and student logits. Memory is O(chunk_size x vocab) in forward and backward.
    With a frozen ``nn.Linear`` LM head (``fused=True``) the gradient is computed in the forward pass
    (:class:`_FusedDistillation`); otherwise each chunk runs under activation checkpointing.
    """
    _check_distillation_inputs(student_hidden, teacher_hidden, input_ids, loss_mask, chunk_size)
    B, T, d = student_hidden.shape
    rows = scored_rows(loss_mask.bool()) if rows is None else rows  # [P]
    if rows.numel() == 0:
        zero = student_hidden.float().sum() * 0.0
        return zero, zero.clone()

    student_flat = student_hidden.reshape(B * T, d)  # [B*T, d]
    teacher_flat = teacher_hidden.detach().reshape(B * T, d)  # [B*T, d]
    targets_flat = input_ids.reshape(B * T)  # [B*T]
    grad_needed = torch.is_grad_enabled() and student_hidden.requires_grad
    n = rows.numel()

    # One gather for all scored rows: its backward is a single scatter into [B*T, d]. (A gather per chunk
    # would allocate and accumulate a full [B*T, d] gradient per chunk.) split() backward is one concat.
    student_rows = student_flat.index_select(0, rows)  # [P, d]
    if grad_needed and fused and _fusable(lm_head):
        kl_sum, ce_sum = _FusedDistillation.apply(
            student_rows, teacher_flat.index_select(0, rows), targets_flat.index_select(0, rows + 1),
            lm_head.weight, lm_head.bias, logit_softcap, int(chunk_size))
        return kl_sum / n, ce_sum / n
    # Reference path: checkpoint each chunk when a backward can follow (no randomness, no RNG to replay).
    use_ckpt = grad_needed

    kl_sum = ce_sum = 0.0
    for student, idx in zip(student_rows.split(chunk_size), rows.split(chunk_size)):  # [N, d], [N]
        teacher = teacher_flat.index_select(0, idx)  # [N, d]
        targets = targets_flat.index_select(0, idx + 1)  # [N], the next token of each scored row
        if use_ckpt:
            kl, ce = checkpoint(
                _chunk_loss_sums, student, teacher, targets, lm_head, logit_softcap,
                use_reentrant=False, preserve_rng_state=False,
            )
        else:
            kl, ce = _chunk_loss_sums(student, teacher, targets, lm_head, logit_softcap)
        kl_sum = kl_sum + kl
        ce_sum = ce_sum + ce
    return kl_sum / n, ce_sum / n


def _check_distillation_inputs(student_hidden, teacher_hidden, input_ids, loss_mask, chunk_size) -> None:
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be [B, T, d], got shape {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} "
            "must have the same [B, T, d] shape: pass the final-norm hidden states of the same batch"
        )
    bt = tuple(student_hidden.shape[:2])
    for name, t in (("input_ids", input_ids), ("loss_mask", loss_mask)):
        if tuple(t.shape) != bt:
            raise ValueError(f"{name} must be [B, T] = {bt} to match the hidden states, got {tuple(t.shape)}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


# -------------------------------------------------------------------------------------------- capacity


def capacity_loss(
    S: torch.Tensor,
    pos: torch.Tensor,
    budget: int,
    *,
    form: str = "paper",
    valid: torch.Tensor | None = None,
    scope: str = "per_head",
) -> torch.Tensor:
    """Capacity loss over the heads in ``S``; a scalar fp32.

    S [B, Hkv, T] fp32 soft cache sizes S_t = sum_{i<=t} beta_i^(t-i) (the token itself counts 1); the Hkv rows may
    be every layer's heads at once ([B, L * Hkv, T]). pos [B, T] int64 positions within each document (t = pos + 1
    tokens seen, 1-based). budget: M tokens per KV head. valid [B, T] bool or None: positions to include (e.g. not
    padding).

    form="paper": mean over included (b, h, t) of relu(S_t - M) / t.
    form="code":  sum over included (b, h, t) of relu(S_t - M) / max(t - M, 1), divided by the number of
                  included (b, h, t) with t > M (at least 1).
    scope="global": the same with the N rows of S summed into one and M replaced by N * M, divided by N
                  (see the module docstring).
    """
    if form not in CAPACITY_FORMS:
        raise ValueError(f"capacity loss form={form!r} is unknown; choose one of {CAPACITY_FORMS}")
    if scope not in CAPACITY_SCOPES:
        raise ValueError(f"capacity loss scope={scope!r} is unknown; choose one of {CAPACITY_SCOPES}")
    if budget < 1:
        raise ValueError(f"capacity budget M must be at least 1 token per KV head, got {budget}")
    _check_capacity_inputs(S, pos, valid)
    S = S.float()
    rows = S.shape[1]
    limit = float(budget)
    if scope == "global":
        # padding positions may hold inf / nan in S; they are excluded below, whatever the sum makes of them
        S, limit = S.sum(1, keepdim=True), limit * rows                  # [B, 1, T], M_global = N * M
    B, H, T = S.shape

    t = (pos + 1).to(torch.float32)[:, None, :]  # [B, 1, T]
    keep = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid.bool()
    keep = keep[:, None, :].expand(B, H, T)  # [B, H, T]
    excess = F.relu(S - limit)  # [B, H, T]

    if form == "paper":
        terms = excess / t  # [B, H, T]
        count = keep.sum()
    else:
        terms = excess / (t - budget).clamp_min(1.0)  # [B, H, T]
        count = (keep & (t > budget)).sum()
    # where() rather than multiply: S at excluded (padding) positions may hold inf / nan.
    total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    loss = total / count.clamp_min(1).to(torch.float32)
    return loss / rows if scope == "global" else loss


def _check_capacity_inputs(S, pos, valid) -> None:
    if S.dim() != 3:
        raise ValueError(f"S must be [B, Hkv, T] soft cache sizes, got shape {tuple(S.shape)}")
    bt = (S.shape[0], S.shape[2])
    if tuple(pos.shape) != bt:
        raise ValueError(f"pos must be [B, T] = {bt} to match S [B, Hkv, T], got {tuple(pos.shape)}")
    if valid is not None and tuple(valid.shape) != bt:
        raise ValueError(f"valid must be [B, T] = {bt} to match S [B, Hkv, T], got {tuple(valid.shape)}")

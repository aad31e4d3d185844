"""trimkv.losses: chunked KL / CE equal the full-logits values, memory stays per chunk, capacity loss math."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE
from trimkv.attention import capacity_sums, capacity_sums_reference
from trimkv.losses import CAPACITY_FORMS, capacity_loss, distillation_losses

B, T, D, V = 2, 16, 8, 64


def _batch(dtype=torch.float64, seed=0, mask_p=0.6):
    """Random student / teacher hidden states, a frozen nn.Linear LM head, ids and a random loss mask."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_(True)  # [B, T, d]
    teacher = torch.randn(B, T, D, generator=g, dtype=dtype)  # [B, T, d]
    head = nn.Linear(D, V, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    head.requires_grad_(False)
    ids = torch.randint(0, V, (B, T), generator=g)  # [B, T]
    mask = torch.rand(B, T, generator=g) < mask_p  # [B, T]
    return student, teacher, head, ids, mask


def _brute_force(student, teacher, head, ids, mask, softcap=None):
    """Full [B, T-1, V] logits, F.kl_div / F.cross_entropy on the scored rows."""
    def logits(h):
        z = head(h[:, :-1])  # [B, T-1, V]
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    scored = mask[:, 1:]  # [B, T-1]: hidden at t predicts token t+1
    s_logits, t_logits = logits(student)[scored], logits(teacher)[scored]  # [P, V]
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s_logits, ids[:, 1:][scored])
    return kl, ce


# ------------------------------------------------------------------------------------------ distillation


@pytest.mark.parametrize("chunk", [1, 3, 7, T])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_equals_full_logits_values_and_grads(chunk, softcap):
    student, teacher, head, ids, mask = _batch()
    kl, ce = distillation_losses(student, teacher, head, ids, mask, chunk_size=chunk, logit_softcap=softcap)
    (g_kl,) = torch.autograd.grad(kl, student, retain_graph=True)
    (g_ce,) = torch.autograd.grad(ce, student)

    ref_kl, ref_ce = _brute_force(student, teacher, head, ids, mask, softcap)
    (r_kl,) = torch.autograd.grad(ref_kl, student, retain_graph=True)
    (r_ce,) = torch.autograd.grad(ref_ce, student)

    torch.testing.assert_close(kl, ref_kl, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_kl, r_kl, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_ce, r_ce, rtol=1e-10, atol=1e-10)
    assert kl.item() > 0 and ce.item() > 0


def test_fp32_matches_and_unscored_positions_get_no_gradient():
    student, teacher, head, ids, mask = _batch(dtype=torch.float32, seed=1)
    kl, ce = distillation_losses(student, teacher, head, ids, mask, chunk_size=5)
    assert kl.dtype == ce.dtype == torch.float32 and kl.dim() == ce.dim() == 0
    (kl + ce).backward()
    ref_kl, ref_ce = _brute_force(student.detach(), teacher, head, ids, mask)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, 1:]
    assert student.grad[~scored].abs().max() == 0  # unscored rows never reach the LM head
    assert student.grad[scored].abs().amin(-1).gt(0).all()


def test_position_zero_is_never_a_target():
    student, teacher, head, ids, mask = _batch(seed=2)
    mask0, mask1 = mask.clone(), mask.clone()
    mask0[:, 0], mask1[:, 0] = False, True
    a = distillation_losses(student, teacher, head, ids, mask0, chunk_size=4)
    b = distillation_losses(student, teacher, head, ids, mask1, chunk_size=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kl_is_zero_when_student_equals_teacher():
    student, _, head, ids, mask = _batch(seed=3)
    kl, ce = distillation_losses(student, student.detach().clone(), head, ids, mask, chunk_size=3)
    assert abs(kl.item()) < 1e-12
    assert ce.item() > 0


def test_no_scored_position_gives_connected_zeros():
    student, teacher, head, ids, _ = _batch(seed=4)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 0] = True  # position 0 is never a target, so nothing is scored
    kl, ce = distillation_losses(student, teacher, head, ids, mask)
    assert kl.item() == 0 and ce.item() == 0 and kl.grad_fn is not None and ce.grad_fn is not None
    (kl + ce).backward()
    assert student.grad is not None and student.grad.abs().max() == 0


def test_bf16_inputs_give_fp32_losses_close_to_fp32():
    student, teacher, head, ids, mask = _batch(dtype=torch.float32, seed=5)
    kl, ce = distillation_losses(
        student.detach().bfloat16().requires_grad_(True), teacher.bfloat16(), head.bfloat16(), ids, mask,
        chunk_size=4,
    )
    assert kl.dtype == ce.dtype == torch.float32
    ref_kl, ref_ce = _brute_force(student.detach(), teacher, head.float(), ids, mask)
    torch.testing.assert_close(ce, ref_ce, rtol=0.05, atol=0.05)
    torch.testing.assert_close(kl, ref_kl, rtol=0.1, atol=0.1)


class _RowCountingHead(nn.Linear):
    """An LM head that records how many rows each call sees (forward and checkpoint recomputation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_seen: list[int] = []

    def forward(self, x):
        self.rows_seen.append(x.shape[0])
        return super().forward(x)


def _saved_numel(fn) -> tuple[int, int]:
    """Run fn(); return (largest, total) element counts of the tensors autograd saves for backward."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes), sum(sizes)


def test_chunked_backward_never_holds_full_logits():
    student, teacher, _, ids, _ = _batch(seed=6)
    head = _RowCountingHead(D, V, dtype=torch.float64).requires_grad_(False)
    mask = torch.ones(B, T, dtype=torch.bool)
    full = B * T * V
    chunk = 4

    # The hook does see full logits on the brute-force path (so it would catch them).
    largest, _ = _saved_numel(lambda: _brute_force(student, teacher, head, ids, mask))
    assert largest >= B * (T - 1) * V

    out = {}
    largest, total = _saved_numel(lambda: out.update(
        loss=sum(distillation_losses(student, teacher, head, ids, mask, chunk_size=chunk))))
    assert largest <= chunk * V < full
    assert total < full  # all chunks together keep less than one full set of logits (only [chunk, d] inputs)

    head.rows_seen.clear()
    out["loss"].backward()
    n_chunks = -(-B * (T - 1) // chunk)
    assert len(head.rows_seen) == 2 * n_chunks  # backward recomputes teacher and student logits per chunk
    assert max(head.rows_seen) <= chunk  # so every [rows, V] logits tensor in backward is one chunk
    assert student.grad.abs().sum() > 0


def test_distillation_rejects_bad_shapes():
    student, teacher, head, ids, mask = _batch()
    with pytest.raises(ValueError, match="teacher_hidden"):
        distillation_losses(student, teacher[:, :-1], head, ids, mask)
    with pytest.raises(ValueError, match="loss_mask"):
        distillation_losses(student, teacher, head, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        distillation_losses(student, teacher, head, ids, mask, chunk_size=0)


# ---------------------------------------------------------------------------------------------- capacity


def _capacity_brute_force(S, pos, M, form, valid):
    """Plain Python loops over (b, h, t), straight from the formulas."""
    Bs, H, Ts = S.shape
    total, count = 0.0, 0
    for b in range(Bs):
        for h in range(H):
            for i in range(Ts):
                if not valid[b, i]:
                    continue
                t = int(pos[b, i]) + 1
                excess = max(float(S[b, h, i]) - M, 0.0)
                if form == "paper":
                    total += excess / t
                    count += 1
                else:
                    total += excess / max(t - M, 1)
                    count += int(t > M)
    return total / max(count, 1)


def test_capacity_hand_computed_example():
    S = torch.tensor([[[1.0, 2.0, 2.5, 3.5]]])  # [1, 1, 4]
    pos = torch.arange(4)[None]  # t = 1, 2, 3, 4
    # relu(S - 2) = [0, 0, 0.5, 1.5]
    paper = (0.5 / 3 + 1.5 / 4) / 4
    code = (0.5 / 1 + 1.5 / 2) / 2  # max(t - M, 1) = [1, 1, 1, 2]; two entries with t > M
    assert capacity_loss(S, pos, 2).item() == pytest.approx(paper)
    assert capacity_loss(S, pos, 2, form="code").item() == pytest.approx(code)
    # Excluding the last position drops its term and its count.
    valid = torch.tensor([[True, True, True, False]])
    assert capacity_loss(S, pos, 2, valid=valid).item() == pytest.approx((0.5 / 3) / 3)
    assert capacity_loss(S, pos, 2, form="code", valid=valid).item() == pytest.approx(0.5)


@pytest.mark.parametrize("form", CAPACITY_FORMS)
@pytest.mark.parametrize("with_valid", [False, True])
def test_capacity_matches_loop_brute_force(form, with_valid):
    g = torch.Generator().manual_seed(7)
    Bs, H, Ts, M = 2, 3, 12, 3
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], list(range(12))])  # packed docs in row 0
    S = (pos[:, None, :] + 1) * torch.rand(Bs, H, Ts, generator=g)  # 0 <= S_t <= t, as for real gates
    valid = torch.rand(Bs, Ts, generator=g) < 0.7 if with_valid else torch.ones(Bs, Ts, dtype=torch.bool)
    got = capacity_loss(S, pos, M, form=form, valid=valid if with_valid else None)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_capacity_brute_force(S, pos, M, form, valid), rel=1e-6)
    assert got.item() > 0


@pytest.mark.parametrize("form", CAPACITY_FORMS)
def test_capacity_is_zero_within_budget(form):
    pos = torch.arange(20).expand(2, 20)
    S = torch.full((2, 4, 20), 5.0)
    S[..., :5] = (pos[:, None, :5] + 1).float()
    assert capacity_loss(S, pos, 5, form=form).item() == 0.0
    assert capacity_loss(S - 1, pos, 5, form=form).item() == 0.0


def test_capacity_ignores_nan_at_invalid_positions():
    pos = torch.arange(6)[None]
    S = torch.tensor([[[1.0, 2.0, 3.0, 4.0, float("nan"), float("inf")]]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    for form in CAPACITY_FORMS:
        assert torch.isfinite(capacity_loss(S, pos, 2, form=form, valid=valid))


@pytest.mark.parametrize("form", CAPACITY_FORMS)
def test_capacity_gradient_flows_to_S(form):
    M = 2
    pos = torch.arange(6)[None]
    t = (pos + 1).float()[:, None, :]  # [1, 1, 6]
    S = torch.tensor([[[1.0, 2.0, 1.5, 3.0, 4.5, 2.0]]], requires_grad=True)  # over budget at t = 4, 5
    capacity_loss(S, pos, M, form=form).backward()
    over = (S > M).detach()
    if form == "paper":
        expected = torch.where(over, 1.0 / (t * 6), torch.zeros_like(t))
    else:
        expected = torch.where(over, 1.0 / ((t - M).clamp_min(1) * 4), torch.zeros_like(t))  # 4 entries t > M
    torch.testing.assert_close(S.grad, expected)


def test_capacity_rejects_bad_arguments():
    S, pos = torch.ones(1, 2, 3), torch.arange(3)[None]
    with pytest.raises(ValueError, match="form"):
        capacity_loss(S, pos, 2, form="Paper")
    with pytest.raises(ValueError, match="budget"):
        capacity_loss(S, pos, 0)
    with pytest.raises(ValueError, match="pos"):
        capacity_loss(S, pos[:, :2], 2)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fused_path_equals_the_checkpointed_reference(softcap):
    """A frozen nn.Linear head takes the fused path (gradient computed in the forward); same values and gradients
    as the checkpointed per-chunk path, for KL and CE weighted differently."""
    student, teacher, head, ids, mask = _batch(seed=7)
    grads, values = [], []
    for fused in (True, False):
        s = student.detach().clone().requires_grad_(True)
        kl, ce = distillation_losses(s, teacher, head, ids, mask, chunk_size=5, logit_softcap=softcap, fused=fused)
        (0.7 * kl + 1.3 * ce).backward()
        grads.append(s.grad)
        values.append(torch.stack([kl, ce]).detach())
        below = type(kl.grad_fn.next_functions[0][0]).__name__            # kl = sum / n: the node under the division
        assert ("Fused" in below) == fused, below
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_fused_path_keeps_no_logits_for_backward():
    student, teacher, head, ids, _ = _batch(seed=8)
    mask = torch.ones(B, T, dtype=torch.bool)
    largest, _ = _saved_numel(lambda: distillation_losses(student, teacher, head, ids, mask, chunk_size=4))
    assert largest <= B * T * D          # only [P, d] gradients, never a [rows, V] tensor


# ------------------------------------------------------------------------------------ global capacity (DBTrimKV)


def _global_brute_force(logb, pos, seg, M: int, form: str) -> float:
    """sum_t relu(sum_{n,i} beta_i^(t-i) - N M) with the per-head normalisation, straight from the formula: loops over
    rows b, steps t, every (layer, head) row n and every visible token i."""
    B, N, T = logb.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            size = sum(torch.exp((pos[b, t] - pos[b, i]).double() * logb[b, n, i].double()).item()
                       for n in range(N) for i in range(T) if pos[b, i] <= pos[b, t] and seg[b, i] == seg[b, t])
            steps = int(pos[b, t]) + 1
            excess = max(size - N * M, 0.0)
            if form == "paper":
                total, count = total + excess / steps, count + 1
            else:
                total, count = total + excess / max(steps - M, 1), count + int(steps > M)
    return total / max(count, 1) / N


def _sums(logb, pos, seg, impl: str):
    if impl == "reference":
        return capacity_sums_reference(logb, pos, seg)
    if impl == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return capacity_sums(logb, pos, seg, block=8, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("form", CAPACITY_FORMS)
def test_global_capacity_equals_brute_force_sum_over_layers_and_heads(impl, form):
    """Layers x KV heads rows of S from each capacity implementation, summed against M * rows: the loss equals the
    formula evaluated token by token, and the gradients of all implementations agree."""
    g = torch.Generator().manual_seed(11)
    B, N, T, M = 2, 6, 21, 3                                 # N = 2 layers x 3 KV heads
    pos = torch.tensor([list(range(9)) + list(range(12)), list(range(21))], device=DEVICE)   # two documents in row 0
    seg = torch.tensor([[0] * 9 + [1] * 12, [0] * 21], device=DEVICE)
    logb = (-0.6 * torch.rand(B, N, T, generator=g) ** 3).to(DEVICE).requires_grad_(True)   # fast and slow decay
    loss = capacity_loss(_sums(logb, pos, seg, impl), pos, M, form=form, scope="global")
    assert loss.item() > 0
    assert loss.item() == pytest.approx(_global_brute_force(logb.detach().cpu(), pos.cpu(), seg.cpu(), M, form),
                                        rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logb)
    ref = logb.detach().double().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(
        capacity_loss(capacity_sums_reference(ref, pos, seg), pos, M, form=form, scope="global"), ref)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-7)


def test_global_capacity_trades_budget_between_heads_and_matches_per_head_when_uniform():
    pos = torch.arange(8).expand(1, 8)
    M = 2
    uniform = (pos[:, None, :] + 1).float().expand(1, 4, 8)              # every head holds every token
    for form in CAPACITY_FORMS:
        assert capacity_loss(uniform, pos, M, form=form, scope="global").item() == pytest.approx(
            capacity_loss(uniform, pos, M, form=form).item())            # the same excess everywhere: same loss
    skewed = torch.zeros(1, 4, 8)
    skewed[:, 0] = 3 * M                                                  # one head over M, the others empty
    assert capacity_loss(skewed, pos, M, scope="per_head").item() > 0
    assert capacity_loss(skewed, pos, M, scope="global").item() == 0.0    # within M * 4 in total
    with pytest.raises(ValueError, match="scope"):
        capacity_loss(skewed, pos, M, scope="layer")

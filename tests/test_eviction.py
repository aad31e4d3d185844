"""Eviction scores: DBTrimKV's look-ahead future utility equals its definition, is finite where beta -> 1 and reduces
to the retention score one step ahead for a look-ahead of one step."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE
from trimkv.serve.eviction import protect
from trimkv.serve.policies.retention import lookahead_score, retention_score


def _direct(t: int, p: int, lb: float, n: int) -> float:
    """log sum_{k=1..n} beta^(t - p + k), term by term in float64."""
    return math.log(math.fsum(math.exp((t - p + k) * lb) for k in range(1, n + 1)))


@pytest.mark.parametrize("n", [1, 3, 64, 1000])
def test_lookahead_matches_the_direct_sum(n):
    t = 40
    pos = torch.tensor([[0, 5, 17, 39, 40, 12]], device=DEVICE)
    lb = torch.tensor([[-2.0, -0.3, -1e-2, -1e-4, -0.7, -1e-6]], device=DEVICE)
    got = lookahead_score(pos, lb, torch.tensor([t], device=DEVICE), n)
    want = [_direct(t, p, b, n) for p, b in zip(pos[0].tolist(), lb[0].tolist())]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0].double().cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    pos64, lb64 = pos.cpu(), lb.cpu().double()                      # fp64 in, fp64 out, tight
    got64 = lookahead_score(pos64, lb64, torch.tensor([t]), n)
    torch.testing.assert_close(got64[0], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_one_step_lookahead_is_the_retention_score_one_step_ahead():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 50, (2, 3, 20), generator=g).to(DEVICE)
    lb = (-torch.rand(2, 3, 20, generator=g)).to(DEVICE)
    t_now = torch.tensor([50, 60], device=DEVICE)
    torch.testing.assert_close(lookahead_score(pos, lb, t_now, 1), retention_score(pos, lb, t_now + 1))


def test_beta_to_one_is_finite_and_tends_to_log_n():
    pos, t = torch.tensor([[3, 3, 3, 3]], device=DEVICE), torch.tensor([10], device=DEVICE)
    lb = torch.tensor([[0.0, -1e-12, -1e-30, -float("inf")]], device=DEVICE)
    got = lookahead_score(pos, lb, t, 8)[0].cpu()
    assert torch.isfinite(got[:3]).all()
    torch.testing.assert_close(got[:3], torch.full((3,), math.log(8)), rtol=1e-5, atol=1e-5)
    assert got[3] == -math.inf                                       # log beta = -inf: gone


def test_lookahead_keeps_a_slow_token_that_the_retention_score_would_evict():
    """A fresh token that decays fast (beta 0.5) against an older one that lasts (beta 0.99): the retention score now
    prefers the fresh one, the utility summed over 100 steps prefers the lasting one; with equal beta both rank by
    recency."""
    pos = torch.tensor([[30, 20]], device=DEVICE)
    lb = torch.tensor([[math.log(0.5), math.log(0.99)]], device=DEVICE)
    t = torch.tensor([30], device=DEVICE)
    plain, ahead = retention_score(pos, lb, t)[0], lookahead_score(pos, lb, t, 100)[0]
    assert plain[0] > plain[1] and ahead[0] < ahead[1]
    same = torch.full((1, 2), -0.1, device=DEVICE)
    assert (lookahead_score(pos, same, t, 100)[0].argmax() == retention_score(pos, same, t)[0].argmax()).item()


def test_slot_scores_protect_the_lookahead_score_like_the_plain_one():
    pos = torch.tensor([[[0, 1, 5, 8, -1]]], device=DEVICE)          # [B, H, N]; -1 = empty
    lb = torch.full((1, 1, 5), -0.2, device=DEVICE)
    t = torch.tensor([9], device=DEVICE)
    s = protect(lookahead_score(pos, lb, t, 4), pos, t, sink=1, window=2)[0, 0].cpu()
    assert s[0] == math.inf and s[3] == math.inf and s[4] == -math.inf
    assert s[1].item() == pytest.approx(_direct(9, 1, -0.2, 4), rel=1e-5)
    with pytest.raises(ValueError, match="lookahead"):
        lookahead_score(pos, lb, t, 0)

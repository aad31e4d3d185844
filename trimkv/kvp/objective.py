"""KVP's reward (arXiv 2602.10238, Sec. 3.1.1) and the two ways to optimise it here.

For one (row, KV head) with n candidate tokens of future utility u_i (the store's target: attention the token will
receive) and a ranking sigma (most valuable first), a cache of budget b keeps sigma_1..sigma_b and loses the rest;
the paper sums that loss over every budget b = 1..n-1:

    cost(sigma) = sum_{b=1}^{n-1} sum_{k>b} u_{sigma_k} = sum_k (k - 1) u_{sigma_k}          # reward R = -cost

normalised by the cost of the best ranking (u sorted descending), ``cost(sigma) / cost(sigma*) >= 1``. The agent is
a Plackett-Luce policy over rankings with logits s_i = f(x_i) (the ranker's scores), sampled by sorting s + Gumbel
noise (Gumbel-sort).

* ``"rloo"`` - the paper's estimator: K rankings sampled by Gumbel-sort, REINFORCE with the leave-one-out baseline
  (RLOO), advantages normalised by their mean and std, loss ``-mean(adv * log pi(sigma))``.
* ``"expected"`` (default) - the same objective in closed form. Under Gumbel-sort, token j ranks above token i with
  probability P(s_j + g_j > s_i + g_i) = sigmoid(s_j - s_i) (the difference of two Gumbel(0, 1) variables is
  Logistic(0, 1)), and cost is linear in the ranks, so the policy's expected cost is exactly

      E_sigma[cost] = sum_i u_i E[rank_i - 1] = sum_i u_i sum_{j != i} sigmoid(s_j - s_i).

  Its gradient is the expectation RLOO estimates (the paper's J(theta), up to the per-sequence normalisation),
  without the sampling variance: on a 2-core CPU that is the difference between minutes and hours. It is not the
  differentiable-sorting surrogate the paper ablates against (soft ranks regressed onto true ranks); it is the RL
  objective itself. Pairwise, it is sum_{i<j} |u_i - u_j| P(the pair is in the wrong order) + const: the all-budget
  cost weighs every mis-ordered pair by its utility gap, which is why a ranking (not a regression of u) is learned.

Both take scores / utilities [..., N] with a validity mask (tokens outside it are neither ranked nor counted).
"""
from __future__ import annotations

import torch

OBJECTIVES = ("expected", "rloo")


def ranking_cost(order: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The all-budget cost sum_k (k - 1) u_{sigma_k} of rankings ``order`` [..., N] (token indices, best first; masked
    tokens must come last) -> [...]. ``utility`` / ``mask`` [..., N]."""
    u = (utility * mask).gather(-1, order)
    ranks = torch.arange(order.shape[-1], device=order.device, dtype=u.dtype)
    return (u * ranks).sum(-1)


def optimal_cost(utility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cost(sigma*) of the best ranking (utility descending) -> [...]."""
    return ranking_cost((utility * mask).argsort(dim=-1, descending=True, stable=True), utility, mask)


def order_by(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ranking of ``scores`` (highest first, masked tokens last) [..., N]."""
    return scores.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True, stable=True)


def normalized_cost(scores: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cost(ranking by ``scores``) / cost(sigma*) [...] (1 = the best order; rows whose best cost is 0 give 1)."""
    best = optimal_cost(utility, mask)
    got = ranking_cost(order_by(scores, mask), utility, mask)
    return torch.where(best > 0, got / best.clamp_min(1e-30), torch.ones_like(best))


def expected_cost(scores: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E_sigma~PL(scores)[cost(sigma)] [...] in closed form: sum_i u_i sum_{j != i, j valid} sigmoid(s_j - s_i)."""
    m = mask.to(scores.dtype)
    above = torch.sigmoid(scores[..., None, :] - scores[..., :, None])         # [..., i, j] = P(j above i)
    above = above * m[..., None, :] * m[..., :, None]
    above = above - torch.diag_embed(torch.diagonal(above, dim1=-2, dim2=-1))   # j != i
    return ((utility * m) * above.sum(-1)).sum(-1)


def expected_loss(scores: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over [...] of E[cost] / cost(sigma*) (the "expected" objective; 1 is the floor)."""
    best = optimal_cost(utility, mask).detach()
    keep = best > 0
    if not bool(keep.any()):
        return scores.sum() * 0.0
    return (expected_cost(scores, utility, mask)[keep] / best[keep]).mean()


def plackett_luce_logprob(scores: torch.Tensor, order: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(order) = sum_i [s_{sigma_i} - logsumexp_{k >= i} s_{sigma_k}] over the valid tokens [..., N] -> [...]."""
    s = scores.masked_fill(~mask, float("-inf")).gather(-1, order)
    tail = torch.logcumsumexp(s.flip(-1), -1).flip(-1)                       # logsumexp over k >= i
    valid = mask.gather(-1, order)
    return torch.where(valid, s - tail, torch.zeros_like(s)).sum(-1)


def rloo_loss(scores: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor, *, samples: int = 8,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's estimator: ``samples`` Gumbel-sort rankings per [...], reward -cost / cost(sigma*), RLOO baseline,
    advantages normalised, loss -mean(adv * log pi)."""
    K = samples
    if K < 2:
        raise ValueError(f"RLOO needs at least 2 samples per sequence, got {K}")
    s = scores[None].expand(K, *scores.shape)
    u = torch.rand(s.shape, generator=generator, device=scores.device if generator is None else "cpu")
    gumbel = -torch.log(-torch.log(u.to(scores.device).clamp(1e-20, 1 - 1e-7)))
    order = order_by(s.detach() + gumbel, mask.expand_as(s))
    best = optimal_cost(utility, mask).clamp_min(1e-30)
    reward = -ranking_cost(order, utility.expand_as(s), mask.expand_as(s)) / best              # [K, ...]
    baseline = (reward.sum(0, keepdim=True) - reward) / (K - 1)
    adv = reward - baseline
    adv = (adv - adv.mean()) / adv.std().clamp_min(1e-8)
    return -(adv.detach() * plackett_luce_logprob(s, order, mask.expand_as(s))).mean()

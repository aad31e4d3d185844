"""Trace-fitted gates (trimkv.trace.fit): the ranking term by hand, the kept-utility measure at its ends, gates that
recover a planted utility order from x alone, and a fitted checkpoint that a distillation recipe warm-starts from
(gates.init_from)."""
from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F

from trimkv.errors import DataError
from trimkv.gate import GateConfig, RetentionGates
from trimkv.trace import LayerTrace
from trimkv.trace.fit import (FitSettings, draw_pairs, fit_gates, gates_for_store, kept_utility, ranking_loss,
                              save_fitted, utility_of)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ranking_loss_by_hand():
    """Two tokens before t = 2: scores (t - i) log beta_i = 2 * -0.1 and 1 * -1.0, utilities 0.9 and 0.2: the pair is
    ordered right, loss = 0.7 * softplus(-(s_0 - s_1)) / 0.7."""
    logb = torch.tensor([[[-0.1, -1.0, 0.0]]])
    u = torch.tensor([[[0.9, 0.2, 0.0]]])
    pos = torch.arange(3)[None]
    g = torch.Generator().manual_seed(0)
    got = ranking_loss(logb, u, pos, torch.tensor([[2]]), pairs=4000, generator=g)
    # pairs are drawn among {0, 1} x {0, 1}; same-token pairs weigh 0, the two mixed orders give the same term
    want = F.softplus(torch.tensor(-(2 * -0.1 - 1 * -1.0)))
    torch.testing.assert_close(got, want)
    wrong = ranking_loss(torch.tensor([[[-1.0, -0.1, 0.0]]]), u, pos, torch.tensor([[2]]), pairs=4000, generator=g)
    assert float(wrong) > float(got)


def test_kept_utility_ends():
    """An oracle score keeps everything the best M keep (1.0); recency loses the useful old tokens."""
    T, M = 64, 4
    u = torch.zeros(1, 1, T)
    u[0, 0, [1, 5, 9, 13]] = 1.0                          # four old tokens matter
    pos, valid = torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool)
    oracle = torch.where(u > 0, torch.zeros_like(u), torch.full_like(u, -5.0))
    assert kept_utility(oracle, u, pos, valid, M) == pytest.approx(1.0)
    # recency at t = 5, 21, 37, 53 (every 16th past M): keeps 1-4 (all there is: 1.0), then only newer tokens (0)
    assert kept_utility(torch.full_like(u, -1.0), u, pos, valid, M) == pytest.approx(0.25)
    # 2 sink tokens, kept by every method and left out (however much they weigh): 2 slots choose among 2..t-1.
    # t = 5: nothing useful among 2-4 (the step counts for no one); t = 21, 37, 53: recency keeps none of 5, 9, 13
    u[0, 0, :2] = 9.0
    assert kept_utility(oracle, u, pos, valid, M, sink=2) == pytest.approx(1.0)
    assert kept_utility(torch.full_like(u, -1.0), u, pos, valid, M, sink=2) == pytest.approx(0.0)


class PlantedStore:
    """A store-shaped object whose layer 0 has utility sigmoid(w . x_i) for a fixed w: an order x alone decides."""

    def __init__(self, rows=24, T=96, d=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(rows, T, d, generator=g)
        self.w = torch.randn(d, generator=g)
        u = torch.sigmoid(3 * self.x @ self.w)                # [R, T]
        self.u = torch.stack([u, 1 - u], 1)                   # two KV heads with opposite preferences
        self.num_rows, self.layers = rows, (0,)
        self.path = "planted"
        self.manifest = {"shapes": {"num_layers": 1, "num_kv_heads": 2, "hidden_size": d, "head_dim": 4},
                         "fingerprint": "f" * 64, "model": {"name": "tiny"}, "data_description": "planted"}
        self.T = T

    def layer(self, layer, rows=None, hidden=None, dtype=None):
        R, T = self.num_rows, self.T
        return LayerTrace(layer=0, keys=torch.zeros(R, 2, T, 4), values=torch.zeros(R, 2, T, 4),
                          pos=torch.arange(T).expand(R, T), valid=torch.ones(R, T, dtype=torch.bool),
                          utility={"future": self.u}, hidden=self.x)


def test_recent_pairs_draw_their_second_token_among_the_last_tokens_before_t():
    """Two documents in a row (positions restart at 40); steps t = 30 and 70. Uniform draws span each document's past;
    with ``recent`` = 1 every second token is one of the 8 before t (never before the document's start), and with
    0.5 about half are."""
    pos = torch.cat([torch.arange(40), torch.arange(60)])[None]
    steps = torch.tensor([[30, 70]])
    g = torch.Generator().manual_seed(0)
    plain = draw_pairs(pos, steps, 2000, g)
    assert plain.shape == (1, 2, 2000, 2)
    assert plain[0, 0].min() == 0 and plain[0, 0].max() == 29 and plain[0, 1].min() == 40 and plain[0, 1].max() == 69
    near = draw_pairs(pos, steps, 2000, g, recent=1.0, recent_span=8)
    assert near[0, 0, :, 1].min() == 22 and near[0, 0, :, 1].max() == 29
    assert near[0, 1, :, 1].min() == 62 and near[0, 1, :, 1].max() == 69
    assert near[0, 0, :, 0].min() == 0                                   # the first token stays uniform
    short = draw_pairs(pos, torch.tensor([[43, 70]]), 500, g, recent=1.0, recent_span=8)
    assert short[0, 0, :, 1].min() == 40                                 # 3 tokens of its document before t = 43
    half = draw_pairs(pos, steps, 4000, g, recent=0.5, recent_span=8)
    share = float((half[0, 0, :, 1] >= 22).float().mean())               # uniform draws land there 8/30 of the time
    assert abs(share - (0.5 + 0.5 * 8 / 30)) < 0.04, share


def test_a_larger_temperature_keeps_rewarding_wider_margins():
    """A pair ordered right by a margin of 8 has stopped counting at temperature 1 (gradient sigmoid(-8) = 3e-4) but not
    at temperature 10 (sigmoid(-0.8) / 10 = 0.03)."""
    u = torch.tensor([[[0.9, 0.2, 0.0]]])
    pos = torch.arange(3)[None]
    logb = torch.tensor([[[-0.5, -9.0, 0.0]]], requires_grad=True)         # scores -1.0 and -9.0 at t = 2
    grads = []
    for temperature in (1.0, 10.0):
        logb.grad = None
        ranking_loss(logb, u, pos, torch.tensor([[2]]), pairs=2000, generator=torch.Generator().manual_seed(0),
                     temperature=temperature).backward()
        grads.append(float(logb.grad.abs().sum()))
    assert grads[1] > 20 * grads[0], grads


def test_fitted_gates_recover_a_planted_order():
    store = PlantedStore()
    gates = gates_for_store(store, gate_type="rg", gate_hidden=32, bias_init=4.0)
    before = kept_utility(torch.full((4, 2, store.T), -1.0), store.u[-4:], torch.arange(store.T).expand(4, -1),
                          torch.ones(4, store.T, dtype=torch.bool), 8)
    settings = FitSettings(steps=150, lr=1e-2, budget=8, eval_rows=4, capacity_weight=0.1, pairs=128, samples=8,
                           min_step=8)
    metrics = fit_gates(store, gates, settings, progress=None)
    m = metrics[0]
    assert m["kept"] > 0.9 > before + 0.2, m
    with torch.no_grad():
        logb = gates[0](store.x[-4:])                          # [4, 2, T] held-out rows
    for h in range(2):                                         # each head orders tokens as its utility does
        a, b = logb[:, h].flatten(), store.u[-4:, h].flatten()
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.9


def test_fit_refuses_what_the_store_cannot_feed():
    store = PlantedStore()
    with pytest.raises(DataError, match="answer"):
        fit_gates(store, gates_for_store(store, gate_type="rg", gate_hidden=8),
                  FitSettings(utility={"answer": 1.0}, steps=1), progress=None)
    wrong = RetentionGates(GateConfig(num_layers=2, hidden_size=16, num_kv_heads=2, head_dim=4, gate_hidden=8))
    with pytest.raises(DataError, match="shaped for 2 layers"):
        fit_gates(store, wrong, FitSettings(steps=1), progress=None)
    lt = store.layer(0)
    lt.hidden = None
    store.layer = lambda *a, **k: lt
    with pytest.raises(DataError, match="--hidden"):
        fit_gates(store, gates_for_store(store, gate_type="rg", gate_hidden=8), FitSettings(steps=1), progress=None)
    assert utility_of(PlantedStore().layer(0), {"future": 2.0}).max() <= 2.0


def test_fitted_gates_warm_start_distillation(tmp_path, tiny_model):
    """Gates fitted on a store of the tiny model, saved, then loaded by a recipe's gates.init_from."""
    from trimkv.recipe import parse_recipe
    from trimkv.train.run import initial_gates

    model = tiny_model("llama")
    store = PlantedStore(rows=6, T=32, d=64)
    store.manifest["shapes"] = {"num_layers": 2, "num_kv_heads": 2, "hidden_size": 64, "head_dim": 16}
    store.layers = (0, 1)
    gates = gates_for_store(store, gate_type="rg", gate_hidden=16, bias_init=4.0)
    store.u = store.u[:, :, :32]
    fit_gates(store, gates, FitSettings(steps=3, budget=8, eval_rows=2), progress=None)
    path = save_fitted(gates, tmp_path / "fitted", store, FitSettings(budget=8))
    recipe = parse_recipe({"data": {"source": "builtin:prose", "seq_len": 32},
                           "gates": {"gate_type": "rg", "gate_hidden": 16, "init_from": str(path)},
                           "loss": {"budget": 8}})
    warm = initial_gates(model, recipe)
    for k, v in gates.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[k], v)
    assert math.isfinite(float(warm[0].bias.detach().sum()))
    bad = parse_recipe({"data": {"source": "builtin:prose", "seq_len": 32},
                        "gates": {"gate_type": "rg", "gate_hidden": 32, "init_from": str(path)}})
    from trimkv.errors import RecipeError
    with pytest.raises(RecipeError, match="gate_hidden"):
        initial_gates(model, bad)


def test_ranking_by_age_reads_the_utility_left_at_that_age():
    """t = 10; token 0 (age 10) and token 7 (age 3), edges [5]: token 0 reads later@5 (0: nothing left for it),
    token 7 reads future (1.0), so token 7 must score higher: loss = softplus(-(s_7 - s_0))."""
    T = 11
    logb = torch.full((1, 1, T), -0.5)
    logb[0, 0, 0], logb[0, 0, 7] = -0.01, -0.2
    future, later = torch.zeros(1, 1, T), torch.zeros(1, 1, T)
    future[0, 0, [0, 7]] = 1.0
    later[0, 0, 7] = 0.5
    stack, edges = torch.stack([future, later]), torch.tensor([5])
    pos = torch.arange(T)[None]
    # only tokens 0 and 7 carry utility at their ages: pairs with the others weigh their own gaps; isolate the pair
    u_pair = stack.clone()
    got = ranking_loss(logb[..., [0, 7, 10]], u_pair[..., [0, 7, 10]], torch.tensor([[0, 7, 10]]),
                       torch.tensor([[2]]), pairs=4000, generator=torch.Generator().manual_seed(0), edges=edges)
    s0, s7 = 10 * -0.01, 3 * -0.2
    torch.testing.assert_close(got, F.softplus(torch.tensor(-(s7 - s0))))


def test_fitting_by_age_keeps_long_lived_tokens_longer():
    """Half the tokens are used only by the next few queries (future high, later@8 = 0), half far ahead too; x says
    which. By age, the gates give the long-lived ones the higher retention; without it they cannot tell them apart."""
    store = PlantedStore(rows=16, T=96)
    long_lived = (store.x @ store.w) > 0                                   # [R, T]
    future = torch.full((16, 2, 96), 0.8)
    later = (long_lived[:, None].float() * 0.6).expand(16, 2, 96).clone()
    store.u = future
    base_layer = store.layer

    def layer(*a, **k):
        lt = base_layer(*a, **k)
        lt.utility = {"future": future, "later@8": later}
        return lt

    store.layer = layer
    gates = gates_for_store(store, gate_type="rg", gate_hidden=32, bias_init=4.0)
    fit_gates(store, gates, FitSettings(steps=150, lr=1e-2, budget=8, eval_rows=0, capacity_weight=0.1, pairs=128,
                                        samples=8, min_step=8, by_age=True), progress=None)
    with torch.no_grad():
        logb = gates[0](store.x)                                           # [R, 2, T]
    for h in range(2):                                                     # AUC: long-lived above short-lived
        a, b = logb[:, h][long_lived], logb[:, h][~long_lived]
        auc = (a[:, None] > b[None, :]).float().mean()
        assert float(auc) > 0.95, float(auc)
    with pytest.raises(DataError, match="later"):
        fit_gates(PlantedStore(), gates_for_store(PlantedStore(), gate_type="rg", gate_hidden=8),
                  FitSettings(by_age=True, steps=1), progress=None)

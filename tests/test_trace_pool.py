"""Pool calibration (trimkv.trace.pool): the kept-share measure by hand, shifts that hand the pool to the head whose
tokens matter, the shifts landing in the gates' biases, and what is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trimkv.errors import DataError
from trimkv.gate import GateConfig, RetentionGates
from trimkv.trace import LayerTrace
from trimkv.trace.fit import gates_for_store
from trimkv.trace.pool import PoolSettings, PoolTrace, calibrate_pool, check_gates, fit_shifts, kept_share

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kept_share_by_hand():
    """One layer, two heads, t = 3 (budget 2 + 1), no sink or window: three tokens per head may go. Equal logits keep
    the two most recent of each head. Head 0's utility is [1, 0, 0] (kept 0 of 1), head 1's [0, 5, 5] (kept 10 of
    10): per head (0 + 1) / 2. The pool keeps 4 of the 6: the ages 1 and 2 of both heads, 10 of the best 11."""
    u = torch.tensor([[1.0, 0, 0, 0], [0, 5, 5, 0]])[None, None]            # [L=1, R=1, H=2, T=4]
    pt = PoolTrace(torch.full_like(u, 4.0), u, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool))
    got = kept_share(pt, 2, sink=0, window=0, every=10)
    assert got == {"pool": pytest.approx(10 / 11, abs=1e-4), "per_head": pytest.approx(0.5)}
    # shifting head 0's bias up keeps all its tokens (scores near 0) and leaves one slot to head 1: 6 of 11; each
    # head's own order, and so the per-head share, stays
    got = kept_share(pt, 2, torch.tensor([[20.0, 0.0]]), sink=0, window=0, every=10)
    assert got == {"pool": pytest.approx(6 / 11, abs=1e-4), "per_head": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="must exceed"):
        kept_share(pt, 2, sink=1, window=1)


def _two_layer_trace(R=12, T=80, seed=0):
    """Every (layer, head) has the same logits (so the pool splits evenly), but the tokens of (layer 1, head 0) carry
    ten times the utility of the others: the oracle pool holds mostly them."""
    g = torch.Generator().manual_seed(seed)
    L, H = 2, 2
    logits = torch.full((L, R, H, T), 6.0)
    u = torch.rand(L, R, H, T, generator=g)
    u[1, :, 0] *= 10
    return PoolTrace(logits, u, torch.arange(T).expand(R, T), torch.ones(R, T, dtype=torch.bool))


def test_shifts_hand_the_pool_to_the_head_whose_tokens_matter():
    pt = _two_layer_trace()
    settings = PoolSettings(steps=150, lr=0.1, pairs=2048, sink=2, window=4, budget=12)
    shift = fit_shifts(pt, settings, list(range(8)))
    assert shift[1, 0] > shift.flatten()[[0, 1, 3]].max() + 1.0, shift      # it decays slowest
    kw = dict(sink=2, window=4, every=8)
    before, after = kept_share(pt, 12, None, range(8, 12), **kw), kept_share(pt, 12, shift, range(8, 12), **kw)
    assert after["pool"] > before["pool"] + 0.2, (before, after)
    with pytest.raises(DataError, match="rows to fit on"):
        fit_shifts(pt, settings, [])


class TwoLayerStore:
    """A store-shaped object of two layers, two KV heads: x random, utility ``future`` as in _two_layer_trace."""

    def __init__(self, rows=12, T=64, d=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(2, rows, T, d, generator=g)
        self.u = torch.rand(2, rows, 2, T, generator=g)
        self.u[1, :, 0] *= 10
        self.num_rows, self.layers, self.path, self.T = rows, (0, 1), "two-layer", T
        self.manifest = {"shapes": {"num_layers": 2, "num_kv_heads": 2, "hidden_size": d, "head_dim": 4},
                         "fingerprint": "f" * 64, "model": {"name": "tiny"}, "data_description": "two-layer"}

    def layer(self, layer, rows=None, hidden=None, dtype=None):
        R, T = self.num_rows, self.T
        return LayerTrace(layer=layer, keys=torch.zeros(R, 2, T, 4), values=torch.zeros(R, 2, T, 4),
                          pos=torch.arange(T).expand(R, T), valid=torch.ones(R, T, dtype=torch.bool),
                          utility={"future": self.u[layer]}, hidden=self.x[layer])


def test_calibration_adds_its_shifts_to_the_biases_and_reports_the_held_out_share():
    store = TwoLayerStore()
    gates = gates_for_store(store, gate_type="rg", gate_hidden=8, bias_init=6.0)
    x = store.x[1, :2]
    assert torch.equal(F.logsigmoid(gates[1].logits(x)), gates[1](x))       # forward = logsigmoid(logits)
    before = [gates[layer].bias.detach().clone() for layer in range(2)]
    out = calibrate_pool(store, gates, PoolSettings(utility={"future": 1.0}, steps=100, lr=0.1, pairs=1024, sink=2,
                                                     window=4, budget=12, eval_rows=4), progress=None)
    shifts = torch.stack([gates[layer].bias.detach() - before[layer] for layer in range(2)])
    assert shifts[1, 0] == shifts.max() and float(shifts.max()) == pytest.approx(out["shift_max"], abs=1e-3)
    assert out["after"]["pool"] > out["before"]["pool"], out


def test_what_pool_calibration_refuses():
    cfg = dict(num_layers=2, hidden_size=8, num_kv_heads=2, head_dim=4, gate_hidden=8)
    with pytest.raises(DataError, match="share one bias"):
        check_gates(RetentionGates(GateConfig(gate_type="rg10", **cfg)))
    store = TwoLayerStore()
    store.layers = (0,)
    with pytest.raises(DataError, match=r"lacks layers \[1\]"):
        calibrate_pool(store, gates_for_store(TwoLayerStore(), gate_type="rg", gate_hidden=8), progress=None)
    with pytest.raises(DataError, match="recon"):          # the default utility: a store traced without it
        calibrate_pool(TwoLayerStore(), gates_for_store(TwoLayerStore(), gate_type="rg", gate_hidden=8),
                       progress=None)

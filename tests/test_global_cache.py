"""The global-budget cache: one pool for all layers and heads, bounded, floors hold, globally lowest victim, equal
to the full cache when nothing is evicted, batch > 1."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import LayerInputs, attach_gates
from trimkv.compat import cache_kwargs
from trimkv.serve import GlobalRetentionCache, SoftRetentionCache, make_cache
from trimkv.serve.policies import RetentionPolicy, get_policy

GEN = torch.Generator().manual_seed(3)
PROMPT = torch.randint(3, 128, (2, 24), generator=GEN)          # batch of 2


def gated_model(spread: bool = True):
    """Tiny Llama (2 layers x 2 KV heads) with gates; ``spread`` randomises them so retention differs a lot
    between tokens, heads and layers (default gates start at beta ~ 1: the gated model equals the frozen one)."""
    model = build_tiny_model("llama", initializer_range=0.2)
    handle = attach_gates(model, gate_hidden=16)
    with torch.no_grad():
        for gate in handle.gates.layers if spread else []:
            for p in gate.parameters():
                p.normal_(0, 0.5)
    return model, handle


def generate(model, ids, cache, mask=None, n=8):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def test_big_budget_generates_like_the_full_cache():
    model, _ = gated_model(spread=False)
    ref = generate(model, PROMPT, SoftRetentionCache(2))                 # the full cache of the gated model
    cache = make_cache(model, "trimkv", 64, scope="global", sink=0, window=0, floor=1)
    out = generate(model, PROMPT, cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert int(cache.num_kept().sum(dim=(1, 2)).max()) == 2 * 2 * (24 + 8 - 1)  # every token of every head


@pytest.mark.parametrize("chunk", [None, 8])
def test_total_is_bounded_and_floors_hold(chunk):
    model, _ = gated_model()
    budget, floor = 40, 3                                    # 4 (layer, head) pairs: 10 tokens per pair on average
    cache = make_cache(model, "trimkv-global", 10, floor=floor, sink=1, window=2)
    kept = []
    hook = model.register_forward_hook(lambda *a: kept.append(cache.num_kept()))
    kw = {} if chunk is None else {"prefill_chunk_size": chunk}
    mask = torch.ones_like(PROMPT)
    model.generate(PROMPT, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=12, do_sample=False,
                   pad_token_id=0, **kw)
    hook.remove()
    nbytes = cache.nbytes()
    for counts in kept:                                      # [B, L, Hkv] after every forward
        assert int(counts.sum(dim=(1, 2)).max()) <= budget
        assert int(counts.min()) >= floor
    assert int(kept[-1].sum(dim=(1, 2)).min()) == budget    # the pool is used in full
    assert int(kept[-1].max()) > budget // 4                 # ... and unevenly: some head holds more than average
    assert cache.pool.keys.shape[1] == budget and cache.nbytes() == nbytes


def _manual_cache(budget=12, floor=1, L=2, Hkv=2, D=4, lookahead=0):
    """Drive the layers directly (no model): random keys, per-token log beta chosen by the test."""
    cache = GlobalRetentionCache(budget, L, Hkv, floor=floor, policy=RetentionPolicy(lookahead))
    return cache


def _step(cache, t, logb, B=1, D=4):
    """One decode step at position t for every layer; logb [L, B, Hkv]."""
    for l, layer in enumerate(cache.layers):
        Hkv = cache.pool.Hkv
        layer.stage(LayerInputs(pos=torch.full((B, 1), t), valid=torch.ones(B, 1, dtype=torch.bool),
                                logb=logb[l][..., None]))
        layer.insert(torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D))


def _future_utility(t: int, p: int, lb: float, n: int) -> float:
    """log sum_{k=1..n} beta^(t - p + k), summed term by term in float64 (the look-ahead score's definition)."""
    return math.log(sum(math.exp((t - p + k) * lb) for k in range(1, n + 1)))


@pytest.mark.parametrize("lookahead", [0, 6])
def test_decode_evicts_the_globally_lowest_score_above_the_floor(lookahead):
    """Brute force: after each decode step the pool holds exactly what a greedy set simulation keeps."""
    torch.manual_seed(0)
    L, Hkv, budget, floor = 2, 2, 14, 2
    cache = _manual_cache(budget, floor, L, Hkv, lookahead=lookahead)
    kept = {(l, h): {} for l in range(L) for h in range(Hkv)}    # (layer, head) -> {pos: logb}
    for t in range(12):
        logb = -torch.rand(L, 1, Hkv) * torch.tensor([0.01, 1.0])[None, None, :]  # head 0 retains, head 1 decays
        _step(cache, t, logb)
        for l in range(L):                                       # the reference, layer by layer like the model
            for h in range(Hkv):
                kept[(l, h)][t] = float(logb[l, 0, h])
            n_need = sum(len(s) for s in kept.values()) - budget
            for _ in range(max(0, n_need)):
                cands = [(_future_utility(t, p, lb, lookahead) if lookahead else (t - p) * lb, key, p)
                         for key, s in kept.items() if len(s) > floor for p, lb in s.items()
                         if (key[0], p) != (l, t)]           # this layer's newcomers enter; earlier layers' may go
                _, key, p = min(cands)
                del kept[key][p]
        for l, layer in enumerate(cache.layers):
            _, _, pos, _ = cache.pool.gather(l)
            for h in range(Hkv):
                got = set(pos[0, h][pos[0, h] >= 0].tolist())
                assert got == set(kept[(l, h)]), f"step {t}, layer {l}, head {h}"
    counts = cache.num_kept()[0]
    assert counts[:, 0].sum() > counts[:, 1].sum()              # the slowly decaying heads got the extra slots


def test_batch_rows_are_independent():
    torch.manual_seed(1)
    cache = _manual_cache(budget=12, floor=1)
    solo = [_manual_cache(budget=12, floor=1) for _ in range(2)]
    for t in range(10):
        logb = -torch.rand(2, 2, 2)                                # [L, B, Hkv]
        k = torch.randn(2, 2, 2, 1, 4)
        for l, layer in enumerate(cache.layers):
            layer.stage(LayerInputs(pos=torch.full((2, 1), t), valid=torch.ones(2, 1, dtype=torch.bool),
                                    logb=logb[l][..., None]))
            layer.insert(k[l], k[l])
            for b in range(2):
                s = solo[b].layers[l]
                s.stage(LayerInputs(pos=torch.full((1, 1), t), valid=torch.ones(1, 1, dtype=torch.bool),
                                    logb=logb[l][b:b + 1, :, None]))
                s.insert(k[l][b:b + 1], k[l][b:b + 1])
    for b in range(2):
        for l in range(2):
            kb, _, pb, _ = cache.pool.gather(l)
            ks, _, ps, _ = solo[b].pool.gather(l)
            for h in range(2):
                a = {int(p): kb[b, h, i].tolist() for i, p in enumerate(pb[b, h]) if p >= 0}
                c = {int(p): ks[0, h, i].tolist() for i, p in enumerate(ps[0, h]) if p >= 0}
                assert a == c


def test_too_small_budget_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="floor \\+ sink \\+ window"):
        GlobalRetentionCache(10, 4, 2, floor=1)
    with pytest.raises(ValueError, match="across layers and heads"):       # scores per head cannot share a pool
        GlobalRetentionCache(64, 2, 2, policy=get_policy("keydiff"))


def test_layers_on_another_device_than_the_pool_are_refused():
    cache = GlobalRetentionCache(32, 2, 2, floor=1)
    cache.layers[0].lazy_initialization(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    with pytest.raises(RuntimeError, match="scope='head'"):
        cache.layers[1].lazy_initialization(torch.zeros(1, 2, 3, 16, device="meta"),
                                            torch.zeros(1, 2, 3, 16, device="meta"))

"""Eviction policies: each baseline keeps what its paper's rule says on a hand-made case where the answer is known,
and every policy runs inside the bounded cache of a real (tiny) model without exceeding the budget."""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import LayerInputs, attach_gates
from trimkv.compat import cache_kwargs
from trimkv.eval.oracle import NeedleOraclePolicy
from trimkv.serve import RetentionLayer, make_cache
from trimkv.serve.eviction import Candidates
from trimkv.serve.policies import POLICIES, get_policy

pytestmark = pytest.mark.usefixtures("one_thread")

D = 4


def layer_for(name, budget, *, sink=0, window=0, **kw):
    return RetentionLayer(budget, sink=sink, window=window, policy=get_policy(name, **kw))


def keys_of(rows) -> torch.Tensor:
    """[[...D floats] per token] -> keys [1, 1, T, D]."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def feed(layer, keys, start, weights=None):
    """Insert T tokens at positions start..start+T-1 (one row, one KV head), then run the after-attention step
    with ``weights`` [G*T, S] (over the candidates ``insert`` returned) or nothing."""
    T = keys.shape[2]
    layer.stage(LayerInputs(pos=torch.arange(start, start + T)[None], valid=torch.ones(1, T, dtype=torch.bool)))
    layer.update(keys, keys.clone())
    cands = layer.insert(keys, keys.clone())            # what attend() does, with the weights chosen by the test
    if weights is not None:
        weights = weights(cands) if callable(weights) else weights
        assert weights.shape[-1] == cands.keys.shape[2]
        layer.policy.observe(cands.state, weights[None, None], cands.pos, T)
    layer.compact()
    return cands.keys


def kept(layer) -> set[int]:
    p = layer.pos[0, 0]
    return set(p[p >= 0].tolist())


def ones(T):
    return keys_of([[1.0] * D] * T)


def weights_on(cands, targets: dict[int, float], rows: int) -> torch.Tensor:
    """[rows, S] attention weights: every row puts ``targets[pos]`` on the candidate at that position."""
    pos = cands.pos[0, 0]                                                     # [S]
    w = torch.zeros(rows, pos.numel())
    for p, val in targets.items():
        w[:, (pos == p).nonzero().item()] = val
    return w


# --------------------------------------------------------------------------------------- hand-made cases


def test_streaming_keeps_sinks_and_the_most_recent():
    layer = layer_for("streaming", 5, sink=2)
    feed(layer, ones(10), 0)                       # prefill of 10 tokens
    assert kept(layer) == {0, 1, 7, 8, 9}
    feed(layer, ones(1), 10)                       # decode: oldest non-sink goes
    assert kept(layer) == {0, 1, 8, 9, 10}


def test_h2o_keeps_heavy_hitters_summed_over_queries_and_group():
    layer = layer_for("h2o", 3)
    T, G = 6, 2
    feed(layer, ones(T), 0, weights=lambda L: torch.cat([weights_on(L, {1: 0.5, 4: 0.3, 2: 0.2}, T),
                                                          weights_on(L, {1: 0.4, 4: 0.1, 5: 0.5}, T)]))
    # totals (x6 queries): pos1 = 0.9, pos4 = 0.4, pos5 = 0.5, pos2 = 0.2 -> keep {1, 5, 4}
    assert kept(layer) == {1, 4, 5}
    # decode: the newcomer enters, evicting the least-attended (pos 4); its attention then accumulates
    feed(layer, ones(1), 6, weights=lambda L: weights_on(L, {5: 1.0}, G))
    assert kept(layer) == {1, 5, 6}
    state = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    assert state[5] == pytest.approx(6 * 0.5 + 2 * 1.0)
    assert state[6] == 0.0                         # newcomer: no attention received yet


def test_snapkv_uses_only_the_observation_window_and_pools_neighbours():
    T = 10
    layer = layer_for("snapkv", 5, obs_window=2, kernel=3)

    def weights(L):
        early = weights_on(L, {0: 1.0}, T - 2)         # queries outside the window look at 0: ignored
        late = weights_on(L, {5: 0.6, 9: 0.4}, 2)       # the window looks at 5 (-> 4, 5, 6 pooled) and 9 (-> 8, 9)
        w = torch.cat([early, late])
        return torch.cat([w, w])                        # G = 2, rows ordered (g, t)

    feed(layer, ones(T), 0, weights=weights)
    assert kept(layer) == {4, 5, 6, 8, 9}
    # decode: attention no longer changes scores; a generated token scores 0, so it is the next to go
    feed(layer, ones(1), T, weights=lambda L: weights_on(L, {4: 1.0}, 2))
    assert {4, 5, 6, 10} < kept(layer)
    feed(layer, ones(1), T + 1, weights=lambda L: weights_on(L, {11: 1.0}, 2))
    assert {4, 5, 6, 11} < kept(layer) and 10 not in kept(layer)
    state = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    assert [state[p] for p in (4, 5, 6)] == pytest.approx([0.6, 0.6, 0.6])


def test_snapkv_pooling_is_by_position_not_slot_order():
    policy = get_policy("snapkv", kernel=3)
    pos = torch.tensor([[[7, -1, 3, 5, 4]]])
    score = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 1.0]]])   # pos 4 is hot -> its neighbours 3 and 5 too, not 7
    pooled = policy._pool(score, pos)
    assert pooled[0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_tova_evicts_what_the_last_query_attends_least():
    T, budget = 5, 3
    layer = layer_for("tova", budget)

    def weights(L):
        w = weights_on(L, {0: 1.0}, T)                  # earlier queries: ignored by TOVA
        w[-1] = weights_on(L, {1: 0.5, 3: 0.3, 4: 0.2}, 1)[0]
        return torch.cat([w, w])                        # G = 2

    feed(layer, ones(T), 0, weights=weights)
    assert kept(layer) == {1, 3, 4}
    # decode step 5: the victim follows the weights of the last query seen (pos 4 had 0.2) ...
    feed(layer, ones(1), 5, weights=lambda L: torch.cat([weights_on(L, {1: 0.1, 3: 0.6, 5: 0.3}, 1),
                                                         weights_on(L, {1: 0.1, 3: 0.6, 5: 0.3}, 1)]))
    assert kept(layer) == {1, 3, 5}
    # ... and step 6 drops what query 5 looked at least (pos 1, 0.1 averaged over the group)
    feed(layer, ones(1), 6)
    assert kept(layer) == {3, 5, 6}


def test_knorm_keeps_the_lowest_key_norms():
    layer = layer_for("knorm", 2)
    norms = [5.0, 1.0, 3.0, 0.5, 4.0]
    feed(layer, keys_of([[n, 0.0, 0.0, 0.0] for n in norms]), 0)
    assert kept(layer) == {1, 3}
    feed(layer, keys_of([[0.1, 0.0, 0.0, 0.0]]), 5)        # newcomer enters, the largest norm (pos 1) goes
    assert kept(layer) == {3, 5}


def test_keydiff_keeps_the_keys_least_like_the_mean():
    layer = layer_for("keydiff", 2)
    e1, e2 = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    rows = [e1, e1, [0.9, 0.1, 0.0, 0.0], e2, e1, [1.0, 0.05, 0.0, 0.0]]
    feed(layer, keys_of(rows), 0)
    assert 3 in kept(layer) and len(kept(layer)) == 2
    # scores are recomputed from the kept keys at each eviction (mean over the current candidates)
    score = layer.policy.scores(layer.slots)
    assert torch.isfinite(score).all()


def test_keydiff_ignores_empty_slots_in_the_anchor():
    policy = get_policy("keydiff")
    keys = keys_of([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0]])
    pos = torch.tensor([[[0, 1, -1]]])
    s = policy.scores(Candidates(keys, keys, pos, torch.zeros(1, 1, 3), torch.tensor([1])))
    assert s[0, 0, 0] == pytest.approx(s[0, 0, 1])        # the empty slot's key does not tilt the anchor


def test_random_is_seeded_and_keeps_the_budget():
    def run(seed):
        layer = layer_for("random", 4, seed=seed)
        feed(layer, ones(20), 0)
        for t in range(20, 30):
            feed(layer, ones(1), t)
        return kept(layer)

    assert run(0) == run(0)
    assert len(run(0)) == 4
    assert len({frozenset(run(s)) for s in range(6)}) > 1


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="streaming"):
        get_policy("lru")


# --------------------------------------------------------------------------------------- inside a real model


@pytest.mark.parametrize("name", sorted(n for n, p in POLICIES.items() if not getattr(p, "uses_rankers", False)))
def test_every_policy_generates_within_budget(name):   # kvp needs trained rankers: tests/test_kvp.py runs it
    model = build_tiny_model(initializer_range=0.2)
    handle = attach_gates(model, gate_hidden=16)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, name, 12, sink=2, window=3)
    with handle.disabled() if name != "trimkv" else torch.no_grad(), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=6,
                             do_sample=False, pad_token_id=0, prefill_chunk_size=16)
    assert out.shape[1] == 48 + 6
    for layer in cache.layers:
        assert layer.pos.shape[-1] == 12
        assert (layer.num_kept() == 12).all()
        p = layer.pos[0]
        assert (p[:, None, :] == torch.tensor([0, 1])[None, :, None]).any(-1).all()   # sinks kept
        assert (p.max(-1).values == 48 + 6 - 2).all()                                  # newest token kept


def test_needle_oracle_keeps_the_given_positions_then_the_most_recent():
    layer = RetentionLayer(5, sink=1, policy=NeedleOraclePolicy([3, 4]))
    feed(layer, ones(10), 0)                       # prefill: sink 0, needle 3-4, then the most recent 8, 9
    assert kept(layer) == {0, 3, 4, 8, 9}
    feed(layer, ones(1), 10)                       # decode: the oldest non-needle goes, never the needle
    assert kept(layer) == {0, 3, 4, 9, 10}


def test_oracle_in_the_harness_keeps_the_needle_tokens(tokenizer):
    from trimkv.eval.oracle import needle_positions
    from trimkv.eval.tasks import make_samples, render_prompt

    sample = make_samples("passkey", tokenizer, context_length=256, n=1, depths=[0.3], chat=False)[0]
    prompt = render_prompt(sample, tokenizer)
    keep = needle_positions(sample, prompt, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert sample.answers[0] in tokenizer.decode([ids[i] for i in keep])  # the positions spell the needle
    model = build_tiny_model(vocab_size=400)
    cache = make_cache(model, NeedleOraclePolicy(keep), len(keep) + 8, sink=2, window=4)   # no gates needed
    with torch.no_grad():
        model(torch.tensor([ids]), **cache_kwargs(model, cache), use_cache=True)
    for layer in cache.layers:
        assert set(keep) <= set(layer.pos[0, 0].tolist())
    from trimkv.eval.harness import answer_occurrences, needle_kept

    occurrences = answer_occurrences(sample, prompt, tokenizer)
    assert len(occurrences) == 1 and len(occurrences[0]) == 2          # the key stands twice in its sentence
    assert all(tokenizer.decode([ids[i] for i in occ]).strip() == sample.answers[0] for occ in occurrences[0])
    heads = len(cache.layers) * cache.layers[0].pos.shape[1]
    assert needle_kept(cache, occurrences) == heads                     # every (layer, head) holds the key
    streaming = make_cache(model, "streaming", len(keep) + 8, sink=2, window=4)
    with torch.no_grad():
        model(torch.tensor([ids]), **cache_kwargs(model, streaming), use_cache=True)
    assert needle_kept(streaming, occurrences) == 0                     # recency alone loses it at this depth
    with pytest.raises(ValueError, match="keep_positions"):
        NeedleOraclePolicy.for_prompt(seed=0)
    body = make_samples("frequent_words", tokenizer, context_length=512, n=1, chat=False)[0]
    with pytest.raises(ValueError, match="no needles"):
        needle_positions(body, render_prompt(body, tokenizer), tokenizer)

"""The field's output-aware and lookahead eviction policies (CAOTE, OBCache, LAQ): each scores or keeps exactly what its
paper's formula gives on a case small enough to work out by hand; each decodes through ``model.generate`` on a tiny
model, one prompt and a batch (a batch row = that prompt alone), and through the compiled decoder token for token;
their names reach the command line; the harness builds LAQ's pseudo lookahead queries per prompt."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import LayerInputs
from trimkv.cli import build_parser, main
from trimkv.compat import cache_kwargs
from trimkv.errors import CacheError
from trimkv.serve import CompiledDecoder, RetentionLayer, make_cache
from trimkv.serve.eviction import Candidates
from trimkv.serve.laq_lookahead import LookaheadLAQ
from trimkv.serve.policies import CAOTEPolicy, LAQPolicy, OBCachePolicy, get_policy

pytestmark = pytest.mark.usefixtures("one_thread")

FIELD = ("caote", "obcache", "laq")


def kept(layer, row=0, head=0) -> set[int]:
    p = layer.pos[row, head]
    return set(p[p >= 0].tolist())


def chunk(layer, keys, values, start, weights=None):
    """Insert T tokens (one row, one KV head) at positions start.., then the after-attention step with ``weights``
    [G*T, T] over the new tokens (placed on the candidates that hold them; the policy's observe), then compaction."""
    T = keys.shape[2]
    layer.stage(LayerInputs(pos=torch.arange(start, start + T)[None], valid=torch.ones(1, T, dtype=torch.bool)))
    layer.update(keys, values)
    cands = layer.insert(keys, values)
    if weights is not None:
        pos = cands.pos[0, 0]
        w = torch.zeros(weights.shape[0], pos.numel())
        for t in range(T):
            w[:, (pos == start + t).nonzero().item()] = weights[:, t]
        layer.policy.observe(cands.state, w[None, None], cands.pos, T)
    layer.compact()


def rows(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)[None, None]                      # [1, 1, T, D]


# --------------------------------------------------------------------------------------------------- CAOTE
A = [0.4, 0.3, 0.2, 0.1]                                   # the last query's attention over 4 tokens
V = [[1.0, 0.0], [0.4, 0.0], [0.0, 0.0], [-3.0, 0.0]]      # their values


def caote_by_hand(a, v):
    """e_j = a_j / (1 - a_j) * ||o - v_j||, o = sum_i a_i v_i, in plain floats."""
    o = [sum(ai * vi[d] for ai, vi in zip(a, v)) for d in range(len(v[0]))]
    return [aj / (1 - aj) * math.dist(o, vj) for aj, vj in zip(a, v)]


def test_caote_scores_are_the_closed_form_eviction_error():
    expect = caote_by_hand(A, V)             # o = (0.22, 0): [0.52, 0.0771, 0.055, 0.3578]
    assert expect == pytest.approx([0.52, 0.3 / 0.7 * 0.18, 0.055, 0.1 / 0.9 * 3.22])
    c = Candidates(rows(V), rows(V), torch.arange(4)[None, None], torch.tensor([[A]]), torch.tensor([3]))
    assert CAOTEPolicy().scores(c)[0, 0].tolist() == pytest.approx(expect, rel=1e-5)
    # the exact error of dropping token j: the renormalised output moves by e_j
    o = sum(a * torch.tensor(v) for a, v in zip(A, V))
    for j in range(4):
        rest = sum(A[i] / (1 - A[j]) * torch.tensor(V[i]) for i in range(4) if i != j)
        assert (o - rest).norm().item() == pytest.approx(expect[j], rel=1e-5)
    # empty slots neither count in the output nor get kept; H2O's accumulated scores are normalised first
    c = Candidates(rows(V + [[9.0, 9.0]]), rows(V + [[9.0, 9.0]]), torch.tensor([[[0, 1, 2, 3, -1]]]),
                   torch.tensor([[[8.0, 6.0, 4.0, 2.0, 5.0]]]), torch.tensor([3]))
    assert CAOTEPolicy("h2o").scores(c)[0, 0, :4].tolist() == pytest.approx(expect, rel=1e-5)


def test_caote_keeps_what_the_value_aware_error_keeps_not_the_attention():
    G = 2                                                   # two query heads per KV head, same weights
    layer = RetentionLayer(2, policy=get_policy("caote"))
    w = torch.zeros(G * 4, 4)
    w[3::4] = torch.tensor(A)                               # rows (g, t): each head's last query
    w[0::4, 0] = 1.0                                        # earlier queries: ignored by the TOVA base
    chunk(layer, rows(V), rows(V), 0, weights=w)
    assert kept(layer) == {0, 3}                            # errors 0.52, 0.358 beat 0.077, 0.055 ...
    tova = RetentionLayer(2, policy=get_policy("tova"))
    chunk(tova, rows(V), rows(V), 0, weights=w)
    assert kept(tova) == {0, 1}                             # ... where the attention alone keeps 0.4, 0.3
    # decode: the newcomer enters over the lowest error of the previous query's weights (kept 0, 3: a = 0.8, 0.2)
    state = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    assert [state[0], state[3]] == pytest.approx([0.4, 0.1])
    chunk(layer, rows([[0.0, 1.0]]), rows([[0.0, 1.0]]), 4)
    # a = (0.8, 0.2): o = (0.2, 0); e_0 = 4 * 0.8 = 3.2, e_3 = 0.25 * 3.2 = 0.8 -> token 3 goes
    assert kept(layer) == {0, 4}


def test_caote_rejects_an_unknown_base():
    with pytest.raises(ValueError, match="tova"):
        CAOTEPolicy("snap")


# ------------------------------------------------------------------------------------------------- OBCache
def obd_by_hand(q, ks, vs):
    """Saliencies (v, k, kv) of each token for one query, scale 1, in plain floats."""
    z = [sum(a * b for a, b in zip(q, k)) for k in ks]
    e = [math.exp(x) for x in z]
    A = [x / sum(e) for x in e]
    o = [sum(a * v[d] for a, v in zip(A, vs)) for d in range(len(vs[0]))]
    sq = lambda x: sum(t * t for t in x)  # noqa: E731
    sv = [a * a * sq(v) for a, v in zip(A, vs)]
    sk = [a * a * zz * zz * sq([vd - od for vd, od in zip(v, o)]) for a, zz, v in zip(A, z, vs)]
    skv = [a * a * sq([(1 + zz) * vd - zz * od for vd, od in zip(v, o)]) for a, zz, v in zip(A, z, vs)]
    return {"v": sv, "k": sk, "kv": skv}


def test_obcache_state_is_the_obd_saliency_of_key_value_and_pair():
    q, ks, vs = [1.0, 0.0], [[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    hand = obd_by_hand(q, ks, vs)
    # z = (2, 0, 0); A = (e^2, 1, 1) / (e^2 + 2); o = (A_1, A_0)
    a0 = math.exp(2) / (math.exp(2) + 2)
    assert hand["v"][0] == pytest.approx(a0 ** 2) and hand["k"][1] == 0.0 and hand["v"][2] == 0.0
    for score in ("v", "k", "kv"):
        c = Candidates(rows(ks), rows(vs), torch.arange(3)[None, None], torch.zeros(1, 1, 3), torch.tensor([2]))
        OBCachePolicy(score).attend(rows([q]), c, q_pos=torch.tensor([[3]]), scaling=1.0)
        assert c.state[0, 0].tolist() == pytest.approx(hand[score], rel=1e-5, abs=1e-7)
    # the joint score is the two isolated ones plus the cross term 2 A^2 z (||v||^2 - v.o)
    A0, o = a0, [1 / (math.exp(2) + 2), a0]
    cross = 2 * A0 ** 2 * 2 * (1.0 - o[1])
    assert hand["kv"][0] == pytest.approx(hand["v"][0] + hand["k"][0] + cross)


def test_obcache_accumulates_over_the_window_and_keeps_by_saliency_not_attention():
    # two queries over three tokens; token 0 gets the most attention but has a zero value
    ks = [[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    vs = [[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]
    qs = [[0.0, 5.0], [1.0, 0.0]]          # the first query is outside a window of 1: it must not count
    layer = RetentionLayer(2, policy=OBCachePolicy("v", obs_window=1))
    layer.stage(LayerInputs(pos=torch.tensor([[0, 1, 2]]), valid=torch.ones(1, 3, dtype=torch.bool)))
    layer.update(rows(ks), rows(vs))
    cands = layer.insert(rows(ks), rows(vs))
    layer.policy.attend(rows([qs[0], qs[0], qs[1]]), cands, q_pos=torch.tensor([[0, 1, 2]]), scaling=1.0)
    expect = obd_by_hand(qs[1], ks, vs)["v"]            # only the last query (it sees all three)
    assert cands.pos[0, 0].tolist() == [-1, -1, 0, 1, 2]                            # 2 empty slots + the chunk
    assert cands.state[0, 0].tolist() == pytest.approx([0.0, 0.0, *expect], rel=1e-5)
    layer.compact()
    assert kept(layer) == {1, 2}                        # A = (.84, .11, .04) but ||v_0|| = 0
    # decode steps add their saliency to what prefill left
    before = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    q_pos = torch.tensor([[3]])
    layer.stage(LayerInputs(pos=q_pos, valid=None))
    layer.update(rows([[0.0, 0.0]]), rows([[0.0, 0.0]]))
    slots = layer.insert(rows([[0.0, 0.0]]), rows([[0.0, 0.0]]))       # the newcomer (value 0) takes a slot
    assert kept(layer) == {1, 3}                        # the lower saliency (token 2) made room
    layer.policy.attend(rows([[1.0, 0.0]]), slots, q_pos=q_pos, scaling=1.0)
    after = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    old = next(p for p in after if p != 3)
    ks_now = [ks[old], [0.0, 0.0]]
    vs_now = [vs[old], [0.0, 0.0]]
    inc = obd_by_hand([1.0, 0.0], ks_now, vs_now)["v"]
    assert after[old] == pytest.approx(before[old] + inc[0], rel=1e-5) and after[3] == pytest.approx(0.0)


def test_obcache_refuses_unknown_settings():
    with pytest.raises(ValueError, match="kv"):
        OBCachePolicy("q")
    with pytest.raises(ValueError, match="obs_window"):
        OBCachePolicy(obs_window=0)


# ----------------------------------------------------------------------------------------------------- LAQ
def laq_layer(lookahead_q, local_window, budget=2):
    """A RetentionLayer with LAQ holding one lookahead query (position 10) for layer 0, no pooling."""
    pol = LAQPolicy(torch.tensor(lookahead_q)[None, None, None, None], torch.tensor([[10]]),
                    local_window=local_window, kernel=1)
    return RetentionLayer(budget, policy=pol)


def laq_prefill(layer, T=6):
    """6 tokens with keys 3 e_j (D = 6); every prompt query is 3 e_0 (the local window looks at token 0)."""
    keys = rows([[3.0 * (d == j) for d in range(T)] for j in range(T)])
    q = rows([[3.0 * (d == 0) for d in range(T)]] * T)
    layer.stage(LayerInputs(pos=torch.arange(T)[None], valid=None))
    layer.update(keys, keys.clone())
    return layer.attend(q, keys, keys.clone(), scaling=1.0)


def test_laq_keeps_what_the_lookahead_queries_attend_to():
    # lookahead query e_4 + 0.5 e_1: logits 3 and 1.5 on tokens 4 and 1, 0 elsewhere
    la = [0.0, 0.5, 0.0, 0.0, 1.0, 0.0]
    layer = laq_layer(la, local_window=0)
    laq_prefill(layer)
    assert kept(layer) == {1, 4}                       # plain LAQ: the prompt's own queries (on token 0) ignored
    den = math.exp(3) + math.exp(1.5) + 4
    state = dict(zip(layer.pos[0, 0].tolist(), layer.state[0, 0].tolist()))
    assert [state[4], state[1]] == pytest.approx([math.exp(3) / den, math.exp(1.5) / den], rel=1e-5)
    # LAQ++: the last local query (all on token 0: e^9 / (e^9 + 5)) joins the lookahead one
    plus = laq_layer(la, local_window=1)
    laq_prefill(plus)
    assert kept(plus) == {0, 4}
    state = dict(zip(plus.pos[0, 0].tolist(), plus.state[0, 0].tolist()))
    assert state[0] == pytest.approx(1 / den + math.exp(9) / (math.exp(9) + 5), rel=1e-5)
    # without lookahead queries: LAQ's stage 1 alone (SnapKV over the last stage1_window queries)
    stage1 = RetentionLayer(2, policy=LAQPolicy(kernel=1, stage1_window=2))
    laq_prefill(stage1)
    assert 0 in kept(stage1)


def test_laq_decoding_keeps_the_prompt_selection_and_refuses_other_batches():
    layer = laq_layer([0.0, 0.5, 0.0, 0.0, 1.0, 0.0], local_window=0, budget=3)
    laq_prefill(layer)
    assert {1, 4} < kept(layer)                         # and one of the tokens the lookahead query ignores
    k = rows([[0.0] * 6])
    layer.stage(LayerInputs(pos=torch.tensor([[6]]), valid=None))
    layer.update(k, k)
    layer.attend(rows([[1.0] * 6]), k, k, scaling=1.0)              # decode: scores frozen, newcomer scores 0
    assert kept(layer) == {1, 4, 6}
    layer.stage(LayerInputs(pos=torch.tensor([[7]]), valid=None))
    layer.update(k, k)
    layer.attend(rows([[1.0] * 6]), k, k, scaling=1.0)
    assert kept(layer) == {1, 4, 7}                     # the generated token goes first, the selection stays
    pol = LAQPolicy(torch.zeros(1, 2, 1, 1, 6), torch.tensor([[10], [10]]))   # made for 2 prompts
    with pytest.raises(CacheError, match="2 prompt"):
        laq_prefill(RetentionLayer(2, policy=pol))


def test_laq_lookahead_records_the_pseudo_decoded_tokens_queries():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_tiny_model(initializer_range=0.2)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    pol = LookaheadLAQ.lookahead(model, ids, budget=12, sink=2, window=3, chunk=16, n=3)
    L, Hq, D = 2, 4, 16
    assert pol.queries.shape == (L, 1, Hq, 3, D) and pol.query_pos.tolist() == [[40, 41, 42]]
    # the pseudo tokens are greedy decoding with LAQ's stage 1 (SnapKV, window 32, same budget)
    stage1 = make_cache(model, get_policy("snapkv", obs_window=32), 12, sink=2, window=3)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, stage1),
                             max_new_tokens=3, do_sample=False, pad_token_id=0, prefill_chunk_size=16)
    # layer 0's query of pseudo token i depends on that token and its position only: recompute it by hand
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(out[:, 40:43]))      # [1, 3, d]
        q = attn.q_proj(h).view(1, 3, Hq, D).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, torch.tensor([[40, 41, 42]]))
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.allclose(pol.queries[0], q, atol=1e-5)


# ---------------------------------------------------------------------------------------- inside a model
def policy_for(name, model, ids, budget, sink, window, chunk):
    if name == "laq":
        return LookaheadLAQ.lookahead(model, ids, budget=budget, sink=sink, window=window, chunk=chunk)
    return get_policy(name)


def eager(model, ids, cache, n=6, chunk=16):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)


@pytest.mark.parametrize("name", FIELD)
def test_generate_one_prompt_and_a_batch_within_budget(name):
    model = build_tiny_model(initializer_range=0.2)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = make_cache(model, policy_for(name, model, ids, 12, 2, 3, 16), 12, sink=2, window=3)
    out = eager(model, ids, batch)
    assert out.shape == (2, 54)
    for layer in batch.layers:
        assert layer.pos.shape[-1] == 12 and (layer.num_kept() == 12).all()
        assert (layer.pos[..., None] == torch.tensor([0, 1])).any(-2).all()          # sinks kept
        assert (layer.pos.amax(-1) == 48 + 6 - 2).all()                               # newest token kept
        assert torch.isfinite(layer.state).all()
    for r in range(2):                                   # a batch row is that prompt alone
        one = make_cache(model, policy_for(name, model, ids[r:r + 1], 12, 2, 3, 16), 12, sink=2, window=3)
        assert torch.equal(eager(model, ids[r:r + 1], one), out[r:r + 1])
        assert [set(l.pos[0, h].tolist()) for l in one.layers for h in range(2)] == \
            [set(l.pos[r, h].tolist()) for l in batch.layers for h in range(2)]


@pytest.mark.parametrize("name", FIELD)
def test_compiled_decode_is_token_identical_to_eager(name):
    torch._dynamo.reset()
    model = build_tiny_model(initializer_range=0.2)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = make_cache(model, policy_for(name, model, ids, 12, 2, 3, 16), 12, sink=2, window=3)
    expect = eager(model, ids, ref, n=12)
    cache = make_cache(model, policy_for(name, model, ids, 12, 2, 3, 16), 12, sink=2, window=3)
    decoder = CompiledDecoder(model, cache, prefill_chunk=16, backend="eager")       # fullgraph: no host syncs
    assert torch.equal(decoder.generate(ids, max_new_tokens=12), expect)
    assert decoder.last.recompiles == 0
    assert [[set(p.tolist()) for p in l.pos[0]] for l in cache.layers] == \
        [[set(p.tolist()) for p in l.pos[0]] for l in ref.layers]
    torch._dynamo.reset()


def test_the_harness_builds_laq_with_this_prompts_lookahead(tokenizer):
    from trimkv.eval.harness import policy_cache
    from trimkv.eval.tasks import make_samples, render_prompt

    sample = make_samples("passkey", tokenizer, context_length=160, n=1, depths=[0.5], chat=False)[0]
    prompt = render_prompt(sample, tokenizer)
    model = build_tiny_model(vocab_size=400)
    cache = policy_cache(model, "laq", 24, sink=2, window=4, prompt=prompt, tokenizer=tokenizer, sample=sample,
                         prefill_chunk=64, seed=0)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expect = LookaheadLAQ.lookahead(model, ids, budget=24, sink=2, window=4, chunk=64)
    assert torch.equal(cache.policy.queries, expect.queries)
    assert cache.policy.query_pos.tolist() == [list(range(ids.shape[1], ids.shape[1] + 8))]
    assert policy_cache(model, "laq", 24, sink=2, window=4, seed=0).policy.queries is None   # no prompt: stage 1
    for name in ("caote", "obcache"):
        assert type(policy_cache(model, name, 24, sink=2, window=4, prompt=prompt, tokenizer=tokenizer,
                                 prefill_chunk=64).policy) is type(get_policy(name))


# ----------------------------------------------------------------------------------------- command line
def test_the_names_reach_the_command_line(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("trimkv.eval.cli.load_for_gates", lambda args: (build_tiny_model(), None))
    monkeypatch.setattr("trimkv.eval.harness.run_eval", lambda model, tok, **kw: seen.update(kw) or [])
    monkeypatch.setattr("trimkv.eval.harness.markdown_table", lambda recs: "")
    assert main(["eval", "--tasks", "passkey", "--lengths", "2048", "--budgets", "64", "--policies",
                 "caote,obcache,laq", "--n", "2", "--out", str(tmp_path / "o")]) == 0
    assert seen["policies"] == ["caote", "obcache", "laq"]
    args = build_parser().parse_args(["generate", "p.txt", "--policy", "obcache", "--budget", "8"])
    assert args.policy == "obcache"


def test_laq_without_lookahead_queries_says_it_is_snapkv():
    """A LAQ policy built by name (no model, no prompt) is stage 1 alone: it warns instead of passing for LAQ."""
    import warnings

    torch.manual_seed(0)
    B, H, S, D = 1, 2, 6, 4
    c = Candidates(torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.arange(S).expand(B, H, S).clone(),
                   torch.zeros(B, H, S), torch.tensor([S - 1]))
    q = torch.randn(B, 4, 3, D)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LAQPolicy().attend(q, c, q_pos=torch.arange(3, 6)[None], scaling=0.5)
    assert any("stage 1 only" in str(w.message) for w in seen)

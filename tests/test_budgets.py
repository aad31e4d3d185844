"""Per-head budgets (trimkv.serve.budgets, the bounded cache's head_budgets) and LU-KV profiling (trimkv.eval.profile):
PAVA and the greedy solver against hand-computed and brute-force answers, the exact total of every scaling, caches
that keep exactly b_h tokens per head (the right ones) in chunked prefill, decode and compiled decode, the memory
accounting, bad allocation files and command lines refused with named errors."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import attach_gates
from trimkv.cli import main
from trimkv.compat import cache_kwargs
from trimkv.errors import AllocationError, CacheError
from trimkv.serve import CompiledDecoder, RetentionCache, make_cache
from trimkv.serve.budgets import (HeadAllocation, convex_gains, greedy_allocate, load_allocation, pava_nonincreasing,
                                  scale_shares)
from trimkv.serve.generation import prefill

pytestmark = pytest.mark.usefixtures("one_thread")

L, H = 2, 2                                   # the tiny models: 2 layers x 2 KV heads
PROMPT = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------- the math


def test_pava_pools_adjacent_violators_by_hand():
    assert pava_nonincreasing([5, 1, 3, 2, 4]) == [5, 2.5, 2.5, 2.5, 2.5]
    assert pava_nonincreasing([3, 2, 1]) == [3, 2, 1]                       # already non-increasing: unchanged
    assert pava_nonincreasing([1, 3], weights=[3, 1]) == [1.5, 1.5]         # weighted mean (3*1 + 1*3) / 4
    # a loss curve 10, 9, 5, 4, 0: decrements 1, 4, 1, 4 -> one block of 2.5 (the chord of the convex hull)
    assert convex_gains([10, 9, 5, 4, 0]) == [2.5, 2.5, 2.5, 2.5]


def _best(gains: torch.Tensor, total: int, floor: int) -> tuple[float, tuple]:
    N, n = gains.shape
    prefix = torch.cat([torch.zeros(N, 1, dtype=gains.dtype), gains.cumsum(1)], 1)
    best = max((float(sum(prefix[h, b - floor] for h, b in enumerate(bs))), bs)
               for bs in itertools.product(range(floor, floor + n + 1), repeat=N) if sum(bs) == total)
    return best


@pytest.mark.parametrize("total", [6, 8, 11, 14])
def test_greedy_equals_brute_force_on_convex_curves(total):
    g = torch.Generator().manual_seed(total)
    gains = torch.rand(3, 5, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values  # convex curves
    alloc = greedy_allocate(gains, total, floor=2)
    value, bs = _best(gains, total, floor=2)
    assert int(alloc.sum()) == total and tuple(alloc.tolist()) == bs
    got = sum(float(gains[h, :b - 2].sum()) for h, b in enumerate(alloc.tolist()))
    assert got == pytest.approx(value)


def test_greedy_breaks_ties_toward_the_lower_head():
    assert greedy_allocate(torch.ones(3, 4, dtype=torch.float64), 5, floor=1).tolist() == [3, 1, 1]


def test_scaling_keeps_the_uniform_total_and_the_floor():
    shares = torch.tensor([[2.0, 1.0], [0.5, 0.5]])
    assert scale_shares(shares, 10, floor=3).tolist() == [[20, 10], [5, 5]]
    # two heads below the floor 6: they get 6, the other two share 40 - 12 = 28 as 2:1 = 18.67 / 9.33 -> 19, 9
    assert scale_shares(shares, 10, floor=6).tolist() == [[19, 9], [6, 6]]
    g = torch.Generator().manual_seed(0)
    for budget in (21, 33, 64, 128):
        s = torch.rand(30, 3, generator=g) ** 3
        b = scale_shares(s / s.mean(), budget, floor=21)
        assert int(b.sum()) == budget * 90 and int(b.min()) >= 21
    with pytest.raises(CacheError, match="floor"):
        scale_shares(shares, 5, floor=6)


# ------------------------------------------------------------------------------------------- the cache


def kept(cache) -> list[list[set[int]]]:
    return [[set(p[p >= 0].tolist()) for p in layer.pos[0]] for layer in cache.layers]


HB8 = [[6, 10], [9, 7]]                       # sum 32 = 8 x 2 layers x 2 heads


def test_streaming_keeps_exactly_b_h_of_the_right_tokens_in_prefill_and_decode():
    model = build_tiny_model()
    cache = make_cache(model, "streaming", 8, sink=2, window=2, head_budgets=torch.tensor(HB8))
    prefill(model, PROMPT[:, :30], cache, chunk=7)            # chunked prefill: [slots + 7] -> best b_h per head
    for layer, row in zip(kept(cache), HB8):
        assert layer == [{0, 1} | set(range(30 - (b - 2), 30)) for b in row]   # sinks + the b - 2 most recent
    with torch.no_grad():
        model.generate(PROMPT[:, :30], attention_mask=torch.ones(1, 30, dtype=torch.long), max_new_tokens=6,
                       do_sample=False, pad_token_id=0, **cache_kwargs(model, make_cache(model, "full")))
        cache2 = make_cache(model, "streaming", 8, sink=2, window=2, head_budgets=HB8)
        model.generate(PROMPT[:, :30], attention_mask=torch.ones(1, 30, dtype=torch.long), max_new_tokens=6,
                       do_sample=False, pad_token_id=0, prefill_chunk_size=7, **cache_kwargs(model, cache2))
    T = cache2.get_seq_length()                               # 35: the last new token is not fed back
    for layer, row in zip(kept(cache2), HB8):                 # decode steps evicted within each head's own slots
        assert layer == [{0, 1} | set(range(T - (b - 2), T)) for b in row]
    for layer, row in zip(cache2.layers, HB8):
        assert (layer.pos[0] == -2).sum(-1).tolist() == [max(row) - b for b in row]   # the disabled slots stay


@pytest.mark.parametrize("policy", ["snapkv", "keydiff", "h2o", "tova", "knorm", "random"])
def test_every_policy_keeps_b_h_tokens_per_head(policy):
    model = build_tiny_model()
    cache = make_cache(model, policy, 8, sink=1, window=2, head_budgets=HB8)
    prefill(model, PROMPT, cache, chunk=9)
    assert [layer.num_kept()[0].tolist() for layer in cache.layers] == HB8


def test_equal_head_budgets_keep_what_the_uniform_cache_keeps():
    model, _ = gated()
    for policy in ("trimkv", "keydiff"):      # scores without ties (SnapKV's max pooling ties: any of them may stay)
        a = make_cache(model, policy, 8, sink=1, window=2)
        b = make_cache(model, policy, 8, sink=1, window=2, head_budgets=[[8, 8], [8, 8]])
        prefill(model, PROMPT, a, chunk=9)
        prefill(model, PROMPT, b, chunk=9)
        assert kept(a) == kept(b)


def test_budgeted_bytes_equal_the_uniform_cache_and_padding_is_counted_apart():
    model = build_tiny_model()
    uniform = make_cache(model, "snapkv", 8, sink=1, window=2)
    split = make_cache(model, "snapkv", 8, sink=1, window=2, head_budgets=HB8)
    for c in (uniform, split):
        prefill(model, PROMPT, c, chunk=9)
    per_slot = 2 * 16 * 4 + 8 + 4                             # K, V (head_dim 16, fp32), pos int64, state fp32
    assert uniform.budget_nbytes() == uniform.nbytes() == 32 * per_slot
    assert split.budget_nbytes() == 32 * per_slot             # the same total memory
    assert split.nbytes() == (10 + 10 + 9 + 9) * per_slot     # layer slots: 2 heads x its largest budget


def test_bad_head_budgets_are_refused():
    model = build_tiny_model()
    with pytest.raises(CacheError, match="sum to 33"):
        make_cache(model, "snapkv", 8, sink=1, window=2, head_budgets=[[7, 10], [9, 7]])
    with pytest.raises(CacheError, match="at least 4"):
        make_cache(model, "snapkv", 8, sink=1, window=2, head_budgets=[[3, 13], [9, 7]])
    with pytest.raises(CacheError, match=r"shape \[1, 2\]"):
        make_cache(model, "snapkv", 8, head_budgets=[[16, 16]])
    with pytest.raises(CacheError, match="one row of KV-head budgets per layer"):
        RetentionCache(8, 2, head_budgets=[[16, 16]])
    with pytest.raises(CacheError, match="global pool"):
        make_cache(model, "trimkv", 8, scope="global", head_budgets=torch.tensor(HB8))
    with pytest.raises(CacheError, match="2 layers x 2 KV heads"):
        make_cache(model, "snapkv", 8, sink=1, window=2, head_budgets=[[6, 6, 12], [8, 8, 8]])


# ------------------------------------------------------------------------------------------- compiled decode


def gated(eos=None):
    model = build_tiny_model(initializer_range=0.2)
    handle = attach_gates(model, gate_hidden=16, bias_init=1.0, init_std=0.5)
    model.generation_config.eos_token_id = eos
    return model, handle


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["trimkv", "h2o"])
def test_compiled_decode_with_head_budgets_is_token_identical_to_eager(policy):
    torch._dynamo.reset()
    model, _ = gated()
    new = lambda: make_cache(model, policy, 8, sink=1, window=2, head_budgets=HB8)  # noqa: E731
    ref_cache, cache = new(), new()
    with torch.no_grad():
        ref = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **cache_kwargs(model, ref_cache),
                             max_new_tokens=30, do_sample=False, pad_token_id=0, prefill_chunk_size=16)
    decoder = CompiledDecoder(model, cache, prefill_chunk=16)
    out = decoder.generate(PROMPT, max_new_tokens=30)
    assert torch.equal(out, ref)
    assert kept(cache) == kept(ref_cache)
    assert [layer.num_kept()[0].tolist() for layer in cache.layers] == HB8
    assert decoder.last.recompiles == 0 and decoder.last.timed_steps == 27
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- the file


def allocation(tmp_path, **change) -> str:
    shares = [[0.5, 1.5], [1.25, 0.75]]
    alloc = HeadAllocation(base_model="tiny", shape=(L, H), grid=[0.1, 0.2],
                           tables={"snapkv": {"shares": shares, "ratios": [[[0.05, 0.15], [0.12, 0.08]]] * 2}},
                           settings={"sink": 1}, cost={"seconds": 1.0}, name="tiny-lukv")
    data = {**alloc.to_json(), **change}
    folder = tmp_path / "alloc"
    folder.mkdir(exist_ok=True)
    (folder / "allocation.json").write_text(json.dumps(data))
    return str(folder)


def test_an_allocation_file_scales_to_the_budget_through_make_cache(tmp_path):
    folder = allocation(tmp_path)
    alloc = load_allocation(folder)
    assert alloc.policies == ["snapkv"] and alloc.shape == (2, 2)
    model = build_tiny_model()
    cache = make_cache(model, "snapkv", 16, sink=1, window=2, head_budgets=folder)
    assert cache.head_budgets == [[8, 24], [20, 12]]               # 16 x shares, total 64 = 16 x 4
    with pytest.raises(AllocationError, match="not for policy 'keydiff'"):
        make_cache(model, "keydiff", 16, sink=1, window=2, head_budgets=folder)
    assert make_cache(model, "snapkv", 16, sink=1, window=2, head_budgets="uniform").head_budgets is None


@pytest.mark.parametrize("change, named", [
    ({"format": "x"}, "not a trimkv head allocation"),
    ({"version": 9}, "version 9"),
    ({"shape": [2]}, "shape must be"),
    ({"tables": {}}, "no tables"),
    ({"tables": {"snapkv": {"shares": [[1, 1], [1, 2]], "ratios": [[[0, 0], [0, 0]]] * 2}}}, "sum to 5"),
    ({"tables": {"snapkv": {"shares": [[-1, 3], [1, 1]], "ratios": [[[0, 0], [0, 0]]] * 2}}}, "non-negative"),
    ({"tables": {"snapkv": {"shares": [[1, 1, 1], [1, 1, 1]], "ratios": []}}}, "shape [2, 3]"),
    ({"tables": {"snapkv": {"shares": [[1, 1], [1, 1]], "ratios": [[[2, 0], [0, 0]]] * 2}}}, "[0, 1]"),
    ({"grid": [0]}, "grid"),
])
def test_bad_allocation_files_are_refused(tmp_path, change, named):
    with pytest.raises(AllocationError, match=named.replace("[", r"\[")):
        load_allocation(allocation(tmp_path, **change))


def test_missing_or_broken_files_and_other_models_are_refused(tmp_path):
    with pytest.raises(AllocationError, match="no such file"):
        load_allocation(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AllocationError, match="not a JSON allocation"):
        load_allocation(tmp_path / "bad.json")
    model = build_tiny_model(num_hidden_layers=3)
    with pytest.raises(AllocationError, match="has 3 x 2"):
        make_cache(model, "snapkv", 16, sink=1, window=2, head_budgets=allocation(tmp_path))


# ------------------------------------------------------------------------------------------- the command line


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr("trimkv.base_model.load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv, code, named", [
    (["eval", "--policies", "snapkv", "--head-budgets", "{missing}"], 4, "no such file"),
    (["eval", "--policies", "snapkv,h2o", "--head-budgets", "{alloc}"], 2, "not for h2o"),
    (["eval", "--policies", "snapkv,h2o", "--head-budgets", "{alloc}", "--fidelity"], 2, "not for h2o"),
    (["generate", "{p}", "--head-budgets", "{alloc}"], 2, "give --budget"),
    (["generate", "{p}", "--policy", "h2o", "--budget", "64", "--head-budgets", "{alloc}"], 2, "not for h2o"),
    (["profile", "--out", "{tmp}/x", "--ratios", "0,0.5"], 2, "keep ratios"),
    (["profile", "--out", "{tmp}/x", "--policies", "trimkv"], 2, "read trained gates"),
    (["profile", "--out", "{tmp}/x", "--policies", "kvp"], 2, "give --kvp"),
    (["profile", "--out", "{tmp}/x", "--policies", "snapkv", "--kvp", "{tmp}/r"], 2, "no policy of --policies"),
    (["profile", "--out", "{tmp}/x", "--policies", "snapkv", "--ratios", "0.001"], 2, "per-head floor"),
])
def test_command_lines_are_checked_before_the_model_loads(argv, code, named, tmp_path, no_model, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"context": "a b c", "question": "d?"}) + "\n")
    values = {"missing": tmp_path / "none", "alloc": allocation(tmp_path), "p": tmp_path / "p.jsonl", "tmp": tmp_path}
    got = _run([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    assert got == code and named in err and "Traceback" not in err, err


def test_the_eval_flag_defaults_to_uniform():
    from trimkv.cli import build_parser

    args = build_parser().parse_args(["eval"])
    assert args.head_budgets == "uniform"
    args = build_parser().parse_args(["eval", "--head-budgets", "x/alloc"])
    assert args.head_budgets == "x/alloc"


# ------------------------------------------------------------------------------------------- the harness


def test_eval_cells_with_head_budgets_are_their_own_cells_at_the_same_memory(tokenizer, tmp_path):
    from trimkv.eval.harness import run_eval

    model = build_tiny_model(vocab_size=400, initializer_range=0.2)
    kw = dict(tasks=["passkey"], lengths=[256], n_samples=2, sink=2, window=4, prefill_chunk=64, max_new_tokens=3,
              progress=False, budgets=[16], policies=["snapkv"], out_dir=tmp_path / "r")
    folder = allocation(tmp_path)
    uniform = run_eval(model, tokenizer, **kw)
    split = run_eval(model, tokenizer, head_budgets=folder, **kw)
    assert "head_budgets" not in uniform[0] and split[0]["head_budgets"] == "tiny-lukv"
    assert split[0]["budget_kv_bytes"] == uniform[0]["budget_kv_bytes"] == uniform[0]["kv_bytes"]
    assert split[0]["kv_bytes"] > split[0]["budget_kv_bytes"]            # the padding of the largest head budgets
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(metrics) == 2                                             # both cells kept side by side
    assert "| passkey | 256 | snapkv (tiny-lukv) |" in (tmp_path / "r" / "results.md").read_text()
    assert len(list((tmp_path / "r" / "cells").rglob("*.json"))) == 2


def test_fidelity_with_head_budgets_names_the_allocation_and_drifts_differently(tokenizer, tmp_path):
    from trimkv.eval.fidelity import fidelity_table, run_fidelity

    model = build_tiny_model(vocab_size=400, initializer_range=0.2)
    kw = dict(n_texts=1, prefix_tokens=96, continuation_tokens=24, sink=1, window=2, prefill_chunk=32,
              progress=False, policies=["snapkv"])
    folder = allocation(tmp_path)
    uniform = run_fidelity(model, tokenizer, budgets=[12], **kw)
    split = run_fidelity(model, tokenizer, budgets=[12, 400], head_budgets=folder, out_dir=tmp_path / "f", **kw)
    assert "head_budgets" not in uniform[0] and {r["head_budgets"] for r in split} == {"tiny-lukv"}
    by = {r["budget"]: r for r in split}
    assert by[400]["kl"] == pytest.approx(0.0, abs=1e-5)                  # nothing evicted: exact
    assert by[12]["kl"] > 1e-4 and by[12]["kl"] != pytest.approx(uniform[0]["kl"], rel=1e-6)
    assert "| snapkv (tiny-lukv) | 12 |" in fidelity_table(split)


def test_profiling_a_tiny_model_writes_an_allocation_make_cache_takes(tokenizer, tmp_path):
    from trimkv.eval.profile import allocation_card, profile_allocation, profiling_set

    docs = profiling_set(tokenizer, n_docs=1, questions=2, length=640, seed=5)
    context, queries = docs[0]
    assert len(queries) == 2 and all(q.tail.startswith("\n\n") and q.answer.endswith(".") for q in queries)
    assert "Question:" not in context and "pass key" not in context          # nothing of the eval tasks' wording
    model = build_tiny_model(vocab_size=400, initializer_range=0.2)
    alloc = profile_allocation(model, tokenizer, policies=["snapkv", "keydiff"], n_docs=1, questions=2, length=640,
                               seed=5, grid=[0.1, 0.2], sink=1, window=2, prefill_chunk=64, name="t", progress=False)
    for table in alloc.tables.values():
        shares, ratios = torch.tensor(table["shares"]), torch.tensor(table["ratios"])
        assert shares.shape == (2, 2) and float(shares.mean()) == pytest.approx(1.0) and (shares > 0).all()
        assert ratios.shape == (2, 2, 2) and float(ratios[0].mean()) == pytest.approx(0.1, rel=0.05)
        assert all(0 <= x <= 1 for x in table["loss_uniform"] + table["loss_lukv"])
    folder = tmp_path / "t"
    alloc.save(folder, card=allocation_card(alloc))
    assert "| snapkv |" in (folder / "README.md").read_text()
    again = load_allocation(folder)
    assert again.tables == json.loads(json.dumps(alloc.tables)) and again.cost["seconds"] > 0
    cache = make_cache(model, "keydiff", 16, sink=1, window=2, head_budgets=folder)
    assert sum(map(sum, cache.head_budgets)) == 64


def test_profiling_kvp_rankers_reads_them_and_records_which(tokenizer, tmp_path):
    """``trimkv profile --policies kvp --kvp CKPT``: the rankers score the tokens (two different rankers give two
    different tables), and the allocation names the checkpoint it profiled."""
    from trimkv.eval.profile import profile_allocation
    from trimkv.kvp import KVPConfig, KVPRankers, save_rankers

    model = build_tiny_model(vocab_size=400, initializer_range=0.2)
    cfg = model.config
    tables = []
    for seed in (0, 1):
        rankers = KVPRankers(KVPConfig(num_layers=L, num_kv_heads=H, head_dim=cfg.hidden_size // cfg.num_attention_heads,
                                       hidden=8, pos_scale=64, base_model="tiny-llama"), seed=seed)
        with torch.no_grad():
            rankers.b2.normal_(generator=torch.Generator().manual_seed(seed))
        folder = save_rankers(rankers, tmp_path / f"kvp{seed}")
        alloc = profile_allocation(model, tokenizer, policies=["kvp"], n_docs=1, questions=2, length=640, seed=5,
                                   grid=[0.1, 0.2], sink=1, window=2, prefill_chunk=64, progress=False, kvp=folder)
        assert alloc.settings["kvp"] == str(folder)
        tables.append(alloc.tables["kvp"])
    assert tables[0]["shares"] != tables[1]["shares"]
    cache = make_cache(model, _kvp_policy(folder, model), 16, sink=1, window=2, head_budgets=alloc)
    assert sum(map(sum, cache.head_budgets)) == 64


def _kvp_policy(folder, model):
    from trimkv.eval.harness import prepared_rankers
    from trimkv.serve.policies import get_policy

    return get_policy("kvp", rankers=prepared_rankers(model, folder, need=True))


# ------------------------------------------------------------------------------------------- per-layer budgets


def test_the_per_layer_solver_hands_tokens_to_whole_layers_by_hand():
    from trimkv.eval.profile import layer_allocations

    # heads (0, 0), (0, 1), (1, 0), (1, 1); a layer's gain is the sum of its heads': layer 0 [9, 7, 1], layer 1
    # [11, 3, 2]. Floor 3; 20 head tokens = 10 layer tokens, the 4 beyond the floors go to the gains 11 (layer 1),
    # 9, 7 (layer 0), 3 (layer 1)
    gains = torch.tensor([[5., 3, 1], [4, 4, 0], [9, 1, 0], [2, 2, 2]])
    assert layer_allocations(gains, [20], 3, 2, 2).tolist() == [[5, 5, 5, 5]]
    assert layer_allocations(gains, [14], 3, 2, 2).tolist() == [[3, 3, 4, 4]]     # one token each: layer 1 (11)
    with pytest.raises(ValueError, match="multiples"):
        layer_allocations(gains, [13], 3, 2, 2)


def test_a_per_layer_allocation_has_no_padding_and_keeps_the_total(tmp_path):
    shares = [[0.5, 0.5], [1.5, 1.5]]
    folder = allocation(tmp_path, granularity="layer",
                        tables={"snapkv": {"shares": shares, "ratios": [[[0.1] * 2] * 2] * 2}})
    alloc = load_allocation(folder)
    assert alloc.granularity == "layer" and alloc.to_json()["granularity"] == "layer"
    assert alloc.budgets("snapkv", 11, 4).tolist() == [[6, 6], [16, 16]]       # 2 layers x 2 heads x 11 = 44
    model = build_tiny_model()
    cache = make_cache(model, "snapkv", 11, sink=1, window=2, head_budgets=folder)
    prefill(model, PROMPT, cache, chunk=9)
    uniform = make_cache(model, "snapkv", 11, sink=1, window=2)
    prefill(model, PROMPT, uniform, chunk=9)
    assert cache.nbytes() == cache.budget_nbytes() == uniform.nbytes()       # allocated = budgeted = uniform
    assert "granularity" not in HeadAllocation("m", (2, 2), [0.1], {}).to_json()   # per head: the old format


def test_a_per_layer_allocation_whose_heads_differ_is_refused(tmp_path):
    with pytest.raises(AllocationError, match="differ between the KV heads of a layer"):
        load_allocation(allocation(tmp_path, granularity="layer"))
    with pytest.raises(AllocationError, match="granularity must be one of head, layer"):
        load_allocation(allocation(tmp_path, granularity="token"))


def test_profiling_per_layer_gives_every_head_of_a_layer_the_same_share(tokenizer, tmp_path):
    from trimkv.eval.profile import allocation_card, profile_allocation

    model = build_tiny_model(vocab_size=400, initializer_range=0.2)
    alloc = profile_allocation(model, tokenizer, policies=["snapkv"], n_docs=1, questions=2, length=640, seed=5,
                               grid=[0.1, 0.2], sink=1, window=2, prefill_chunk=64, name="t", per="layer",
                               progress=False)
    shares = torch.tensor(alloc.tables["snapkv"]["shares"])
    assert alloc.granularity == "layer" and float(shares.mean()) == pytest.approx(1.0)
    assert torch.allclose(shares, shares[:, :1].expand_as(shares))
    alloc.save(tmp_path / "t", card=allocation_card(alloc))
    assert "per-layer" in (tmp_path / "t" / "README.md").read_text()
    assert load_allocation(tmp_path / "t").granularity == "layer"


def test_the_matched_budget_allocates_no_more_than_the_uniform_cache(tmp_path):
    alloc = load_allocation(allocation(tmp_path))                  # shares [[0.5, 1.5], [1.25, 0.75]]
    assert alloc.budgets("snapkv", 16, 4).tolist() == [[8, 24], [20, 12]]
    assert alloc.allocated_slots("snapkv", 16, 4) == 2 * (24 + 20)             # each layer: 2 x its largest
    m = alloc.matched_budget("snapkv", 16, 4)
    assert alloc.allocated_slots("snapkv", m, 4) <= 16 * 4
    assert all(alloc.allocated_slots("snapkv", k, 4) > 16 * 4 for k in range(m + 1, 17))
    assert m == 11                                                 # [[6, 16], [14, 8]]: 2 x (16 + 14) = 60 slots
    with pytest.raises(CacheError, match="raise the budget"):
        alloc.matched_budget("snapkv", 3, 4)
    model = build_tiny_model()
    cache = make_cache(model, "snapkv", m, sink=1, window=2, head_budgets=alloc)
    prefill(model, PROMPT, cache, chunk=9)
    uniform = make_cache(model, "snapkv", 16, sink=1, window=2)
    prefill(model, PROMPT, uniform, chunk=9)
    assert cache.nbytes() <= uniform.nbytes()
    layers = HeadAllocation("tiny", (2, 2), [0.1], {"snapkv": {"shares": [[0.5, 0.5], [1.5, 1.5]],
                                                               "ratios": [[[0.1] * 2] * 2]}}, granularity="layer")
    assert layers.matched_budget("snapkv", 16, 4) == 16            # per layer: nothing to pad

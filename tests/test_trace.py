"""The trace store (trimkv.trace): targets equal the frozen model's own attention weights (computed here from an
eager forward with output_attentions), keys equal what its attention sees, the answer target reads only the answer
queries, recon equals a forward over [row, prompt, row]; the store round-trips, resumes after an interruption to the
same bytes, refuses damaged or mismatched stores with named errors; the command parses and runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _cli import assert_fails, run_cli
from _tinyrun import make_model_dir
from conftest import build_tiny_model

from trimkv.errors import CorruptTraceError, DataError, MissingTraceError, TraceMismatchError, TraceStoreError
from trimkv.trace import LayerTrace, TraceSettings, TraceStore
from trimkv.trace.capture import TracePlan, trace_row
from trimkv.trace.store import MANIFEST, shard_name
from trimkv.trace.targets import Read, received_attention

pytestmark = pytest.mark.usefixtures("one_thread")

G, HKV, T = 2, 2, 24           # tiny models: 4 query heads over 2 KV heads


def eager_attention(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [Hkv, G, T, T] attention weights of an eager forward (transformers' own attention)."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids[None], output_attentions=True)
    return [a[0].reshape(HKV, G, *a.shape[-2:]) for a in out.attentions]


def by_hand(att: torch.Tensor, keep) -> torch.Tensor:
    """[Hkv, T] max over the group's heads and over the queries j > i with keep(j, i)."""
    n = att.shape[-1]
    want = torch.zeros(HKV, n)
    for i in range(n):
        for j in range(i + 1, att.shape[-2]):
            if keep(j, i):
                want[:, i] = torch.maximum(want[:, i], att[:, :, j, i].amax(1))
    return want


def mean_by_hand(att: torch.Tensor) -> torch.Tensor:
    """[Hkv, T] the mean over the group's heads and over every later query j > i (0 for the last token)."""
    n = att.shape[-1]
    want = torch.zeros(HKV, n)
    for i in range(n - 1):
        want[:, i] = att[:, :, i + 1:, i].mean(dim=(1, 2))
    return want


def test_targets_equal_eager_attention(family):
    ids = torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(T, dtype=torch.bool)
    loss_mask[[17, 18, 22]] = True                       # answer tokens: queries 16, 17, 21 produce them
    plan = TracePlan(layers=(0, 1), horizons=(1, 5), later=True, mean=True, answer=True, query_chunk=7)
    got = trace_row(build_tiny_model(family), ids, torch.arange(T), loss_mask, plan)
    att = eager_attention(build_tiny_model(family), ids)
    for layer in (0, 1):
        t = got.targets[layer]
        torch.testing.assert_close(t["future"], by_hand(att[layer], lambda j, i: True), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["future@1"], by_hand(att[layer], lambda j, i: j == i + 1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["future@5"], by_hand(att[layer], lambda j, i: j <= i + 5), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["later@5"], by_hand(att[layer], lambda j, i: j > i + 5), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["answer"], by_hand(att[layer], lambda j, i: j in (16, 17, 21)),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["mean"], mean_by_hand(att[layer]), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.maximum(t["future@5"], t["later@5"]), t["future"])
        assert bool((t["mean"] <= t["future"]).all())
        assert float(t["future"][:, -1].abs().max()) == 0.0     # the last token has no later query
        assert float(t["answer"][:, 21:].abs().max()) == 0.0    # nothing after the last answer query reads it
        assert bool((t["future"] >= t["future@5"]).all()) and bool((t["future@5"] >= t["future@1"]).all())


def test_keys_values_hidden_are_what_the_attention_sees(tiny_model):
    """Keys and values equal a plain DynamicCache's (post-RoPE, what transformers' attention reads); x equals the
    input RMSNorm's output."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (T,), generator=torch.Generator().manual_seed(2))
    norms = {}

    def keep(i):
        def hook(module, args, output):
            norms[i] = output[0]
        return hook

    hooks = [layer.input_layernorm.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    got = trace_row(model, ids, torch.arange(T), torch.zeros(T, dtype=torch.bool),
                    TracePlan(layers=(0, 1), hidden_layers=(1,)))
    for h in hooks:
        h.remove()
    model.trimkv.detach()
    with torch.no_grad():
        cache = model(ids[None], use_cache=True).past_key_values
    for layer in (0, 1):
        torch.testing.assert_close(got.keys[layer], cache.layers[layer].keys[0])
        torch.testing.assert_close(got.values[layer], cache.layers[layer].values[0])
    torch.testing.assert_close(got.hidden[1], norms[1])
    assert 0 not in got.hidden


def test_packed_rows_attend_within_their_document(tiny_model):
    """A row of two documents (positions restart): each document's targets equal those of the document alone."""
    a = torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(4))
    plan = TracePlan(layers=(0, 1), horizons=(3,), mean=True)
    none = torch.zeros(24, dtype=torch.bool)
    packed = trace_row(tiny_model(), torch.cat([a, b]), torch.cat([torch.arange(10), torch.arange(14)]), none, plan)
    alone_a = trace_row(tiny_model(), a, torch.arange(10), none[:10], plan)
    alone_b = trace_row(tiny_model(), b, torch.arange(14), none[:14], plan)
    for layer in (0, 1):
        for name in ("future", "future@3", "mean"):    # a mean counts its own document's readers only
            torch.testing.assert_close(packed.targets[layer][name][:, :10], alone_a.targets[layer][name])
            torch.testing.assert_close(packed.targets[layer][name][:, 10:], alone_b.targets[layer][name])
        torch.testing.assert_close(packed.keys[layer][:, 10:], alone_b.keys[layer])


def test_recon_is_the_attention_of_a_second_reading(tiny_model):
    """recon[i] = max over the repeated copy's queries of the attention key i gets in one forward over
    [row, prompt, row] (the second pass continues the first pass's cache)."""
    ids = torch.randint(3, 128, (16,), generator=torch.Generator().manual_seed(5))
    prompt = torch.tensor([7, 8, 9])
    got = trace_row(tiny_model(), ids, torch.arange(16), torch.zeros(16, dtype=torch.bool),
                    TracePlan(layers=(0, 1)), recon_ids=prompt)
    att = eager_attention(tiny_model(), torch.cat([ids, prompt, ids]))
    for layer in (0, 1):
        want = att[layer][:, :, 19:, :16].amax(dim=(1, 2))                  # queries of the copy, original keys
        torch.testing.assert_close(got.targets[layer]["recon"], want, atol=1e-5, rtol=1e-4)
        assert got.keys[layer].shape == (HKV, 16, 16)                        # the first pass's keys only


def test_received_attention_reads_only_the_chosen_queries():
    """A planted attention pattern: the answer read sees only its queries, however strong the others are."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(4, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    k[:, 3] = q[:, 9].reshape(2, 2, 8).sum(1) * 4          # query 9 looks hard at key 3
    queries = torch.zeros(12, dtype=torch.bool)
    queries[5] = True
    out, got = received_attention(q, k, v, scaling=8 ** -0.5, q_idx=torch.arange(12), chunk=5,
                                  reads={"all": Read(), "five": Read(queries=queries)})
    p = torch.softmax((torch.einsum("hgtd,hsd->hgts", q.reshape(2, 2, 12, 8), k) * 8 ** -0.5)
                      .masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf")), -1)
    torch.testing.assert_close(out, torch.einsum("hgts,hsd->hgtd", p, v).reshape(4, 12, 8))
    torch.testing.assert_close(got["five"][:, :5], p[:, :, 5, :5].amax(1))
    assert float(got["five"][:, 5:].abs().max()) == 0.0
    assert bool((got["all"][:, 3] >= p[:, :, 9, 3].amax(1)).all())
    _, alone = received_attention(q, k, v, scaling=8 ** -0.5, q_idx=torch.arange(12), chunk=5,
                                  reads={"mean": Read(reduce="mean")})              # a mean read on its own
    later = torch.ones(12, 12, dtype=torch.bool).tril(-1)                             # [j, i]: j > i
    want = (p.mean(1) * later).sum(1) / later.sum(0).clamp_min(1)
    torch.testing.assert_close(alone["mean"], want)


# ------------------------------------------------------------------------------------------------ the store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama folder, its tokenizer, and a jsonl of prompt / completion rows (the completion is the answer)."""
    from trimkv.base_model import load_model
    from trimkv.data import DataConfig

    root = tmp_path_factory.mktemp("trace")
    folder = make_model_dir(root / "model")
    rows = [{"prompt": f"the quick brown fox {i} jumps over the lazy dog and the cat sleeps",
             "completion": f" in the warm sun {i}"} for i in range(11)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model(str(folder), dtype="float32")
    cfg = DataConfig(source=str(root / "qa.jsonl"), seq_len=64, pack=False, cache_dir=str(root / "cache"))
    return root, model, tok, cfg


SETTINGS = dict(rows=11, shard_rows=4, targets=("future", "later", "answer", "recon"), horizons=(2, 8),
                hidden_layers=(1,))


def write(setup, out, **kw):
    from trimkv.trace.collect import write_traces

    root, model, tok, cfg = setup
    settings = TraceSettings(**{**SETTINGS, **kw.pop("settings", {})})
    return write_traces(model, tok, cfg, root / out, settings, model_name="tiny", progress=False,
                        say=lambda *_: None, **kw)


def tensors(store: TraceStore) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for entry in store.manifest["shards"]:
        out.update({f"{entry['file']}:{k}": v for k, v in load_file(store.path / entry["file"]).items()})
    return out


def test_store_round_trip(setup):
    store = write(setup, "full")
    root, model, tok, cfg = setup
    assert store.complete and store.num_rows == 11 and store.num_layers == 2 and store.layers == (0, 1)
    assert store.targets == ("future", "future@2", "future@8", "later@2", "later@8", "answer", "recon")
    assert [s["rows"] for s in store.manifest["shards"]] == [[0, 4], [4, 8], [8, 11]]
    lt = store.layer(1)
    assert isinstance(lt, LayerTrace) and lt.keys.shape == (11, HKV, 64, 16) and lt.keys.dtype == torch.float16
    assert lt.hidden.shape == (11, 64, 64) and store.layer(0).hidden is None
    assert lt.target("future").dtype == torch.float32
    # every row again, by hand: the stored targets are the trace of that row (to fp16)
    from trimkv.trace.collect import source_rows

    rows = source_rows(cfg, tok, 11)
    for r in (0, 5, 10):
        row = rows[r]
        L = row["input_ids"].numel()
        direct = trace_row(model, row["input_ids"].long(), row["position_ids"].long(), row["loss_mask"],
                           TracePlan(layers=(0, 1), horizons=(2, 8), later=True, answer=True),
                           recon_ids=torch.tensor(tok(store.manifest["recon_prompt"],
                                                      add_special_tokens=False)["input_ids"]))
        assert bool(lt.valid[r, :L].all()) and not bool(lt.valid[r, L:].any())
        assert lt.pos[r, :L].tolist() == list(range(L))
        for name in store.targets:
            torch.testing.assert_close(lt.utility[name][r, :, :L], direct.targets[1][name].half().float())
            assert float(lt.utility[name][r, :, L:].abs().max()) == 0.0
        answers = row["loss_mask"].nonzero().flatten()
        assert len(answers) > 0 and float(lt.utility["answer"][r, :, answers.max():].abs().max()) == 0.0
        torch.testing.assert_close(lt.keys[r, :, :L], direct.keys[1].half())
    picked = store.layer(0, rows=[9, 2, 5])                    # across shards, in the order asked
    full = store.layer(0)
    torch.testing.assert_close(picked.keys, full.keys[[9, 2, 5]])
    torch.testing.assert_close(picked.utility["recon"], full.utility["recon"][[9, 2, 5]])
    assert torch.equal(store.tokens(rows=slice(4, 6))["input_ids"], store.tokens()["input_ids"][4:6])
    store.verify()


def test_resume_gives_the_same_store(setup, monkeypatch):
    full = write(setup, "uninterrupted")
    part = write(setup, "resumed", max_shards=1)
    assert part.num_rows == 4 and not part.complete
    # killed in the middle of the second shard: nothing of it is kept
    import trimkv.trace.collect as collect

    calls = {"n": 0}
    real = collect.trace_row

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "trace_row", dies)
    with pytest.raises(KeyboardInterrupt):
        write(setup, "resumed")
    monkeypatch.setattr(collect, "trace_row", real)
    assert TraceStore(setup[0] / "resumed").num_rows == 4
    (setup[0] / "resumed" / ".shard-00001.safetensors.tmp999").write_bytes(b"half a shard")   # a killed write
    done = write(setup, "resumed")
    assert done.complete and not list(done.path.glob(".*tmp*"))
    a, b = tensors(full), tensors(done)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    runs = done.manifest["cost"]["runs"]          # the killed call kept no shard, so no cost either
    assert len(runs) == 2 and sum(r["tokens"] for r in runs) == full.manifest["cost"]["tokens"]
    assert write(setup, "resumed").num_rows == 11             # complete: nothing to do


def test_damaged_and_mismatched_stores_are_refused(setup, tmp_path):
    root = setup[0]
    with pytest.raises(MissingTraceError, match="no trace store"):
        TraceStore(tmp_path / "nothing")
    src = write(setup, "good").path
    for name, damage, error, match in [
        ("manifest", lambda d: (d / MANIFEST).write_text("{not json"), CorruptTraceError, "not valid JSON"),
        ("format", lambda d: (d / MANIFEST).write_text(json.dumps({"format": "other"})), CorruptTraceError,
         "not a trimkv trace manifest"),
        ("gone", lambda d: (d / shard_name(1)).unlink(), MissingTraceError, "shard-00001"),
        ("truncated", lambda d: _truncate(d / shard_name(2)), CorruptTraceError, "bytes"),
    ]:
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        with pytest.raises(error, match=match):
            TraceStore(d)
    # a shard of another store (other horizons): the header's shapes / names are refused even at the right size
    other = write(setup, "other", settings={"horizons": (3,), "targets": ("future",)})
    d = tmp_path / "swapped"
    shutil.copytree(src, d)
    shutil.copy(other.path / shard_name(0), d / shard_name(0))
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][0]["bytes"] = (d / shard_name(0)).stat().st_size
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptTraceError, match="lacks .* tensor"):
        TraceStore(d)
    # resume with other settings: refused, and --overwrite replaces it
    with pytest.raises(TraceMismatchError, match="horizons|targets"):
        write(setup, "good", settings={"horizons": (4,)})
    assert write(setup, "good", settings={"horizons": (4,)}, overwrite=True).targets[1] == "future@4"
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TraceStoreError, match="not empty"):
        write(setup, "busy")
    with pytest.raises(DataError, match="rows"):
        write(setup, "toomany", settings={"rows": 500})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_recon_refuses_packed_rows(setup, tmp_path):
    from trimkv.data import DataConfig
    from trimkv.trace.collect import write_traces

    root, model, tok, cfg = setup
    packed = DataConfig(source=cfg.source, seq_len=64, pack=True, cache_dir=cfg.cache_dir)
    with pytest.raises(DataError, match="one document per row"):
        write_traces(model, tok, packed, tmp_path / "p", TraceSettings(rows=4, targets=("recon",)), progress=False,
                     say=lambda *_: None)


# ------------------------------------------------------------------------------------------------ the command


def test_command_line_parses():
    from trimkv.cli import build_parser

    args = build_parser().parse_args(["trace", "--data", "builtin:qa-plain", "--rows", "8", "--layers", "0,3",
                                      "--targets", "future,recon", "--horizons", "16,64", "--hidden", "all",
                                      "--out", "x"])
    assert (args.layers, args.targets, args.horizons, args.hidden, args.rows) == \
        ([0, 3], ["future", "recon"], [16, 64], "all", 8)
    assert build_parser().parse_args(["trace", "--targets", "later,answer", "--out", "x"]).targets == ["later", "answer"]
    assert build_parser().parse_args(["trace", "--out", "x"]).targets is None


def test_command_line_refuses_bad_options(tmp_path):
    assert_fails(run_cli("trace", "--targets", "future,bogus", "--out", tmp_path), 2, "bogus")
    assert_fails(run_cli("trace", "--layers", "-1", "--out", tmp_path), 2, "--layers")
    assert_fails(run_cli("trace", "--data", "builtin:qa-plain"), 2, "--out")
    assert_fails(run_cli("trace", "--out", tmp_path / "s", "--set", "trace.rows=3"), 2, "--set")


def test_command_line_writes_and_continues_a_store(setup, tmp_path):
    root = setup[0]
    args = ["trace", "--model", root / "model", "--data", root / "qa.jsonl", "--seq-len", "64", "--rows", "5",
            "--shard-rows", "2", "--layers", "1", "--targets", "answer", "--horizons", "4", "--out", tmp_path / "s",
            "--quiet"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "about" in res.stdout and "MB" in res.stdout              # the size estimate came first
    store = TraceStore(tmp_path / "s")
    assert store.complete and store.layers == (1,) and store.targets == ("future", "future@4", "answer")
    res = run_cli(*args)                                             # again: complete, nothing rewritten
    assert res.returncode == 0 and "complete" in res.stdout
    assert_fails(run_cli(*args[:-3], "--horizons", "5", "--out", tmp_path / "s"), 4, "other inputs")


def test_fit_trace_command_writes_gates_that_load(setup, tmp_path):
    """`trimkv fit-trace` on a store of the tiny model writes a gate checkpoint trimkv loads onto that model."""
    from trimkv.share import load_gate_checkpoint

    store = write(setup, "forfit", settings={"hidden_layers": (0, 1), "targets": ("future", "answer")})
    res = run_cli("fit-trace", store.path, "--out", tmp_path / "gates", "--gate-hidden", "8", "--steps", "3",
                  "--utility", "answer=1,future@2=0.5", "--budget", "8", "--eval-rows", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= summary["kept"] <= 1 and 0 <= summary["kept_recency"] <= 1
    gates = load_gate_checkpoint(tmp_path / "gates")
    gates.attach(setup[1])
    setup[1].trimkv.detach()
    assert gates.config.train_budget == 8 and gates.config.extra["trace_fit"]["settings"]["utility"]["answer"] == 1
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "gates"), 2, "exists")
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g2", "--utility", "recon"), 4, "recon")
    assert_fails(run_cli("fit-trace", tmp_path / "none", "--out", tmp_path / "g3"), 4, "no trace store")
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g5", "--temperature", "0"), 2, "above 0")
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g5", "--recent-pairs", "nan"), 2, "fraction")
    # --init continues from those gates (their width, not the flag's): a step of lr 1e-12 leaves them as they were
    res = run_cli("fit-trace", store.path, "--out", tmp_path / "again", "--init", tmp_path / "gates", "--steps", "1",
                  "--lr", "1e-12", "--gate-hidden", "64", "--eval-rows", "0", "--quiet")
    assert res.returncode == 0, res.stderr
    again = load_gate_checkpoint(tmp_path / "again")
    assert again.config.gate_hidden == 8
    for a, b in zip(gates.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g4", "--init", tmp_path / "none"), 6,
                 "no gate checkpoint")
    # --steps 0 with --init and --pool-steps: those gates calibrated for the pool (the tiny model's 2 layers are all
    # traced with x), only their per-head biases moved
    res = run_cli("fit-trace", store.path, "--out", tmp_path / "pool", "--init", tmp_path / "gates", "--steps", "0",
                  "--pool-steps", "5", "--pool-utility", "future", "--eval-rows", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "pool" in json.loads(res.stdout.strip().splitlines()[-1])
    pooled = load_gate_checkpoint(tmp_path / "pool")
    assert pooled.config.extra["pool_calibration"]["settings"]["utility"] == {"future": 1.0}
    assert pooled.config.extra["trace_fit"] == gates.config.extra["trace_fit"]          # the fit it started from
    for (name, a), b in zip(gates.state_dict().items(), pooled.state_dict().values()):
        moved = name.endswith(".bias") and not name.endswith("w1.bias")
        assert torch.equal(a, b) != moved, name
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g6", "--pool-steps", "5", "--pool-utility",
                         "recon"), 4, "does not hold")          # refused before the per-layer fit, not after it
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g6", "--steps", "0"), 2, "--init")
    assert_fails(run_cli("fit-trace", store.path, "--out", tmp_path / "g6", "--steps", "0", "--init",
                         tmp_path / "gates"), 2, "nothing to fit")


def test_recipe_trace_section(setup, tmp_path):
    """A recipe's trace: section is validated like every section, and `trimkv trace RECIPE` follows it (the command
    line's options win)."""
    import yaml

    from trimkv.errors import RecipeError
    from trimkv.recipe import parse_recipe, recipe_changes

    root = setup[0]
    raw = {"model": {"name": str(root / "model"), "dtype": "float32"},
           "data": {"source": str(root / "qa.jsonl"), "seq_len": 64, "pack": False,
                    "cache_dir": str(root / "cache")},
           "trace": {"rows": 3, "layers": [1], "targets": ["future", "answer"], "horizons": [4], "shard_rows": 2,
                     "out": str(tmp_path / "from-recipe")}}
    recipe = parse_recipe(raw)
    assert (recipe.trace.layers, recipe.trace.horizons, recipe.trace.rows) == ((1,), (4,), 3)
    assert parse_recipe({"data": raw["data"]}).trace.targets == ("future", "answer")       # optional, defaults
    assert recipe_changes(recipe, parse_recipe({**raw, "trace": {"rows": 5}})) == []        # not a training field
    for bad, match in [({"rows": 0}, "rows"), ({"targets": ["futur"]}, "futur"), ({"layers": ["a"]}, "layers"),
                       ({"horizon": [4]}, "horizons")]:
        with pytest.raises(RecipeError, match=match):
            parse_recipe({**raw, "trace": bad})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run_cli("trace", path, "--set", "trace.horizons=[2,3]", "--rows", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    store = TraceStore(tmp_path / "from-recipe")
    assert store.num_rows == 2 and store.layers == (1,) and store.targets == ("future", "future@2", "future@3",
                                                                              "answer")
    assert store.manifest["recipe_hash"] and store.manifest["model"]["name"] == str(root / "model")

"""The eval harness on a tiny model: every cell written, reruns skip finished cells, same memory for every policy,
a budget that evicts nothing equals the full cache, trimkv needs gates."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import attach_gates
from trimkv.share import save_gates
from trimkv.errors import DataError
from trimkv.eval import harness
from trimkv.eval.harness import markdown_table, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 400   # the tiny tokenizer's vocabulary
KW = dict(tasks=["passkey"], lengths=[256], n_samples=2, sink=2, window=4, prefill_chunk=64, max_new_tokens=3,
          progress=False)


def tiny():
    return build_tiny_model(vocab_size=VOCAB, initializer_range=0.2)


@pytest.fixture
def gates_dir(tmp_path):
    model = tiny()
    handle = attach_gates(model, gate_hidden=8)
    return save_gates(handle.gates, tmp_path / "gates")


def test_writes_every_cell_and_reruns_skip_them(tokenizer, tmp_path, gates_dir, monkeypatch):
    model = tiny()
    policies = ["full", "trimkv", "streaming", "h2o"]
    recs = run_eval(model, tokenizer, budgets=[16, 32], policies=policies, gates=gates_dir, out_dir=tmp_path / "r",
                    **KW)
    assert len(recs) == 1 + 3 * 2
    assert not hasattr(model, "trimkv")                                   # the harness detached what it attached
    out = tmp_path / "r"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == recs
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(recs) * 2
    assert all(0.0 <= r["score"] <= 1.0 and isinstance(r["prediction"], str) for r in rows)
    table = (out / "results.md").read_text()
    assert "| passkey | 256 | h2o |" in table and "M=16" in table and "M=32" in table
    # same memory accounting for every bounded policy; the full cache holds the whole sequence
    by = {(r["policy"], r["budget"]): r for r in recs}
    assert by[("streaming", 16)]["kv_bytes"] == by[("h2o", 16)]["kv_bytes"] == by[("trimkv", 16)]["kv_bytes"]
    assert by[("full", None)]["kv_bytes"] > by[("h2o", 32)]["kv_bytes"] > by[("h2o", 16)]["kv_bytes"]

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(harness, "_run_cell", boom)
    again = run_eval(model, tokenizer, budgets=[16, 32], policies=policies, gates=gates_dir, out_dir=out, **KW)
    assert again == recs
    with pytest.raises(AssertionError, match="recomputed"):              # a changed setting is a new cell
        run_eval(model, tokenizer, budgets=[16], policies=["h2o"], out_dir=out, **{**KW, "window": 5})


def test_runs_into_one_folder_add_up_and_a_rerun_cell_replaces_its_record(tokenizer, tmp_path):
    """A grid that is not a product (the baselines at one budget, the gates at three) is several runs into one
    folder: metrics.json, predictions.jsonl and results.md hold every cell, each once."""
    model, out = tiny(), tmp_path / "r"
    first = run_eval(model, tokenizer, budgets=[16, 32], policies=["full", "streaming"], out_dir=out, **KW)
    second = run_eval(model, tokenizer, budgets=[16], policies=["h2o", "streaming"], out_dir=out, **KW)
    assert len(first) == 3 and len(second) == 2                          # each run returns its own cells
    metrics = json.loads((out / "metrics.json").read_text())
    cells = sorted((r["policy"], r["budget"] or 0) for r in metrics)
    assert cells == [("full", 0), ("h2o", 16), ("streaming", 16), ("streaming", 32)]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(cells)
    table = (out / "results.md").read_text()
    assert "| passkey | 256 | h2o |" in table and "| passkey | 256 | streaming |" in table and "M=32" in table
    (out / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the earlier results"):
        run_eval(model, tokenizer, budgets=[16], policies=["h2o"], out_dir=out, **KW)


def test_two_gate_sets_run_into_one_folder_keep_both_records(tokenizer, tmp_path):
    """The same cell measured with two gate checkpoints is two records (and two sets of predictions) in one folder,
    told apart in results.md; rerunning one replaces only its own. Predictions written before they named their gates
    take them from their cell's record instead of staying behind twice."""
    out = tmp_path / "r"
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        handle = attach_gates(tiny(), gate_hidden=8, bias_init=2.0 + seed)
        dirs.append(save_gates(handle.gates, tmp_path / f"gates{seed}"))
    model = tiny()
    for d in dirs + dirs[:1]:
        run_eval(model, tokenizer, budgets=[16], policies=["trimkv"], gates=d, out_dir=out, **KW)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 2 and len({r["gates"] for r in metrics}) == 2
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["gates"] for r in rows} == {r["gates"] for r in metrics}
    assert (out / "results.md").read_text().count("| passkey | 256 | trimkv [gates ") == 2
    # an older folder: the records of dirs[0] (the last run, so the last record), predictions without their gates
    mine = metrics[-1]
    (out / "predictions.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gates"}) + "\n"
                                                   for r in rows if r["gates"] == mine["gates"]))
    (out / "metrics.json").write_text(json.dumps([mine]))
    for d in (dirs[1], dirs[0]):            # a second set adds up; rerunning the first replaces its old predictions
        run_eval(model, tokenizer, budgets=[16], policies=["trimkv"], gates=d, out_dir=out, **KW)
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["gates"] for r in rows)


def test_budget_that_evicts_nothing_matches_the_full_cache(tokenizer, tmp_path):
    recs = run_eval(tiny(), tokenizer, budgets=[300], policies=["full", "streaming", "tova"], out_dir=tmp_path, **KW)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    preds = {}
    for r in rows:
        preds.setdefault(r["policy"], []).append(r["prediction"])
    assert preds["streaming"] == preds["full"] == preds["tova"]
    assert len(recs) == 3


def test_global_policy_serves_rg10_gates_in_one_pool_at_the_same_memory(tokenizer, tmp_path):
    """trimkv-global: budget x layers x KV heads slots in one GlobalRetentionCache; with a budget that evicts nothing
    it answers like the full cache; the look-ahead is a setting of the gated cells (a new cell key)."""
    model = tiny()
    gates = save_gates(attach_gates(tiny(), gate_type="rg10", gate_hidden=8).gates, tmp_path / "rg10")
    recs = run_eval(model, tokenizer, budgets=[16, 300], policies=["full", "trimkv", "trimkv-global"], gates=gates,
                    out_dir=tmp_path / "r", **KW)
    by = {(r["policy"], r["budget"]): r for r in recs}
    per_head, pooled = by[("trimkv", 16)]["kv_bytes"], by[("trimkv-global", 16)]["kv_bytes"]
    assert pooled == pytest.approx(per_head, rel=0.06)           # same K/V slots; the pool adds 8 bytes of owner
    assert "needle_heads" in by[("trimkv-global", 16)]            # the needle diagnostic reads the pool too
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    preds = {}
    for r in rows:
        preds.setdefault((r["policy"], r["budget"]), []).append(r["prediction"])
    assert preds[("trimkv-global", 300)] == preds[("full", None)]
    ahead = run_eval(model, tokenizer, budgets=[16], policies=["trimkv-global"], gates=gates, out_dir=tmp_path / "r",
                     lookahead=8, **KW)
    assert len(list((tmp_path / "r" / "cells").rglob("*trimkv-global-M16*"))) == 2 and len(ahead) == 1
    with pytest.raises(ValueError, match="lookahead"):
        harness.policy_cache(model, "h2o", 16, sink=2, window=4, lookahead=8)


def test_trimkv_without_gates_explains(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs trained gates"):
        run_eval(tiny(), tokenizer, budgets=[16], policies=["trimkv"], out_dir=tmp_path, **KW)


def test_unknown_names_are_listed(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="valid policies"):
        run_eval(tiny(), tokenizer, budgets=[16], policies=["lru"], out_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match="valid tasks"):
        run_eval(tiny(), tokenizer, budgets=[16], policies=["h2o"], out_dir=tmp_path, **{**KW, "tasks": ["qa"]})


def test_markdown_table_repeats_the_full_cache_under_every_budget():
    recs = [dict(task="passkey", length=2048, policy="full", budget=None, score=1.0),
            dict(task="passkey", length=2048, policy="h2o", budget=32, score=0.25),
            dict(task="passkey", length=2048, policy="h2o", budget=64, score=0.5)]
    table = markdown_table(recs)
    assert "| passkey | 2048 | full | 100.0 | 100.0 |" in table
    assert "| passkey | 2048 | h2o | 25.0 | 50.0 |" in table
    alone = markdown_table(recs[:1])                       # the full cache alone: its own column
    assert "| task | length | policy | full |" in alone and "| passkey | 2048 | full | 100.0 |" in alone


# --------------------------------------------------------------------------------------- pictures


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_and_fidelity_plots(tmp_path):
    from trimkv.eval.plots import plot_accuracy_vs_budget, plot_fidelity

    recs = [dict(task="passkey", length=2048, policy="full", budget=None, score=1.0)]
    recs += [dict(task=t, length=2048, policy=p, budget=b, score=b / 128) for t in ("passkey", "kv_retrieval")
             for p in ("trimkv", "h2o") for b in (32, 64, 128)]
    assert is_png(plot_accuracy_vs_budget(recs, tmp_path / "acc.png"))
    fid = [dict(policy=p, budget=b, kl=1 / b, top1=0.9, ppl_ratio=1.1) for p in ("h2o", "tova") for b in (16, 32)]
    assert is_png(plot_fidelity(fid, tmp_path / "kl.png"))


def test_the_accuracy_plot_draws_head_budgets_as_their_own_line(tmp_path, monkeypatch):
    """A policy run with uniform and with LU-KV budgets is two lines, not one zig-zag through both."""
    from trimkv.eval import plots

    recs = [dict(task="passkey", length=2048, policy="trimkv", budget=b, score=s) for b, s in ((64, 0.15), (128, 0.4))]
    recs += [dict(task="passkey", length=2048, policy="trimkv", budget=b, score=s, head_budgets="lukv")
             for b, s in ((64, 0.45), (128, 0.4))]
    drawn, xs = [], {}
    real_save = plots._save

    def record_lines(fig, path):
        drawn.extend((line.get_label(), list(line.get_ydata())) for ax in fig.axes for line in ax.get_lines())
        xs.update({line.get_label(): list(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()})
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", record_lines)
    assert is_png(plots.plot_accuracy_vs_budget(recs, tmp_path / "acc.png"))
    assert ("trimkv", [15.0, 40.0]) in drawn and ("trimkv (lukv)", [45.0, 40.0]) in drawn
    drawn.clear()                                   # vs allocated memory: the padded LU-KV caches sit further right
    for r, mb in zip(recs, (3, 6, 4.5, 9)):
        r["kv_bytes"] = int(mb * 2**20)
    assert is_png(plots.plot_accuracy_vs_budget(recs, tmp_path / "mem.png", x="memory"))
    assert ("trimkv (lukv)", [45.0, 40.0]) in drawn and xs["trimkv (lukv)"] == [4.5, 9.0]
    with pytest.raises(ValueError, match="'budget' or 'memory'"):
        plots.plot_accuracy_vs_budget(recs, tmp_path / "x.png", x="bytes")


def test_two_gate_sets_are_two_lines_and_two_rows(tmp_path, monkeypatch):
    """Records of two gate checkpoints under one policy name (results folders plotted together) are told apart by the
    gates' fingerprint in the figure, the results table and the fidelity table; one gate set keeps the plain name."""
    from trimkv.eval import plots
    from trimkv.eval.fidelity import fidelity_table

    recs = [dict(task="passkey", length=2048, policy="trimkv", budget=b, score=s, gates=g)
            for g, scores in (("aaaaaa111111", (0.15, 0.4)), ("bbbbbb222222", (0.15, 0.2))) for b, s in
            zip((64, 128), scores)]
    drawn = []
    real_save = plots._save

    def record_lines(fig, path):
        drawn.extend((line.get_label(), list(line.get_ydata())) for ax in fig.axes for line in ax.get_lines())
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", record_lines)
    assert is_png(plots.plot_accuracy_vs_budget(recs, tmp_path / "acc.png"))
    assert ("trimkv [gates aaaaaa]", [15.0, 40.0]) in drawn and ("trimkv [gates bbbbbb]", [15.0, 20.0]) in drawn
    table = markdown_table(recs)
    assert "| trimkv [gates aaaaaa] | 15.0 | 40.0 |" in table and "| trimkv [gates bbbbbb] | 15.0 | 20.0 |" in table
    assert "| trimkv | 15.0 | 40.0 |" in markdown_table(recs[:2])
    fid = [dict(policy="trimkv", budget=64, kl=k, top1=0.8, ppl_ratio=1.2, gates=g)
           for g, k in (("aaaaaa111111", 0.17), ("bbbbbb222222", 0.31))]
    assert "| trimkv [gates bbbbbb] | 64 | 0.3100 |" in fidelity_table(fid)
    drawn.clear()
    assert is_png(plots.plot_fidelity(fid + [dict(fid[0], budget=128, kl=0.08)], tmp_path / "kl.png"))
    assert {label for label, _ in drawn} == {"trimkv [gates aaaaaa]", "trimkv [gates bbbbbb]"}


def test_retention_heatmap_and_kept_tokens(tmp_path):
    from trimkv.eval.plots import kept_positions, plot_kept_tokens, plot_retention_heatmap, retention_by_head

    model = tiny()
    attach_gates(model, gate_hidden=8)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    vals = retention_by_head(model, ids)
    assert vals.shape == (2, 2) and (vals <= 0).all()
    assert is_png(plot_retention_heatmap(vals, tmp_path / "heat.png"))
    kept = kept_positions(model, ids, budget=10, policy="streaming", sink=2, window=3, prefill_chunk=16)
    assert kept.shape == (4, 40) and (kept.sum(1) == 10).all()
    assert kept[:, :2].all() and kept[:, -8:].all() and not kept[:, 2:32].any()       # sinks + most recent
    assert is_png(plot_kept_tokens(kept, tmp_path / "kept.png", num_kv_heads=2, tokens=[str(i) for i in range(40)]))


def test_needle_depths_span_the_requested_range_and_are_part_of_the_cell_key(tokenizer, tmp_path):
    model = tiny()
    kw = dict(KW, n_samples=3)
    run_eval(model, tokenizer, budgets=[16], policies=["full"], out_dir=tmp_path / "r", **kw)
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert [r["depth"] for r in rows] == pytest.approx([0.1, 0.5, 0.9])          # the default: 10% to 90%
    run_eval(model, tokenizer, budgets=[16], policies=["full"], out_dir=tmp_path / "r", depths=(0.0, 1.0), **kw)
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert [r["depth"] for r in rows] == pytest.approx([0.0, 0.5, 1.0])          # a new cell, not the cached one
    assert len(list((tmp_path / "r" / "cells").rglob("*.json"))) == 2
    with pytest.raises(ValueError, match="depths"):
        run_eval(model, tokenizer, budgets=[16], policies=["full"], out_dir=tmp_path / "r", depths=(0.9, 0.1), **kw)


def test_plot_cli_draws_several_results_folders_together(tmp_path, capsys):
    from trimkv.eval.cli import main

    for length in (2048, 4096):
        folder = tmp_path / str(length)
        folder.mkdir()
        recs = [dict(task="passkey", length=length, policy="full", budget=None, score=0.5),
                dict(task="passkey", length=length, policy="trimkv", budget=64, score=0.25)]
        (folder / "metrics.json").write_text(json.dumps(recs))
    assert main(["plot", "accuracy", str(tmp_path / "2048"), str(tmp_path / "4096")]) == 0
    assert is_png(tmp_path / "2048" / "accuracy_vs_budget.png")
    assert main(["plot", "accuracy", str(tmp_path / "2048"), str(tmp_path / "missing")]) == 2   # a usage error
    assert "no metrics.json" in capsys.readouterr().err


def test_plot_cli_draws_only_the_tasks_and_policies_asked_for(tmp_path, monkeypatch, capsys):
    """--tasks / --policies pick records (the full cache stays as the reference); a name the records lack is a usage
    error that lists what they hold."""
    from trimkv.eval import plots
    from trimkv.eval.cli import main

    recs = [dict(task=t, length=2048, policy=p, budget=None if p == "full" else 64, score=0.5)
            for t in ("passkey", "multikey_needle") for p in ("full", "trimkv", "snapkv")]
    (tmp_path / "metrics.json").write_text(json.dumps(recs))
    drawn = []
    monkeypatch.setattr(plots, "plot_accuracy_vs_budget", lambda records, path, x: drawn.append(records) or path)
    assert main(["plot", "accuracy", str(tmp_path), "--tasks", "passkey", "--policies", "trimkv"]) == 0
    assert sorted((r["task"], r["policy"]) for r in drawn[0]) == [("passkey", "full"), ("passkey", "trimkv")]
    assert main(["plot", "accuracy", str(tmp_path), "--policies", "h2o"]) == 2
    assert "--policies h2o: not in these records, which hold full, snapkv, trimkv" in capsys.readouterr().err
    (tmp_path / "fidelity.json").write_text("[]")
    assert main(["plot", "fidelity", str(tmp_path), "--tasks", "passkey"]) == 2    # fidelity records have no task
    assert "--tasks picks among the accuracy records" in capsys.readouterr().err


def test_eval_cli_takes_device_and_dtype_and_its_results_reach_the_pushed_card(tokenizer, tmp_path, monkeypatch,
                                                                               fake_hub, capsys):
    """`trimkv eval --device cpu --dtype auto` loads the model so; its metrics.json, given to `trimkv push --results`,
    becomes the card's model-index (for these gates' results only)."""
    import yaml

    from trimkv.cli import main

    model = tiny()
    gates = save_gates(attach_gates(tiny(), gate_hidden=8, bias_init=3.0).detach(), tmp_path / "gates")
    seen = {}
    monkeypatch.setattr("trimkv.base_model.load_model",
                        lambda name, **kw: seen.update(name=name, **kw) or (model, tokenizer))
    out = tmp_path / "results"
    assert main(["eval", "--model", "tiny", "--device", "cpu", "--dtype", "auto", "--gates", str(gates),
                 "--tasks", "passkey", "--lengths", "256", "--budgets", "16", "--policies", "full,trimkv", "--n", "1",
                 "--sink", "2", "--window", "4", "--max-new-tokens", "2", "--quiet", "--out", str(out)]) == 0
    assert seen == {"name": "tiny", "dtype": "auto", "device": "cpu", "device_map": None}
    recs = json.loads((out / "metrics.json").read_text())
    mine = [r for r in recs if r["policy"] == "trimkv"]
    assert mine and mine[0]["gates"] and [r["gates"] for r in recs if r["policy"] == "full"] == [None]

    assert main(["push", str(gates), "me/g", "--results", str(out)]) == 0
    front = yaml.safe_load(fake_hub.uploads[-1]["card"].split("---\n")[1])
    (result,) = front["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(100 * mine[0]["score"])
    capsys.readouterr()
    assert main(["push", str(gates), "me/g", "--results", str(tmp_path / "nothing")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_plot_kept_runs_one_prompt_of_an_eval_task(tokenizer, tmp_path, monkeypatch, capsys):
    """`trimkv plot kept --task passkey` draws what a cache keeps of one passkey prompt (the README's figure)."""
    from trimkv.cli import main

    gates = save_gates(attach_gates(tiny(), gate_hidden=8, bias_init=3.0).detach(), tmp_path / "gates")
    monkeypatch.setattr("trimkv.base_model.load_model", lambda name, **kw: (tiny(), tokenizer))
    png = tmp_path / "kept.png"
    assert main(["plot", "kept", "--model", "tiny", "--gates", str(gates), "--task", "passkey", "--tokens", "200",
                 "--depth", "0.5", "--budget", "16", "--sink", "2", "--window", "4", "--out", str(png)]) == 0
    assert is_png(png) and "passkey prompt of 200 tokens, answer ['" in capsys.readouterr().out
    assert main(["plot", "kept", "--model", "tiny", "--gates", str(gates), "--task", "passkey", "--text", "x"]) == 2
    assert "--text or --task, not both" in capsys.readouterr().err


def test_demo_takes_device_and_dtype(monkeypatch):
    from trimkv import demo
    from trimkv.cli import main

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["demo", "--device", "cpu", "--dtype", "bfloat16"]) == 0   # (cuda on a CPU machine: refused)
    assert seen["device"] == "cpu" and seen["dtype"] == "bfloat16"
    assert main(["demo"]) == 0 and (seen["device"], seen["dtype"]) == ("auto", "auto")


def test_the_demo_asks_at_every_depth_with_every_method_in_the_same_memory(tokenizer, tmp_path):
    from trimkv.demo import ask_at_depths, demo_methods, rate_table
    from trimkv.serve.budgets import HeadAllocation

    model = tiny()
    attach_gates(model, gate_hidden=8, bias_init=3.0)
    alloc = HeadAllocation("tiny", (2, 2), [0.1], {"trimkv": {"shares": [[0.5, 1.5], [1.25, 0.75]],
                                                              "ratios": [[[0.1] * 2] * 2]}})
    alloc.save(tmp_path / "heads")
    methods = demo_methods(16, tmp_path / "heads", sink=2, window=4)
    assert [m.policy for m in methods] == [None, "trimkv", "trimkv-global", "trimkv", "streaming"]
    assert methods[3].budget == alloc.matched_budget("trimkv", 16, 7) < 16  # the mean budget of the same buffers
    assert demo_methods(16, None)[3].policy == "streaming"                 # no allocation: no LU-KV row
    shown = []
    got = ask_at_depths(model, tokenizer, methods, context=256, depths=(0.2, 0.8), sink=2, window=4,
                        max_new_tokens=3, show=shown.append)
    assert list(got) == [m.name for m in methods] and len(shown) == 2 * len(methods)
    assert all([r["depth"] for r in rows] == [0.2, 0.8] for rows in got.values())
    keys = {rows[0]["answer"] for rows in got.values()} | {rows[1]["answer"] for rows in got.values()}
    assert len(keys) == 2                                                  # each depth its own key, the same for all
    full, uniform, pool, heads, streaming = (rows[0]["kv_bytes"] for rows in got.values())
    assert heads <= uniform == streaming < full                            # LU-KV within the uniform cache's buffers
    assert uniform <= pool <= 1.1 * uniform                                # the pool: the same slots, + slot tables
    table = rate_table(got)
    assert table.count("\n") == 1 + len(methods) and " 20%" in table.splitlines()[0] and "%" in table

"""Batched evaluation gives the one-prompt harness's cells: the same keys, predictions, scores, KV bytes and needle
diagnostic for every policy (per-prompt policies run alone), and a folder filled by one is reused by the other."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from trimkv.attach import attach_gates
from trimkv.eval import batched, harness
from trimkv.eval.batched import batches, run_eval_batched
from trimkv.eval.harness import run_eval
from trimkv.serve import make_cache
from trimkv.share import save_gates

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 400
POLICIES = ["full", "trimkv", "trimkv-global", "streaming", "h2o", "snapkv", "tova", "knorm", "random", "oracle"]
KW = dict(tasks=["passkey"], lengths=[192], n_samples=5, budgets=[16], sink=2, window=4, prefill_chunk=48,
          max_new_tokens=6, progress=False, policies=POLICIES)
PER_SAMPLE = ("prediction", "score", "kv_bytes", "needle_heads", "prompt_tokens", "answers", "depth", "index")


def tiny():
    return build_tiny_model(vocab_size=VOCAB, initializer_range=0.2)


@pytest.fixture(scope="module")
def gates_dir(tmp_path_factory):
    handle = attach_gates(tiny(), gate_hidden=8, bias_init=2.0)
    return save_gates(handle.gates, tmp_path_factory.mktemp("gates") / "gates")


def _predictions(folder):
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return {(r["policy"], r["index"]): {k: r[k] for k in PER_SAMPLE} for r in rows}


def test_batched_cells_equal_one_prompt_cells(tokenizer, tmp_path, gates_dir, monkeypatch):
    sizes = []
    real = batched._generate_batch
    monkeypatch.setattr(batched, "_generate_batch", lambda m, t, group, *a: sizes.append(len(group)) or
                        real(m, t, group, *a))
    one = run_eval(tiny(), tokenizer, gates=gates_dir, out_dir=tmp_path / "one", **KW)
    many = run_eval_batched(tiny(), tokenizer, batch_size=3, gates=gates_dir, out_dir=tmp_path / "many", **KW)
    shared = len(POLICIES) - 2                       # random and oracle are built per prompt
    assert sorted(sizes) == [2] * shared + [3] * shared
    drop = ("seconds", "batch_size")
    assert [{k: v for k, v in r.items() if k not in drop} for r in many] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one]
    assert _predictions(tmp_path / "many") == _predictions(tmp_path / "one")
    assert {r["batch_size"] for r in many} == {3}
    short = [r for r in _predictions(tmp_path / "one").values() if len(r["prediction"]) < 6]
    assert short, "no prompt stopped early at end-of-sequence: rows that stop while the batch goes on went untested"
    # the cells are the same files: a folder filled one prompt at a time is reused, nothing recomputed
    one_cells = sorted(p.name for p in (tmp_path / "one" / "cells").rglob("*.json"))
    assert one_cells == sorted(p.name for p in (tmp_path / "many" / "cells").rglob("*.json"))


def test_a_finished_cell_is_reused_by_the_batched_run(tokenizer, tmp_path, gates_dir, monkeypatch):
    kw = {**KW, "policies": ["full", "streaming"]}
    first = run_eval(tiny(), tokenizer, gates=gates_dir, out_dir=tmp_path / "r", **kw)

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(harness, "_run_cell", boom)
    again = run_eval_batched(tiny(), tokenizer, batch_size=4, gates=gates_dir, out_dir=tmp_path / "r", **kw)
    assert again == first


def test_prompts_run_together_only_with_the_same_length_and_policy():
    model = tiny()
    ids = [torch.zeros(1, n, dtype=torch.long) for n in (8, 8, 9, 8, 8, 8)]
    same = [make_cache(model, "streaming", 16, sink=2, window=4) for _ in ids]
    assert batches(ids, same, 3) == [[0, 1, 3], [2], [4, 5]]
    from trimkv.serve.policies.random_policy import RandomPolicy

    seeded = [make_cache(model, RandomPolicy(seed=i), 16, sink=2, window=4) for i in range(len(ids))]
    assert batches(ids, seeded, 3) == [[i] for i in range(len(ids))]
    full = [make_cache(model, "full") for _ in ids]
    assert batches(ids, full, 8) == [[0, 1, 3, 4, 5], [2]]


def test_batch_size_below_one_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        run_eval_batched(tiny(), tokenizer, batch_size=0, out_dir=tmp_path, **{**KW, "policies": ["full"]})

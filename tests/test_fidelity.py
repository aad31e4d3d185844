"""Long-text fidelity on a tiny model: a budget that evicts nothing is exact (KL 0, top-1 100%, ppl ratio 1),
a small budget drifts, and the metrics themselves are right on hand-made distributions."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_model
from trimkv.eval.fidelity import compare, eval_texts, run_fidelity

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(n_texts=1, prefix_tokens=96, continuation_tokens=24, sink=2, window=4, prefill_chunk=32, progress=False)


def tiny():
    return build_tiny_model(vocab_size=400, initializer_range=0.2)


def test_no_eviction_is_exact_and_small_budget_drifts(tokenizer, tmp_path):
    recs = run_fidelity(tiny(), tokenizer, budgets=[12, 200], policies=["full", "streaming", "h2o"], out_dir=tmp_path,
                        **KW)
    by = {(r["policy"], r["budget"]): r for r in recs}
    assert set(by) == {("streaming", 12), ("streaming", 200), ("h2o", 12), ("h2o", 200)}
    for p in ("streaming", "h2o"):
        assert by[(p, 200)]["kl"] == pytest.approx(0.0, abs=1e-5)
        assert by[(p, 200)]["top1"] == 1.0
        assert by[(p, 200)]["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert by[(p, 12)]["kl"] > 1e-4
    assert json.loads((tmp_path / "fidelity.json").read_text()) == recs
    assert "| h2o | 12 |" in (tmp_path / "fidelity.md").read_text()


def test_chunked_continuation_matches_token_by_token_without_eviction(tokenizer):
    recs = run_fidelity(tiny(), tokenizer, budgets=[200], policies=["tova"], step=8, **KW)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-5) and recs[0]["top1"] == 1.0


def test_compare_on_known_distributions():
    ref = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    test = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    m = compare(ref, test, torch.tensor([0, 0]))
    assert m["kl"] == pytest.approx((0.9 * math.log(9) + 0.1 * math.log(1 / 9)) / 2)
    assert m["top1"] == 0.5
    assert m["nll"] - m["nll_full"] == pytest.approx((math.log(1 / 0.1) - math.log(1 / 0.9)) / 2)


def test_eval_texts_are_sized_and_differ(tokenizer):
    a, b = eval_texts(tokenizer, n_texts=2, n_tokens=64)
    assert a.shape == b.shape == (1, 64)
    assert not torch.equal(a, b)

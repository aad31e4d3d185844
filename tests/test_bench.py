"""Every benchmark runs end to end in --quick mode on a tiny model, prints its table and writes its JSON.
(Numbers come from the benchmarks themselves, never from tests.)"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # bench/ is a top-level folder beside the package, not installed with it
    sys.path.insert(0, ROOT)

BENCHES = {
    "decode": ["--steps", "2", "--methods", "eager", "full"],   # every column: the test below
    "evict": ["--steps", "2"],
    "kvp": ["--steps", "2"],
    "attention": ["--lengths", "48"],
    "train_step": [],
}


@pytest.mark.parametrize("name", list(BENCHES))
def test_benchmark_quick_run_prints_a_table_and_writes_json(name, tmp_path, capsys):
    mod = importlib.import_module(f"bench.{name}")
    out = tmp_path / f"{name}.json"
    result = mod.main(["--quick", "--model", "tiny", "--device", "cpu", "--json", str(out), *BENCHES[name]])
    printed = capsys.readouterr().out
    header = "  ".join(result["rows"][0])  # not aligned, but every column name is printed
    assert all(col in printed for col in header.split()), printed
    assert "---" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == name and data["rows"] and data["env"]["device"] == "cpu"


def test_decode_bounded_kv_bytes_do_not_grow_with_context_and_more_bounded_rows_fit():
    from bench import decode

    result = decode.main(["--quick", "--model", "tiny", "--device", "cpu", "--steps", "1", "--lengths", "64", "256",
                          "--methods", "eager", "full"])
    one = [r for r in result["rows"] if r["batch"] == "1"]
    assert one[0]["bounded_kv_MB"] == one[1]["bounded_kv_MB"]
    assert one[1]["full_kv_MB"] == pytest.approx(4 * one[0]["full_kv_MB"], rel=0.05)
    most = [r for r in result["rows"] if r["batch"] == "max"]
    assert most[0]["rows_eager"] == most[1]["rows_eager"] > most[0]["rows_full"] > most[1]["rows_full"] == 0
    assert most[1]["full_tok_s"] is None and most[1]["compiled_vs_full"] is None   # nothing fits: no column


def test_decode_quick_run_has_every_column_and_no_recompilation():
    from bench import decode

    result = decode.main(["--quick", "--model", "tiny", "--device", "cpu", "--steps", "2", "--check-tokens", "6"])
    for row in result["rows"]:
        assert all(row[f"{m}_tok_s"] > 0 for m in decode.METHODS), row
    assert result["compiled_recompiles_after_warmup"] == 0
    check = result["tokens_vs_eager"]
    assert (check["steps"], check["same_steps"], check["first_difference"]) == (6, 6, None)

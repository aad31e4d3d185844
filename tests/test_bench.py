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
    "decode": ["--steps", "2"],
    "evict": ["--steps", "2"],
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


def test_decode_bounded_kv_bytes_do_not_grow_with_context():
    from bench import decode

    result = decode.main(["--quick", "--model", "tiny", "--device", "cpu", "--steps", "1", "--lengths", "64", "256"])
    rows = result["rows"]
    assert rows[0]["bounded_kv_MB"] == rows[1]["bounded_kv_MB"]
    assert rows[1]["full_kv_MB"] == pytest.approx(4 * rows[0]["full_kv_MB"], rel=0.05)

"""The GPU visit, checked without a GPU: the plan keeps every device command under 64 MiB and names the fix when it
does not, staged parts join back into the model (a bad or missing part is refused), results come back in pieces
small enough for $OUT, and both targets' dry runs pass on this CPU (DRY_RUN=1 make gpu-verify / gpu-train)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder beside the package
    sys.path.insert(0, str(ROOT))

from bench import gpu_plan, gpu_stage, gpu_train, gpu_verify  # noqa: E402

MiB = 2**20


def _sparse(path: Path, nbytes: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(nbytes)


def _staged_repo(tmp_path: Path, part_sizes: list[int], wheels: int = 5 * MiB) -> Path:
    repo = tmp_path / "repo"
    _sparse(repo / ".whl" / "x-1.0-py3-none-any.whl", wheels)
    parts = []
    for k, n in enumerate(part_sizes):
        _sparse(repo / ".gguf_parts" / f"part-{k}", n)
        parts.append({"name": f"part-{k}", "bytes": n, "sha256": "0"})
    gpu_stage.write_manifest({"gguf": "m.gguf", "bytes": sum(part_sizes), "sha256": "0", "parts": parts},
                             repo / ".gguf_parts" / "MANIFEST.json")
    return repo


def test_capacities_hold_the_model_and_keep_every_command_under_the_limit():
    tree, wheels, model = 28 * MiB, 6 * MiB, 98_362_432
    caps = gpu_plan.part_capacities(tree, wheels, gguf_bytes=model)
    assert sum(caps) >= model and len(caps) == 3
    assert tree + wheels + caps[0] <= gpu_stage.LIMIT and all(tree + c <= gpu_stage.LIMIT for c in caps[1:])
    with pytest.raises(gpu_stage.StageError, match="carry less"):
        gpu_plan.part_capacities(62 * MiB, wheels, gguf_bytes=model)


def test_plan_carries_each_part_once_under_the_limit(tmp_path):
    repo = _staged_repo(tmp_path, [29 * MiB, 34 * MiB, 30 * MiB])
    calls = gpu_plan.plan(tree=28 * MiB, repo=repo)
    assert [c.name for c in calls] == ["verify", "stage-1", "train"]
    carried = [p for c in calls for p in c.carry if p.startswith(".gguf_parts/part-")]
    assert carried == [".gguf_parts/part-0", ".gguf_parts/part-1", ".gguf_parts/part-2"]
    assert ".whl" in calls[0].carry and all(gpu_plan.MANIFEST_REL in c.carry for c in calls)
    assert all(c.carried_bytes <= gpu_stage.LIMIT and c.timeout_s <= gpu_plan.COMMAND_LIMIT_S for c in calls)
    assert "make gpu-verify" in calls[0].command and "make gpu-train" in calls[-1].command
    assert gpu_plan.check(calls, repo) == []
    assert gpu_plan.visit_seconds(calls) <= gpu_plan.DEVICE_BUDGET_S


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout (the tree a visit sends)")
def test_this_checkout_leaves_room_for_the_model_in_three_commands(tmp_path):
    """The working tree travels with every command of a visit, so what the repository tracks eats the room the model's
    GGUF needs: past ~30 MiB the visit needs more commands than its 15 minutes hold."""
    tree = gpu_stage.tree_bytes()
    fix = "keep gates that nothing ships out of the tree (Makefile: ARCHIVED, make archived)"
    try:
        calls = gpu_plan.plan(tree=tree, repo=tmp_path)   # nothing staged in tmp_path: parts as staging would cut them
    except gpu_stage.StageError as err:
        pytest.fail(f"{err}: {fix}")
    problems = [p for p in gpu_plan.check(calls, tmp_path) if "not staged yet" not in p]
    assert len(calls) <= 3 and problems == [], (
        f"the working tree is {tree / MiB:.1f} MiB, so a GPU visit takes {len(calls)} commands ({problems}): {fix}")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout (the tree a visit sends)")
def test_the_gates_gpu_train_reads_travel_with_the_tree():
    """The recipe's warm start and the comparison gates must be tracked (an archived folder would not be there), and
    the warm start must have the recipe's gate shape."""
    from trimkv.recipe import load_recipe

    recipe = load_recipe(gpu_train.RECIPE)
    warm = ROOT / recipe.gates.init_from
    for folder in (warm, gpu_train.DEFAULT):
        rel = folder.relative_to(ROOT).as_posix()
        tracked = subprocess.run(["git", "ls-files", rel], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
        assert f"{rel}/model.safetensors" in tracked and f"{rel}/config.json" in tracked, f"{rel} is not tracked"
    config = json.loads((warm / "config.json").read_text())
    assert (config["gate_type"], config["gate_hidden"]) == (recipe.gates.gate_type, recipe.gates.gate_hidden)


def test_plan_names_an_oversized_or_missing_carry_and_the_fix(tmp_path):
    repo = _staged_repo(tmp_path, [29 * MiB, 40 * MiB, 30 * MiB])
    (repo / ".gguf_parts" / "part-2").unlink()
    problems = gpu_plan.check(gpu_plan.plan(tree=28 * MiB, repo=repo), repo)
    assert any("stage-1" in p and "over the 64 MiB" in p and "make gpu-stage" in p for p in problems), problems
    assert any("train" in p and "not staged" in p and "make gpu-stage" in p for p in problems), problems


def test_parts_join_into_the_model_and_bad_parts_are_refused(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(10_000))
    repo, stage = tmp_path / "repo", tmp_path / "stage"
    monkeypatch.setattr(gpu_stage, "WHEEL_DIR", repo / ".whl")
    manifest = gpu_stage.split_gguf([3000, 4000, 4000], source=source, dest=repo / ".gguf_parts")
    assert [p["bytes"] for p in manifest["parts"]] == [3000, 4000, 3000]
    state = gpu_stage.receive(repo, stage)            # all parts carried at once (on the GPU: one per command)
    assert state["missing"] == [] and not state["wheels_installed"]
    out = gpu_stage.assemble(manifest, stage, dest=tmp_path / "home" / "model.gguf")
    assert out.read_bytes() == source.read_bytes()

    (stage / "parts" / "part-1").unlink()             # the machine went back between commands
    with pytest.raises(gpu_stage.StageError, match=r"part-1.*again"):
        gpu_stage.assemble(manifest, stage, dest=tmp_path / "other.gguf")
    (repo / ".gguf_parts" / "part-2").write_bytes(b"x" * 3000)      # a part of another staging
    with pytest.raises(gpu_stage.StageError, match="make gpu-stage"):
        gpu_stage.receive(repo, stage)
    with pytest.raises(gpu_stage.StageError, match="make model"):
        gpu_stage.split_gguf([100], source=tmp_path / "absent.gguf", dest=tmp_path / "p")


def test_bundles_come_back_in_pieces_and_unpack_without_what_was_left_out(tmp_path):
    run = tmp_path / "run"
    (run / "train" / "checkpoints").mkdir(parents=True)
    (run / "train" / "checkpoints" / "big").write_bytes(os.urandom(5000))
    (run / "gates").mkdir()
    (run / "gates" / "model.safetensors").write_bytes(os.urandom(5000))
    (run / "summary.txt").write_text("ok\n")
    pieces = gpu_stage.bundle(run, tmp_path / "out", "train", exclude=("train/checkpoints",), part_bytes=2000)
    assert len(pieces) >= 3 and all(p.stat().st_size <= 2000 for p in pieces)
    [folder] = gpu_stage.unpack(tmp_path / "out", tmp_path / "results")
    assert (folder / "gates" / "model.safetensors").read_bytes() == (run / "gates" / "model.safetensors").read_bytes()
    assert (folder / "summary.txt").read_text() == "ok\n"
    assert not (folder / "train" / "checkpoints").exists()


def test_make_targets_resolve_to_the_visit_script():
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(["make", "-n", "gpu-verify", "gpu-stage-part", "gpu-train"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert [line.split()[:3] for line in out.splitlines() if "gpu_visit.sh" in line] == [
        ["sh", "bench/gpu_visit.sh", "verify"], ["sh", "bench/gpu_visit.sh", "stage"],
        ["sh", "bench/gpu_visit.sh", "train"]]


@pytest.mark.slow
def test_verify_dry_run_runs_parts_tiny_on_this_cpu(tmp_path):
    """The suite part (a subprocess, as on the GPU) and two benchmark parts; the other benchmarks' quick runs are
    tests/test_bench.py's, the DeepSpeed check's code path tests/test_engine.py's."""
    rc = gpu_verify.main(["--dry-run", "--in-process", "--parts", "tests,train_step,evict",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert [r["part"] for r in summary["rows"]] == ["tests", "train_step", "evict"]
    assert rc == 0, summary["rows"]
    assert "2 passed" in summary["rows"][0]["result"] and "tok/s" in summary["rows"][1]["result"]
    assert (tmp_path / "out" / "verify.tar.gz").is_file() and (tmp_path / "out" / "summary.txt").is_file()


def test_a_rerun_of_a_part_clears_what_the_last_run_left(tmp_path):
    """A rerun on a warm machine: an earlier run's JSON is deleted before the part runs, so a part that now fails
    reports its own error, not the earlier numbers."""
    from bench import gpu_parts

    part = gpu_parts.Part("p", "bench.no_such_module", [], ["--json", "{out}/bench_p.json", "--x", "{out}/p-dir"], 1,
                          10, summarize=lambda out: json.loads((out / "bench_p.json").read_text())["line"])
    (tmp_path / "p-dir").mkdir()
    (tmp_path / "p-dir" / "state").write_text("an earlier run")
    (tmp_path / "bench_p.json").write_text(json.dumps({"line": "stale numbers"}))
    row = gpu_parts.run_part(part, tmp_path, dry=True, timeout=10, in_process=True)
    assert not row["ok"] and "stale" not in row["result"] and "no_such_module" in row["result"]
    assert not (tmp_path / "p-dir").exists() and not (tmp_path / "bench_p.json").exists()


@pytest.mark.slow
def test_train_dry_run_trains_evaluates_and_bundles_on_this_cpu(tmp_path):
    argv = ["--dry-run", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert gpu_train.main(argv) == 0
    rc = gpu_train.main(argv)               # again in the same folder, as a rerun on a warm machine would
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert rc == 0, summary["rows"]
    assert [r["part"] for r in summary["rows"]] == ["assemble", "recipe", "data_start", "size", "data", "train", "eval"]
    assert summary["train"]["steps"] >= 3 and summary["eval"]["left"] == []
    [folder] = gpu_stage.unpack(tmp_path / "out", tmp_path / "results")
    assert (folder / "gates" / "model.safetensors").is_file() and (folder / "eval" / "results.md").is_file()
    assert not (folder / "train" / "checkpoints").exists()

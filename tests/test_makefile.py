"""The Makefile's result targets run commands that hold together: every `trimkv eval` line of `make eval`,
`make eval-n40` and `make eval-full` parses, and passes the checks that run before a model loads (the gate, KVP and
allocation folders it names exist and fit its policies), so a results table never points at a command that fails.
The gates those commands read but nothing ships are archived (`make archived` restores them from git history): they
are checked as restored from there, and checked to be out of the working tree."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from trimkv.cli import build_parser
from trimkv.eval.cli import _resolve_eval_args

ROOT = Path(__file__).resolve().parents[1]


def make_commands(target: str) -> list[list[str]]:
    """The `trimkv.cli` argument lists of ``make -n TARGET`` (continued lines joined, a `test -f ... ||` guard and a
    trailing comment dropped)."""
    out = subprocess.run(["make", "-n", "-s", "--no-print-directory", target], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    commands = []
    for line in out.replace("\\\n", " ").splitlines():
        if "-m trimkv.cli" not in line:
            continue
        line = line.split("||")[-1].split(" #", 1)[0]
        argv = shlex.split(line)
        commands.append(argv[argv.index("trimkv.cli") + 1:])
    return commands


def make_variable(name: str) -> str:
    out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", f"print-var: ; @echo $({name})", "print-var"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.strip()


@pytest.fixture(scope="module")
def archived(tmp_path_factory) -> dict[str, str]:
    """``folder -> restored copy``: the archived gate folders as ``make archived`` restores them (``git archive`` of
    ARCHIVE_COMMIT), here into a temporary folder rather than the checkout."""
    commit, folders = make_variable("ARCHIVE_COMMIT"), make_variable("ARCHIVED").split()
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT).returncode != 0:
        pytest.skip(f"the archive commit {commit[:7]} is not in this clone (shallow?): git fetch --unshallow")
    dest = tmp_path_factory.mktemp("archived")
    tar = subprocess.run(["git", "archive", commit, *folders], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return {f: str(dest / f) for f in folders}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_archived_gates_are_out_of_the_tree_and_restore_whole(archived):
    tracked = subprocess.run(["git", "ls-files", "checkpoints"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(archived) == 4
    for folder, copy in archived.items():
        assert not any(t.startswith(folder + "/") for t in tracked), f"{folder} is tracked again"
        assert subprocess.run(["git", "check-ignore", "-q", f"{folder}/config.json"], cwd=ROOT).returncode == 0
        assert {p.name for p in Path(copy).iterdir()} >= {"config.json", "model.safetensors", "README.md"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["eval", "eval-n40", "eval-full"])
def test_every_eval_command_of_a_results_target_passes_the_checks_before_the_model(target, archived):
    commands = [c for c in make_commands(target) if c[0] == "eval"]
    assert commands, f"make -n {target} printed no trimkv eval command"
    for argv in commands:
        argv = [archived.get(a, a) for a in argv]      # an archived folder: its restored copy
        args = build_parser().parse_args(argv)
        _resolve_eval_args(args)                  # raises UsageError / AllocationError / ... naming the problem
        assert args.out and not re.search(r"runs/eval-", args.out), argv     # results go to a named folder


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_trace_fit_target_runs_commands_that_parse():
    """`make trace-fit`: trace store -> fitted gates -> their LU-KV budgets -> the hybrid -> its LU-KV budgets, then
    the upper layers fitted on answer + mean -> their hybrid -> its budgets; each a command line trimkv accepts, each
    reading what the one before it writes."""
    commands = make_commands("trace-fit")
    assert [c[0] for c in commands] == ["trace", "fit-trace", "profile", "splice", "profile",
                                        "fit-trace", "splice", "profile"]
    trace, fit, profile, splice, profile2, fit2, splice2, profile3 = (build_parser().parse_args(c) for c in commands)
    assert "mean" in trace.targets and "answer" in trace.targets
    assert fit.store == trace.out and profile.gates == fit.out and fit.recent_pairs == 0.5
    assert splice.other == fit.out and splice.base == "checkpoints/smollm2-135m-qa-m64"
    assert splice.layers == list(range(15, 30)) and profile2.gates == splice.out
    assert fit2.store == trace.out and fit2.layers == list(range(15, 30))
    assert fit2.utility == {"answer": 1.0, "mean": 1.0} and fit2.recent_pairs == 0.5
    assert splice2.other == fit2.out and splice2.base == splice.base and splice2.layers == splice.layers
    assert profile3.gates == splice2.out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_gpu_image_target_pins_the_image_and_runs_the_source_tree():
    """`make test-gpu-image`: the image's pins replace the lock's (one pin per name), and the suite runs from the
    source tree on PYTHONPATH, as on the GPU (torch 2.11 is below the library's floor: it is not installed)."""
    pins = [line.split("==") for line in (ROOT / "constraints-gpu-image.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all(len(p) == 2 for p in pins) and {"torch", "triton", "transformers"} <= {n for n, _ in pins}
    out = subprocess.run(["make", "-n", "-B", "--no-print-directory", "test-gpu-image", "GPU_IMAGE_PYTHON=python3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    merge = next(line for line in out.replace("\\\n", " ").splitlines() if line.startswith("grep -v -i -E"))
    merged = subprocess.run(["sh", "-c", merge.replace("> .venv-gpu-image/constraints.txt", "")], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    names = [line.split("==")[0].lower() for line in merged if "==" in line]
    assert len(names) == len(set(names)) and "torch==2.11.0" in merged
    assert {f"{n}=={v}" for n, v in pins} <= set(merged)
    assert out.rstrip().splitlines()[-1].startswith(f"PYTHONPATH={ROOT} .venv-gpu-image/bin/python -m pytest")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_archived_names_the_fix_when_the_commit_is_missing(tmp_path):
    target = str(tmp_path / "gates")
    run = subprocess.run(["make", "-s", "--no-print-directory", f"ARCHIVED={target}", "ARCHIVE_COMMIT=" + "0" * 40,
                          target], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "git fetch --unshallow" in run.stderr and not (tmp_path / "gates").exists()

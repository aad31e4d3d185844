"""Training checkpoints: exact resume, atomic saves that survive a crash, fallback past a corrupt newest
checkpoint, and only trainable state on disk. Tiny 2-layer Llama on CPU, single process."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tinyrun import make_data, make_model_dir, read_metrics, recipe_dict
from trimkv.train import state as resume_mod
from trimkv.train.run import EpochStream, finetune
from trimkv.recipe import parse_recipe
from trimkv.train.state import STATE_FILE, ResumeError, TrainingCheckpoints, rng_state, set_rng_state, verify

# 3 short documents -> 8 packed rows of 32 tokens: 6 steps x 2 micro-batches cross an epoch boundary.
STEPS, ACCUM = 6, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return make_model_dir(base / "model"), make_data(base / "docs.jsonl", n_docs=3), base


def recipe(setup, name: str, **train):
    model_dir, data, base = setup
    train = {"steps": STEPS, "grad_accum": ACCUM, "save_every": 2, "keep_last": 3, **train}
    return parse_recipe(recipe_dict(model_dir, data, base / name, **train))


def gates_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(setup):
    """An uninterrupted run (the reference); checkpoints at steps 2, 4, 6."""
    r = recipe(setup, "full")
    return finetune(r, progress=False), Path(r.output.run_dir)


def test_interrupted_run_resumes_bit_identical(setup, full_run):
    full_gates, full_dir = full_run
    r = recipe(setup, "cut")
    finetune(r, progress=False, until_step=3)                 # "preempted" after step 3; last checkpoint: step 2
    assert [s for s, _ in TrainingCheckpoints(Path(r.output.run_dir) / "checkpoints").steps()] == [2]
    out = finetune(r, progress=False, resume=True)            # redoes step 3, then 4..6
    a, b = gates_of(full_gates), gates_of(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log reads like one run: steps 1..6 once each, same losses
    ref, got = read_metrics(full_dir), read_metrics(Path(r.output.run_dir))
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]


def test_checkpoints_hold_only_trainable_state(setup, full_run):
    _, run_dir = full_run
    ckpts = TrainingCheckpoints(run_dir / "checkpoints")
    assert [s for s, _ in ckpts.steps()] == [2, 4, 6]
    folder = ckpts.steps()[-1][1]
    gates = load_file(str(folder / "gates.safetensors"))
    n_gate = sum(t.numel() for t in gates.values())
    assert all(k.startswith("layers.") for k in gates)       # gate keys only, no base-model names
    state = torch.load(folder / STATE_FILE, weights_only=True)
    opt = state["engine"]["optimizer"]["state"]
    n_opt = sum(t.numel() for s in opt.values() for k, t in s.items() if k != "step")
    assert n_opt == 2 * n_gate                                # AdamW exp_avg + exp_avg_sq of the gates only
    model_dir = setup[0]
    base_bytes = (model_dir / "model.safetensors").stat().st_size
    ckpt_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)


def test_resume_without_checkpoint_starts_fresh_and_fresh_run_refuses_old_checkpoints(setup, full_run):
    r = recipe(setup, "full")
    with pytest.raises(ResumeError, match="--resume"):
        finetune(r, progress=False)
    r2 = recipe(setup, "fresh", steps=2, save_every=0)
    finetune(r2, progress=False, resume=True)                 # nothing to resume: runs from step 0
    assert [m["step"] for m in read_metrics(Path(r2.output.run_dir))] == [1, 2]


def copy_run(full_run, tmp_path) -> TrainingCheckpoints:
    _, run_dir = full_run
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    return TrainingCheckpoints(tmp_path / "checkpoints", keep_last=3)


@pytest.mark.parametrize("victim", ["gates.safetensors", STATE_FILE])
def test_truncated_newest_falls_back_to_previous(full_run, tmp_path, victim):
    ckpts = copy_run(full_run, tmp_path)
    newest = ckpts.steps()[-1][1]
    data = (newest / victim).read_bytes()
    (newest / victim).write_bytes(data[: len(data) // 2])    # a crash / full disk cut the file
    with pytest.raises(ResumeError, match="truncated"):
        verify(newest)
    with pytest.warns(UserWarning, match="step-6"):
        assert ckpts.newest_valid().name == "step-4"


def test_all_corrupt_is_an_error_not_a_fresh_start(full_run, tmp_path):
    ckpts = copy_run(full_run, tmp_path)
    for _, path in ckpts.steps():
        (path / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(ResumeError, match="no valid training checkpoint"):
        ckpts.load_latest(engine=None)


class FakeEngine:
    """The part of an engine a checkpoint save uses."""

    name = "plain"

    def __init__(self, value: float):
        self.w = torch.full((4, 4), value)

    def state_dict(self):
        return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}

    def save_extra(self, folder):
        pass

    def trainable_state(self):
        return {"layers.0.w1.weight": self.w.clone()}, {}     # gates, no LoRA adapters


def test_failure_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpts = TrainingCheckpoints(tmp_path / "checkpoints", keep_last=2)
    ckpts.save(FakeEngine(1.0), 1, {"epoch": 0, "index": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(resume_mod, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpts.save(FakeEngine(2.0), 2, {"epoch": 0, "index": 2})
    assert [s for s, _ in ckpts.steps()] == [1]
    assert not list(ckpts.folder.glob(".step-*"))             # the partial folder is cleaned up
    assert verify(ckpts.newest_valid())["step"] == 1


def test_sigkill_mid_save_leaves_a_usable_previous_checkpoint(tmp_path):
    """A real SIGKILL while step-2's state.pt is half written; the next save cleans up the debris."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_resume import FakeEngine
        from trimkv.train.state import TrainingCheckpoints
        ckpts = TrainingCheckpoints({str(tmp_path / "checkpoints")!r}, keep_last=2)
        ckpts.save(FakeEngine(1.0), 1, {{"epoch": 0, "index": 1}})
        def killed(obj, path):
            open(path, "wb").write(b"PK half a zip file")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
        ckpts.save(FakeEngine(2.0), 2, {{"epoch": 0, "index": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    ckpts = TrainingCheckpoints(tmp_path / "checkpoints", keep_last=2)
    assert [s for s, _ in ckpts.steps()] == [1]               # step-2 never became visible
    assert (ckpts.folder / ".step-2.partial").is_dir()        # debris of the killed save
    assert verify(ckpts.newest_valid())["step"] == 1
    ckpts.save(FakeEngine(3.0), 3, {"epoch": 0, "index": 3})
    assert [s for s, _ in ckpts.steps()] == [1, 3] and not list(ckpts.folder.glob(".step-*"))


def test_keep_last_prunes_oldest(tmp_path):
    ckpts = TrainingCheckpoints(tmp_path / "c", keep_last=2)
    for step in (1, 2, 3, 10):
        ckpts.save(FakeEngine(float(step)), step, {})
    assert [s for s, _ in ckpts.steps()] == [3, 10]           # numeric order, not string order


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    np = pytest.importorskip("numpy")
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(3), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), torch.rand(3), np.random.rand())
    assert expected[0] == got[0] and torch.equal(expected[1], got[1]) and expected[2] == got[2]


def test_epoch_stream_position_continues_exactly(setup):
    from transformers import AutoTokenizer

    model_dir, data, base = setup
    cfg = recipe(setup, "stream").data
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = EpochStream(cfg, tok)
    seq = [next(ref)["input_ids"] for _ in range(15)]         # crosses epoch boundaries
    part = EpochStream(cfg, tok)
    for _ in range(8):
        next(part)
    resumed = EpochStream(cfg, tok, position=part.state_dict())
    assert all(torch.equal(next(resumed)["input_ids"], x) for x in seq[8:])
    assert resumed.epoch > 0
    # two ranks that consumed 2 batches each == one rank that consumed 4
    two = {"epoch": 0, "index": 2, "world_size": 2}
    assert EpochStream(cfg, tok, position=two).index == 4


def test_cli_has_resume_flag():
    from trimkv.cli import build_parser

    args = build_parser().parse_args(["train", "r.yaml", "--resume"])
    assert args.resume is True
    assert build_parser().parse_args(["train", "r.yaml"]).resume is False


def test_init_from_starts_at_the_checkpoints_gates(setup, full_run, tmp_path):
    """gates.init_from: step 0 of a warm start is the checkpoint's gates (a 0-step run exports them unchanged);
    a checkpoint of another width is refused with the fields to change."""
    from trimkv.train.run import initial_gates
    from trimkv.base_model import load_model
    from trimkv.recipe import RecipeError

    full_gates, _ = full_run
    model_dir, data, base = setup
    raw = recipe_dict(model_dir, data, tmp_path / "warm")
    raw["gates"]["init_from"] = str(full_gates)
    model, _ = load_model(str(model_dir))
    warm = initial_gates(model, parse_recipe(raw))
    want = gates_of(full_gates)
    got = warm.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    fresh = initial_gates(model, parse_recipe(recipe_dict(model_dir, data, tmp_path / "fresh"))).state_dict()
    assert not torch.equal(fresh["layers.0.w1.weight"], want["layers.0.w1.weight"])   # trained != fresh init
    raw["gates"]["gate_hidden"] = 32
    with pytest.raises(RecipeError, match="gate_hidden"):
        initial_gates(model, parse_recipe(raw))

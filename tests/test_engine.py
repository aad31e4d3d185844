"""Engines: two-process DDP (gloo) and single-process DeepSpeed ZeRO-2 on CPU give the plain engine's losses
and gates; engine selection and DeepSpeed configs fail with errors that say what to do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from _tinyrun import ddp_worker, free_port, make_data, make_model_dir, read_metrics, recipe_dict
from trimkv.train.distributed import print0
from trimkv.train.engines import deepspeed_config, resolve_engine
from trimkv.train.run import finetune
from trimkv.recipe import parse_recipe
from trimkv.train.state import TrainingCheckpoints

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
# fp32 on CPU. DDP averages two ranks' gradients in a different order than one process summing four
# micro-batches, so gates differ by float rounding (measured max |diff| ~ 1e-8); losses agree to ~1e-7.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GATE_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    """The DeepSpeed tests keep their one-process gloo group alive (see init_distributed); end it here."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("engine")
    return make_model_dir(base / "model"), make_data(base / "docs.jsonl", n_docs=6), base


def run_recipe(setup, name, **train) -> dict:
    model_dir, data, base = setup
    return recipe_dict(model_dir, data, base / name, **{"steps": 3, **train})


@pytest.fixture(scope="module")
def plain_run(setup):
    """Plain engine, 4 micro-batches per step: the reference for both distributed engines."""
    raw = run_recipe(setup, "plain", grad_accum=4)
    finetune(parse_recipe(raw), progress=False)
    return Path(raw["output"]["run_dir"])


def assert_same_run(ref: Path, got: Path) -> None:
    a, b = read_metrics(ref), read_metrics(got)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in b]), torch.tensor([m["loss"] for m in a]), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor([m["cap"] for m in b]), torch.tensor([m["cap"] for m in a]), **LOSS_TOL)
    ga, gb = load_file(str(ref / "gates/model.safetensors")), load_file(str(got / "gates/model.safetensors"))
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], **GATE_TOL)


def test_ddp_two_processes_match_plain(setup, plain_run):
    """2 ranks x 2 micro-batches see the same 4 batches per step as 1 process x 4 (data sharded by rank)."""
    raw = run_recipe(setup, "ddp", grad_accum=2, save_every=3)
    mp.spawn(ddp_worker, args=(2, free_port(), raw), nprocs=2, join=True)
    run_dir = Path(raw["output"]["run_dir"])
    assert_same_run(plain_run, run_dir)
    manifest = json.loads((TrainingCheckpoints(run_dir / "checkpoints").steps()[-1][1] / "manifest.json").read_text())
    assert manifest["engine"] == "ddp" and manifest["world_size"] == 2


@pytest.fixture
def no_deepspeed_jit(monkeypatch):
    """DeepSpeed JIT-compiles a shared-memory CPU all-reduce on first use (~2 min on 2 cores). One process never
    uses it; tell DeepSpeed the op is unavailable so the test starts in seconds."""
    deepspeed = pytest.importorskip("deepspeed")
    import deepspeed.ops

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    return deepspeed


def test_deepspeed_zero2_single_process_matches_plain(setup, plain_run, no_deepspeed_jit):
    raw = run_recipe(setup, "ds", grad_accum=4, engine="deepspeed", zero_stage=2, save_every=3)
    finetune(parse_recipe(raw), progress=False)
    run_dir = Path(raw["output"]["run_dir"])
    assert_same_run(plain_run, run_dir)
    folder = TrainingCheckpoints(run_dir / "checkpoints").steps()[-1][1]
    assert (folder / "deepspeed").is_dir()                   # DeepSpeed's own optimiser partition files
    n_gate = sum(t.numel() for t in load_file(str(folder / "gates.safetensors")).values())
    model_states = torch.load(next((folder / "deepspeed").glob("mp_rank_*_model_states.pt")), weights_only=False)
    n_module = sum(t.numel() for t in model_states["module"].values())
    assert n_module == n_gate                                # exclude_frozen_parameters: no base weights


def test_deepspeed_resume_continues_exactly(setup, plain_run, no_deepspeed_jit):
    raw = run_recipe(setup, "ds-cut", grad_accum=4, engine="deepspeed", save_every=1)
    finetune(parse_recipe(raw), progress=False, until_step=2)
    finetune(parse_recipe(raw), progress=False, resume=True)
    assert_same_run(plain_run, Path(raw["output"]["run_dir"]))


# ------------------------------------------------------------------------------------------ selection


def test_auto_engine_follows_the_launcher():
    assert resolve_engine("auto", 1) == "plain"
    assert resolve_engine("auto", 4) == "ddp"
    assert resolve_engine("deepspeed", 1) == "deepspeed"
    with pytest.raises(ValueError, match="WORLD_SIZE = 2"):
        resolve_engine("plain", 2)


def test_ddp_without_a_process_group_says_how_to_launch(setup, monkeypatch):
    from trimkv.train import engines as engine
    from trimkv.train.engines import DDPEngine

    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)

    model = torch.nn.Linear(2, 2)

    class Handle:
        gates = model
        adapter_params: list = []

        def trainable_parameters(self):
            return list(model.parameters())

    recipe = parse_recipe(run_recipe(setup, "x"))
    with pytest.raises(RuntimeError, match="torchrun"):
        DDPEngine(model, Handle(), recipe)


def test_print0_prints_in_a_single_process(capsys):
    print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"


# ------------------------------------------------------------------------------------ DeepSpeed configs


def recipe_with(setup, **train):
    return parse_recipe(run_recipe(setup, "cfg", engine="deepspeed", **train))


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
def test_launch_json_configs_are_concrete_and_take_batch_values_from_the_recipe(setup, name):
    text = (LAUNCH / name).read_text()
    assert '"auto"' not in text
    r = recipe_with(setup, ds_config=str(LAUNCH / name), grad_accum=8, grad_clip=0.5)
    cfg = deepspeed_config(r, world_size=4)
    assert cfg["gradient_accumulation_steps"] == 8 and cfg["gradient_clipping"] == 0.5
    assert cfg["train_batch_size"] == 1 * 8 * 4
    assert cfg["zero_optimization"]["stage"] == (2 if "zero2" in name else 3)
    assert not cfg["bf16"]["enabled"] and cfg["zero_allow_untested_optimizer"]


def test_deepspeed_config_from_zero_stage(setup):
    cfg = deepspeed_config(recipe_with(setup, zero_stage=3), world_size=1)
    assert cfg["zero_optimization"] == {"stage": 3}


@pytest.mark.parametrize("bad, match", [({"bf16": {"enabled": True}}, "train.bf16"),
                                        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer'")])
def test_deepspeed_config_rejects_what_the_recipe_owns(setup, tmp_path, bad, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **bad}))
    with pytest.raises(ValueError, match=match):
        deepspeed_config(recipe_with(setup, ds_config=str(path)), world_size=1)


def test_missing_ds_config_is_named(setup):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        deepspeed_config(recipe_with(setup, ds_config="nope.json"), world_size=1)

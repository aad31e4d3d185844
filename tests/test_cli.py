"""The ``trimkv`` command line as a new user meets it: fast help with defaults and choices, ``--version``,
``python -m trimkv``, every argument checked before a model loads, defaults that do what was asked (``eval --gates``
scores them, ``generate --gates`` uses their budget, ``eval`` writes to a new folder and says its cost), training
that never overwrites what another run wrote, and quiet libraries. The error boundary itself (exit codes, one line,
``--debug``) is tested here by unit and in ``test_bad_inputs.py`` section 8 by subprocess."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from _cli import REPO, assert_fails, run_cli
from _tinyrun import make_data, make_model_dir, recipe_dict
from conftest import build_tiny_model
from trimkv import attach_gates, command, save_gates
from trimkv.cli import build_parser, main
from trimkv.errors import (CacheError, CheckpointNotFoundError, DataError, GateCheckpointError, NonFiniteError,
                           RecipeError, ResumeError, TrimKVError, UsageError)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the command had to stop before it."""
    monkeypatch.setattr("trimkv.base_model.load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def gates_dir(tmp_path):
    model = build_tiny_model()
    handle = attach_gates(model, gate_hidden=8, bias_init=3.0)
    handle.gates.config.train_budget = 24
    return save_gates(handle.detach(), tmp_path / "gates")


def prompts(tmp_path, rows=({"context": "the quick brown fox", "question": "who?"},)):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ help and version
def test_building_the_parser_and_every_help_import_no_torch():
    code = ("import sys, time; t = time.perf_counter(); import trimkv.cli as c; p = c.build_parser(); p.format_help(); "
            "[a.format_help() for a in p._subparsers._group_actions[0].choices.values()]; "   # lists policies, tasks
            "print(time.perf_counter() - t, *[m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert out[1:] == [] and float(out[0]) < 1.0           # seconds, without the interpreter's own start


def test_version_help_and_python_dash_m():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"trimkv {__import__('trimkv').__version__}"
    res = run_cli("--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("train", "generate", "eval", "--debug"))
    res = run_cli()                                            # no command: a usage error, one line
    assert_fails(res, 2, "required")


def test_help_shows_defaults_and_choices():
    sub = build_parser()._subparsers._group_actions[0].choices
    gen, ev, train = (" ".join(sub[c].format_help().split()) for c in ("generate", "eval", "train"))   # unwrapped
    assert "(default: 64)" in gen and "choices: trimkv, streaming" in gen
    assert "default: passkey" in ev and "kv_retrieval" in ev and "default: 64,128" in ev
    assert "--overwrite" in train and "--debug" in train


def test_debug_may_come_before_or_after_the_command():
    p = build_parser()
    assert p.parse_args(["--debug", "demo"]).debug and p.parse_args(["demo", "--debug"]).debug
    assert not p.parse_args(["demo"]).debug


# ----------------------------------------------------------------------------- the boundary, by unit
@pytest.mark.parametrize("err, code", [
    (UsageError("x"), 2), (RecipeError("x"), 3), (DataError("x"), 4), (CheckpointNotFoundError("x"), 6),
    (GateCheckpointError("x"), 6), (CacheError("x"), 7), (NonFiniteError("x"), 8), (ResumeError("x"), 9),
    (TrimKVError("x"), 1), (OSError(28, "No space left on device", "/data/run/metrics.jsonl"), 10),
    (KeyboardInterrupt(), 130), (ZeroDivisionError("x"), 70),
])
def test_each_error_class_has_its_exit_code(err, code):
    got, text = command.explain(err, "train")
    assert got == code and 1 <= len(text.splitlines()) <= 2


def test_an_os_error_names_the_path_and_the_fix():
    _, text = command.explain(OSError(28, "No space left on device", "/data/run/metrics.jsonl"))
    assert "/data/run/metrics.jsonl" in text and "disk is full" in text


@pytest.mark.parametrize("module", ["httpx", "httpx2", "requests.exceptions"])   # httpx2: huggingface_hub 2's client
def test_a_network_error_is_not_called_a_bug(module):
    error = type("ConnectError", (Exception,), {"__module__": module})
    code, text = command.explain(error("[Errno -2] Name or service not known"))
    assert code == 10 and "connection" in text and "bug" not in text


def test_main_returns_the_code_and_prints_one_line(monkeypatch, capsys):
    import trimkv.train.run as run_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "finetune", interrupted)
    monkeypatch.setattr("trimkv.recipe.load_recipe", lambda *a, **k: type("R", (), {"train": type("T", (), {
        "engine": "plain"})()})())
    assert main(["train", "r.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("trimkv train: interrupted") and "--resume" in err and len(err.splitlines()) == 1
    with pytest.raises(KeyboardInterrupt):
        main(["train", "r.yaml", "--debug"])               # --debug: the exception itself, traceback and all


# ------------------------------------------------------------------ every argument checked before the model
@pytest.mark.parametrize("argv, code, named", [
    (["generate", "{p}", "--policy", "snapkvv", "--budget", "64"], 2, "snapkvv"),
    (["generate", "{p}", "--budget", "64"], 2, "needs --gates"),
    (["generate", "{p}", "--policy", "snapkv"], 2, "give --budget"),
    (["generate", "{p}", "--policy", "snapkv", "--budget", "16"], 2, "leaves no room"),
    (["generate", "{p}", "--policy", "trimkv", "--budget", "64"], 2, "reads trained gates"),
    (["generate", "{missing}"], 4, "does not exist"),
    (["generate", "{p}", "--gates", "{missing}"], 6, "no gate checkpoint"),
    (["generate", "{p}", "--out", "{tmp}"], 2, "is a folder"),
    (["eval", "--policies", "full,trimkv"], 2, "read trained gates"),
    (["eval", "--gates", "{gates}", "--policies", "full,h2o"], 2, "add trimkv"),
    (["eval", "--depths", "0.9,0.1"], 2, "0 <= LO <= HI <= 1"),
    (["eval", "--budgets", "0"], 2, "below 1"),
    (["eval", "--tasks", "passkee"], 2, "passkee"),
    (["plot", "kept", "--policy", "trimkv"], 2, "needs --gates"),
    (["generate", "{p}", "--device", "gpu"], 2, "is not a device"),
])
def test_arguments_are_checked_before_the_model_loads(argv, code, named, tmp_path, gates_dir, no_model, capsys):
    values = {"p": prompts(tmp_path), "missing": tmp_path / "missing.jsonl", "tmp": tmp_path, "gates": gates_dir}
    argv = [a.format(**values) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit_:                             # argparse's own checks exit 2 with their message
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code and named in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_a_gpu_is_refused_before_the_model_loads(tmp_path, no_model, capsys):
    assert main(["generate", str(prompts(tmp_path)), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["demo", "--device", "cuda:1"]) == 2


def test_recipe_problems_stop_train_before_the_model_loads(tmp_path, no_model, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  source: builtin:qa\n  seq_len: 1024\n  pack: false\n")
    assert main(["train", str(recipe), "--set", "data.seq_len=256"]) == 3      # a recipe field: too short for QA
    assert "seq_len=256 is too short for builtin:qa" in capsys.readouterr().err
    assert main(["train", str(recipe), "--set", "train.stepz=3"]) == 3
    assert "did you mean 'steps'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- defaults that do what was asked
def test_generate_with_gates_uses_their_training_budget(tmp_path, gates_dir, monkeypatch, capsys, tokenizer):
    seen = {}
    model = build_tiny_model(vocab_size=len(tokenizer))
    monkeypatch.setattr("trimkv.base_model.load_model", lambda *a, **k: (model, tokenizer))
    answered = type("Answers", (), dict(answers=["x"], context_tokens=4, kv_bytes=1, seconds=0.0))
    monkeypatch.setattr("trimkv.serve.answer", lambda *a, **k: seen.update(k) or answered)
    assert main(["generate", str(prompts(tmp_path)), "--model", "tiny", "--gates", str(gates_dir)]) == 0
    assert (seen["budget"], seen["policy"]) == (24, "trimkv")
    assert "--budget 24 (the budget --gates" in capsys.readouterr().err


@pytest.fixture
def fake_eval(monkeypatch, tmp_path):
    """``trimkv eval`` with the model load and the harness replaced: what would it run, and where?"""
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("trimkv.eval.cli.load_for_gates", lambda args: (build_tiny_model(), None))
    monkeypatch.setattr("trimkv.eval.harness.run_eval", lambda model, tok, **kw: seen.update(kw) or [])
    monkeypatch.setattr("trimkv.eval.harness.markdown_table", lambda recs: "")
    return seen


def test_eval_with_gates_scores_them_and_writes_to_a_new_run_folder(fake_eval, gates_dir, tmp_path, capsys):
    assert main(["eval", "--gates", str(gates_dir)]) == 0
    assert fake_eval["policies"][:2] == ["full", "trimkv"] and fake_eval["gates"] == str(gates_dir)
    out = fake_eval["out_dir"]
    assert out.startswith(os.path.join("runs", "eval-")) and not (tmp_path / "results").exists()
    err = capsys.readouterr().err
    assert "cells" in err and "prompts" in err and out in err      # the cost, said before the model loads


def test_a_bare_eval_is_small_and_says_so(fake_eval, capsys):
    assert main(["eval"]) == 0
    assert (fake_eval["n_samples"], fake_eval["budgets"], fake_eval["tasks"]) == (10, [64, 128], ["passkey"])
    assert fake_eval["policies"] == ["full", "streaming", "h2o"]
    err = capsys.readouterr().err
    assert "5 cells" in err and "50 prompts" in err and "smoke test" in err


# ----------------------------------------------------------------------------------------- never lose work
@pytest.fixture
def tiny_run(tmp_path):
    model, data = make_model_dir(tmp_path / "model"), make_data(tmp_path / "docs.jsonl")
    return lambda name, **train: recipe_dict(model, data, tmp_path / name, steps=2, **train)


def test_training_never_replaces_gates_it_did_not_write(tiny_run, tmp_path):
    from trimkv.recipe import parse_recipe
    from trimkv.train.run import finetune

    shipped = tmp_path / "shipped"
    first = tiny_run("a")
    first["output"]["checkpoint"] = str(shipped)
    assert finetune(parse_recipe(first), progress=False) == shipped
    before = (shipped / "model.safetensors").read_bytes()
    second = tiny_run("b", seed=1)
    second["output"]["checkpoint"] = str(shipped)
    out = finetune(parse_recipe(second), progress=False)
    assert out == tmp_path / "shipped-2" and (shipped / "model.safetensors").read_bytes() == before
    third = tiny_run("c", seed=2)
    third["output"]["checkpoint"] = str(shipped)
    assert finetune(parse_recipe(third), progress=False, overwrite=True) == shipped      # told to
    assert (shipped / "model.safetensors").read_bytes() != before
    with_umask = stat.S_IMODE(os.stat(shipped).st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert with_umask == 0o777 & ~mask                      # a normal folder, not mkdtemp's 0700


def test_a_resumed_run_keeps_exporting_to_the_folder_it_chose(tiny_run, tmp_path):
    from trimkv.recipe import parse_recipe
    from trimkv.train.run import finetune

    shipped = tmp_path / "shipped"
    save_gates(attach_gates(build_tiny_model(), gate_hidden=8).detach(), shipped)
    raw = tiny_run("r", save_every=1)
    raw["output"]["checkpoint"] = str(shipped)
    assert finetune(parse_recipe(raw), progress=False, until_step=1) == tmp_path / "shipped-2"
    assert finetune(parse_recipe(raw), progress=False, resume=True) == tmp_path / "shipped-2"
    assert not (tmp_path / "shipped-3").exists()


# --------------------------------------------------------------------------------------------- quiet libraries
def test_deepspeeds_accelerator_probe_is_silenced_unless_verbose():
    logger = logging.getLogger("DeepSpeed")
    probe = logging.LogRecord("DeepSpeed", logging.WARNING, "/x/deepspeed/accelerator/real_accelerator.py", 213,
                              "Setting accelerator to CPU.", None, None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, "/x/deepspeed/runtime/engine.py", 1, "zero", None, None)
    try:
        command.quiet_libraries()
        assert not logger.filter(probe) and logger.filter(other)
        command.quiet_libraries(verbose=True)
        assert logger.filter(probe)
    finally:
        logger.removeFilter(command._PROBE)


def test_the_weight_loading_bar_is_off_and_hub_download_bars_stay(monkeypatch):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_hub, was_hf = not hub_utils.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    try:
        command.quiet_loading()
        assert not hf_logging.is_progress_bar_enabled()
        assert (not hub_utils.are_progress_bars_disabled()) == was_hub
    finally:
        if was_hf:
            hf_logging.enable_progress_bar()
        if not was_hub:
            hub_utils.disable_progress_bars()


def test_train_output_has_no_library_noise(tiny_run, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run("quiet")))
    t0 = time.perf_counter()
    res = run_cli("train", recipe, "--quiet")
    assert res.returncode == 0, res.stderr
    noise = ("Loading weights", "Generating train split", "Setting accelerator", "Traceback")
    assert not [n for n in noise if n in res.stdout + res.stderr], res.stderr
    assert res.stdout.strip().endswith(f"gate checkpoint: {tmp_path / 'quiet' / 'gates'}"), time.perf_counter() - t0


def test_integer_lists_take_ranges_where_no_value_is_negative():
    """``integers`` reads ``0,3,15-17`` as seven values when its range starts at 0 or above (layers, budgets); with a
    negative floor a leading minus is a sign, never a range."""
    import argparse

    assert command.integers(0, 29)("0,3,15-17") == [0, 3, 15, 16, 17]
    assert command.integers(-5, 5)("-3,2") == [-3, 2]
    for bad in ("a-b", "3-", "15-40"):
        with pytest.raises(argparse.ArgumentTypeError):
            command.integers(0, 29)(bad)
    assert command.fraction("0.5") == 0.5 and command.positive("2") == 2.0
    for parse, bad in ((command.fraction, "nan"), (command.fraction, "1.5"), (command.positive, "inf"),
                       (command.positive, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)

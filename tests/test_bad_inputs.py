"""No silent failures: each class of bad input, fault and misuse ends in a named trimkv error (a ``TrimKVError``
subclass whose message names the field / file / value and the fix) or in a documented intended behaviour, never in
an internal traceback or a silently wrong result. One section per class of the issue that asked for this."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from _tinyrun import make_data, make_model_dir, recipe_dict
from conftest import build_tiny_model
from trimkv import RetentionCache, attach_gates, generate, make_cache
from trimkv.share import load_gate_checkpoint, push_to_hub, save_gates
from trimkv.data import DataConfig, build_dataset
from trimkv.errors import (CacheError, CorruptCheckpointError, DataError, GateCheckpointError, ModelLoadError,
                           NonFiniteError, RecipeError, ResumeError, TrimKVError)
from trimkv.gate import GateConfig, RetentionGates
from trimkv.base_model import load_model
from trimkv.recipe import parse_recipe
from trimkv.train.state import TrainingCheckpoints, run_dir_lock
from trimkv.train.run import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"model": make_model_dir(root / "model"), "data": make_data(root / "docs.jsonl"), "root": root}


def recipe(setup, name, **train):
    return recipe_dict(setup["model"], setup["data"], setup["root"] / name, **train)


def gates(**kw) -> RetentionGates:
    torch.manual_seed(0)
    return RetentionGates(GateConfig(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=16, gate_hidden=8, **kw))


def with_field(raw: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".")
    raw = json.loads(json.dumps(raw))
    raw.setdefault(section, {})[key] = value
    return raw


# ------------------------------------------------------------------------------ 1. non-finite values
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gates_are_refused_at_load_and_push(tmp_path, bad):
    folder = save_gates(gates(), tmp_path / "g")
    weights = load_file(str(folder / "model.safetensors"))
    weights["layers.1.bias"][0] = bad
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"NaN or inf in \['layers.1.bias'\]"):
        load_gate_checkpoint(folder)
    with pytest.raises(CorruptCheckpointError):
        push_to_hub(folder, "me/gates")                                   # refused before any Hub call


def test_non_finite_gates_are_refused_at_save(tmp_path):
    g = gates()
    with torch.no_grad():
        g.layers[0].w1.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="layers.0.w1.weight"):
        save_gates(g, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("field, value", [("gates.bias_init", ".nan"), ("train.lr", ".inf"), ("loss.kl_weight", ".nan")])
def test_non_finite_recipe_numbers_are_refused(setup, field, value):
    with pytest.raises(RecipeError, match=rf"'{field}' must be a finite number"):
        parse_recipe(with_field(recipe(setup, "x"), field, yaml.safe_load(value)))


def test_a_diverging_run_stops_with_a_named_error_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    from trimkv.train import engines

    real, calls = engines.training_step, []

    def poisoned(*args, **kwargs):                                        # step 4 produces a NaN loss
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(engines, "training_step", poisoned)
    raw = recipe(setup, "nan-run", save_every=2, steps=6)
    with pytest.raises(NonFiniteError, match="step 4: loss nan"):
        finetune(parse_recipe(raw), progress=False)
    run = setup["root"] / "nan-run"
    assert [s for s, _ in TrainingCheckpoints(run / "checkpoints").steps()] == [2]   # nothing saved after it
    assert not (run / "gates").exists()                                  # no exported NaN gates


def test_resume_skips_a_checkpoint_whose_gates_are_not_finite(setup):
    raw = recipe(setup, "nan-resume", save_every=2, steps=4, keep_last=3)
    finetune(parse_recipe(raw), progress=False)
    newest = setup["root"] / "nan-resume" / "checkpoints" / "step-4"
    weights = load_file(str(newest / "gates.safetensors"))
    weights["layers.0.bias"][:] = math.nan
    save_file(weights, str(newest / "gates.safetensors"))
    manifest = json.loads((newest / "manifest.json").read_text())      # a consistent manifest: only the NaN is wrong
    import hashlib

    manifest["files"]["gates.safetensors"] = {"bytes": (newest / "gates.safetensors").stat().st_size, "sha256":
                                              hashlib.sha256((newest / "gates.safetensors").read_bytes()).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="NaN or inf"):
        assert TrainingCheckpoints(newest.parent).newest_valid().name == "step-2"


# ------------------------------------------------------------------------------ 2. errors that came too late
def test_output_checkpoint_is_checked_before_the_model_loads(setup, tmp_path, monkeypatch):
    import trimkv.train.run as run_mod

    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for target, match in ((busy, "not a trimkv checkpoint"), (busy / "notes.txt", "it is a file")):
        raw = recipe(setup, f"early-{target.name}")
        raw["output"]["checkpoint"] = str(target)
        with pytest.raises(GateCheckpointError, match=match):
            finetune(parse_recipe(raw), progress=False)


@pytest.mark.parametrize("field, value, match", [
    ("train.adam_eps", -1e-8, "adam_eps' must be positive"), ("train.adam_eps", 0, "adam_eps' must be positive"),
    ("gates.init_std", -0.02, "init_std' must be >= 0"), ("train.device", "cuda", "no CUDA GPU"),
])
def test_values_that_failed_inside_torch_are_refused_up_front(setup, field, value, match):
    if field == "train.device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RecipeError, match=match):
        parse_recipe(with_field(recipe(setup, "x"), field, value))


# ------------------------------------------------------------------------------ 3. wrong types and ranges
@pytest.mark.parametrize("field, value, match", [
    ("data.batch_size", 1.5, "must be an integer"), ("data.seq_len", 16.5, "must be an integer"),
    ("data.pack", "no", "must be true or false"), ("train.lr", 0, "must be positive"),
    ("train.min_lr", 1.0, "min_lr' = 1.0 is above 'train.lr'"), ("loss.capacity_weight", -1, "must be >= 0"),
    ("train.betas", [0.9, 1.5], "betas' = .* must both be in"), ("train.steps", True, "must be a number"),
    ("model.name", 3, "must be a string"), ("data.max_samples", 0, "must be positive"),
])
def test_wrong_types_and_ranges_are_named(setup, field, value, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(with_field(recipe(setup, "x"), field, value))


def test_numbers_written_as_strings_are_read_as_numbers(setup):
    r = parse_recipe(with_field(with_field(recipe(setup, "x"), "loss.budget", "64"), "train.lr", "2e-4"))
    assert (r.loss.budget, r.train.lr) == (64, 2e-4)                     # intended: YAML reads 2e-4 as a string


@pytest.mark.parametrize("kwargs, match", [({"budget": 1.5}, "budget must be an integer"),
                                           ({"budget": 8, "sink": 2.0}, "sink must be an integer"),
                                           ({"budget": 4, "sink": 2, "window": 2}, "leaves no room")])
def test_bad_cache_arguments_are_named(kwargs, match):
    with pytest.raises(CacheError, match=match):
        RetentionCache(num_layers=2, **kwargs)


def test_gate_config_of_the_wrong_type_is_a_corrupt_checkpoint(tmp_path):
    folder = save_gates(gates(), tmp_path / "g")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = "2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match="num_layers must be a positive integer, got '2'"):
        load_gate_checkpoint(folder)


def test_data_config_built_in_code_checks_types_too():
    with pytest.raises(DataError, match="batch_size must be an integer"):
        DataConfig(source="builtin:prose", batch_size=1.5)
    with pytest.raises(DataError, match="pack must be true or false"):
        DataConfig(source="builtin:prose", pack="no")


# ------------------------------------------------------------------------------ 4. data problems
@pytest.fixture(scope="module")
def tok(setup):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(setup["model"])


@pytest.mark.parametrize("content, match", [
    ("", "is empty"), ("\n\n", "is empty"),
    ('{"text": "fine"}\n{"text": broken\n', "could not be read as json"),
    ('{"text": 42}\n', "column 'text' must hold strings"),
    ('{"messages": [{"role": "user", "content": "the quick brown fox jumps"}, {"role": "assistant", "content": ""}]}\n',
     "gave no training rows"),
])
def test_data_problems_are_named(tok, tmp_path, content, match):
    tok.chat_template = tok.chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "d.jsonl").write_text(content)
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=16, pack=False, cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning) if "no training rows" in match else _nothing():
        with pytest.raises(DataError, match=match):
            build_dataset(cfg, tok)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing-model", "~/missing-model"])
def test_a_missing_model_folder_is_named(name):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(name)


# ------------------------------------------------------------------------------ 5. state misuse
@pytest.fixture
def gated_model(tokenizer):
    model = build_tiny_model(vocab_size=len(tokenizer))
    return model, attach_gates(model, gate_hidden=8)


def test_a_used_cache_is_refused_by_generate_until_reset(gated_model, tokenizer):
    model, _ = gated_model
    cache = make_cache(model, "trimkv", 16, sink=2, window=4)
    first = generate(model, tokenizer, "the quick brown fox jumps over the lazy dog", cache=cache, max_new_tokens=4)
    with pytest.raises(CacheError, match="already holds .* tokens of an earlier sequence"):
        generate(model, tokenizer, "a different prompt entirely", cache=cache, max_new_tokens=4)
    cache.reset()
    again = generate(model, tokenizer, "the quick brown fox jumps over the lazy dog", cache=cache, max_new_tokens=4)
    assert again.text == first.text                                       # reset = a fresh cache


def test_a_cache_reused_inside_model_generate_is_refused(gated_model, tokenizer):
    """model.generate would take a used cache's tokens for the start of a new prompt: the cache knows its sequence."""
    model, _ = gated_model
    from trimkv.compat import cache_kwargs

    def run(cache, text, **kw):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"] if isinstance(text, str) \
            else text
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                                  max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)

    for scope in ("head", "global"):
        cache = make_cache(model, "streaming", 16, sink=2, window=4, scope=scope)
        fresh = run(cache, "the quick brown fox jumps over the lazy dog")
        with pytest.raises(CacheError, match="another sequence"):
            run(cache, "a different prompt entirely, and longer than the first one was")
        cache.reset()
        assert torch.equal(run(cache, "the quick brown fox jumps over the lazy dog"), fresh)   # reset = fresh
    more = tokenizer(" and then", return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert run(cache, torch.cat([fresh, more], 1)).shape[1] > fresh.shape[1]   # continuing its own sequence: allowed


def test_a_cache_used_for_another_batch_size_is_named(gated_model):
    model, _ = gated_model
    cache = make_cache(model, "trimkv", 16, sink=2, window=4)
    from trimkv.compat import cache_kwargs

    with torch.no_grad():
        model(torch.randint(3, 50, (2, 10)), **cache_kwargs(model, cache), use_cache=True)
        with pytest.raises(CacheError, match="holds 2 sequence"):
            model(torch.randint(3, 50, (1, 1)), **cache_kwargs(model, cache), use_cache=True)


def test_a_bounded_cache_without_trimkv_hooks_is_named():
    model = build_tiny_model()
    cache = RetentionCache(16, 2)                                         # built without the model: no hooks
    from trimkv.compat import cache_kwargs

    with pytest.raises(CacheError, match="without trimkv's hooks"):
        model(torch.randint(3, 50, (1, 8)), **cache_kwargs(model, cache), use_cache=True)


def test_casting_the_model_keeps_the_gates_in_fp32(gated_model):
    model, handle = gated_model
    ids = torch.randint(3, 50, (1, 12))
    model.to(torch.bfloat16)                                              # intended: works, gates stay fp32
    assert {p.dtype for p in handle.gates.parameters()} == {torch.float32}
    assert torch.isfinite(model(ids).logits.float()).all()


def test_a_second_run_on_a_busy_run_dir_is_refused(setup):
    raw = recipe(setup, "busy-run")
    with run_dir_lock(setup["root"] / "busy-run"):
        with pytest.raises(ResumeError, match="is in use by a running training"):
            finetune(parse_recipe(raw), progress=False)


# ------------------------------------------------------------------------------ 6. resume that ignored changes
@pytest.fixture(scope="module")
def finished_run(setup):
    raw = recipe_dict(setup["model"], setup["data"], setup["root"] / "resumable", save_every=2, steps=4)
    finetune(parse_recipe(raw), progress=False)
    return raw


@pytest.mark.parametrize("field, value", [("train.lr", 0.5), ("gates.gate_hidden", 32), ("loss.budget", 4)])
def test_resume_names_each_change_it_cannot_honour(finished_run, field, value):
    changed = with_field(finished_run, field, value)
    with pytest.raises(ResumeError, match=rf"{field}: .* -> {value}"):
        finetune(parse_recipe(changed), progress=False, resume=True)


def test_resume_may_extend_the_run(finished_run, setup):
    longer = with_field(finished_run, "train.steps", 6)                   # intended: steps may change
    finetune(parse_recipe(longer), progress=False, resume=True)
    steps = [json.loads(x)["step"] for x in (setup["root"] / "resumable" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


# ------------------------------------------------------------------------------ 7. privacy
def test_checkpoints_publish_folder_names_not_local_paths(tmp_path):
    g = gates(base_model="/home/someone/models/my-llama")
    folder = save_gates(g, tmp_path / "g", metadata={"data": "mixture of /home/someone/data/train.jsonl (weight 1)"})
    text = (folder / "config.json").read_text() + (folder / "README.md").read_text()
    assert "/home/someone" not in text and "my-llama" in text and "train.jsonl" in text


def test_push_refuses_an_old_checkpoint_that_names_a_local_path(tmp_path):
    folder = save_gates(gates(), tmp_path / "g")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["base_model"] = "/home/someone/models/my-llama"                   # as trimkv <= 0.1 wrote it
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GateCheckpointError, match="names a local path"):
        push_to_hub(folder, "me/gates")


def test_every_error_above_is_a_trimkv_error():
    for cls in (CacheError, CorruptCheckpointError, DataError, GateCheckpointError, ModelLoadError, NonFiniteError,
                RecipeError, ResumeError):
        assert issubclass(cls, TrimKVError)


# ================================================================================================================
# Issue 26, "bad input at every door": one section per class. CLI cases run the entry point as a user does
# (``python -m trimkv``) and assert the exit code, the absence of "Traceback" and the named input.
# ================================================================================================================

# ------------------------------------------------------------------------------ 8. the CLI has a boundary
@pytest.fixture(scope="module")
def cli_recipe(setup):
    path = setup["root"] / "cli.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, "cli-run", steps=400, save_every=1)))
    return path


@pytest.mark.parametrize("args, code, named", [
    (["generate", "{p}", "--budget", "0"], 2, ["--budget", "0 is below 1"]),
    (["train", "{recipe}", "--set", "train.stepz=3"], 3, ["train.stepz", "did you mean 'steps'"]),
    (["generate", "{latin}"], 4, ["latin.txt:2", "not UTF-8"]),
])
def test_cli_errors_are_one_line_with_the_class_exit_code(args, code, named, setup, cli_recipe, tmp_path):
    """(Every class and more arguments, in-process: tests/test_cli.py.)"""
    from _cli import assert_fails, run_cli

    (tmp_path / "p.jsonl").write_text('{"prompt": "the sky is"}\n')
    (tmp_path / "latin.txt").write_bytes(b"fine\ncaf\xe9\n")
    values = {"p": tmp_path / "p.jsonl", "recipe": cli_recipe, "latin": tmp_path / "latin.txt"}
    assert_fails(run_cli(*[a.format(**values) for a in args], cwd=tmp_path), code, *named)


def test_cli_debug_keeps_the_traceback(tmp_path):
    from _cli import run_cli

    (tmp_path / "p.jsonl").write_text("{broken\n")
    res = run_cli("generate", tmp_path / "p.jsonl", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "p.jsonl:1" in res.stderr


def test_cli_sigint_ends_in_one_line_and_the_run_resumes(setup, cli_recipe):
    import signal
    import subprocess
    import sys
    import time

    from _cli import REPO

    run = setup["root"] / "cli-run"
    proc = subprocess.Popen([sys.executable, "-m", "trimkv", "train", str(cli_recipe), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # (a background
    # pytest passes SIGINT on ignored, and Python keeps an ignored SIGINT ignored)
    deadline = time.monotonic() + 240
    while not TrainingCheckpoints(run / "checkpoints").steps() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("trimkv train: interrupted") and "--resume" in err
    assert TrainingCheckpoints(run / "checkpoints").newest_valid() is not None      # a valid checkpoint to resume


# ------------------------------------------------------------------------------ 9. text readers name file, line, field
def test_a_recipe_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from trimkv.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_bytes(b"data:\n  source: builtin:prose\nmodel:\n  name: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"r.yaml:4: not UTF-8 text \(byte 0xe9"):
        load_recipe(path)
    path.write_text("data:\n  source: [builtin:prose\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3:1: not valid YAML"):
        load_recipe(path)


def test_a_set_value_that_is_not_yaml_names_the_override(setup, tmp_path):
    from trimkv.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, "x")))
    with pytest.raises(RecipeError, match=r"--set train.betas=\[0.9,: the value .* not valid YAML"):
        load_recipe(path, ["train.betas=[0.9,"])


@pytest.mark.parametrize("rows, match", [
    ([{"messages": ["hello", "hi there"]}], r"d.jsonl row 1: column 'messages' must hold .* got list|"
                                              r"d.jsonl row 1: messages\[0\] must be a mapping"),
    ([{"messages": [{"role": "user", "content": 3}]}], r"row 1: messages\[0\] must be a mapping with string"),
    ([{"messages": "hello"}], r"row 1: column 'messages' must hold a non-empty list"),
])
def test_chat_rows_of_the_wrong_shape_are_a_data_error(tok, tmp_path, rows, match):
    tok.chat_template = tok.chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=16, pack=False, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=match):
        build_dataset(cfg, tok)


@pytest.mark.parametrize("content, match", [
    (b'{"text": "a"}\n{"text": "b",}\n', r"d.jsonl:2:\d+: not valid JSON"),
    (b'{"text": "a"}\n["b"]\n', r"d.jsonl:2: each line must be a JSON object"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"d.jsonl:2: not UTF-8 text"),
])
def test_a_data_file_that_cannot_be_read_names_its_line(tok, tmp_path, content, match):
    (tmp_path / "d.jsonl").write_bytes(content)
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=16, pack=False, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=match):
        build_dataset(cfg, tok)


@pytest.mark.parametrize("text, match", [
    ('{"context": "a", "question": "b"}\n{"context": "a", "question": }\n', r"p.jsonl:2:\d+: not valid JSON"),
    ('["a"]\n', r"p.jsonl:1: a request is a JSON object"),
    ('{"context": "a", "questions": "Who jumps?"}\n', r"p.jsonl:1: 'questions' must be a non-empty list of strings"),
    ('{"context": "a", "questions": ["ok", 3]}\n', r"p.jsonl:1: 'questions' must be a non-empty list"),
    ('{"prompt": 3}\n', r"p.jsonl:1: 'prompt' must be a string"),
    ('{"context": "a", "qestion": "b"}\n', r"p.jsonl:1: unknown field\(s\) \['qestion'\]"),
    ("\n\n", r"holds no request"),
])
def test_a_malformed_prompt_file_names_its_line(tmp_path, text, match):
    from trimkv.cli import read_requests

    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(DataError, match=match):
        read_requests(tmp_path / "p.jsonl")


@pytest.mark.parametrize("text, match", [
    ("[" * 100 + "]" * 100, "deeper than 32 levels"),
    ('{"num_layers": 2,\n "hidden_size": }', r"config.json:2:\d+: not valid JSON"),
    (" " * (2 << 20), "more than a config file may"),
])
def test_a_gate_config_is_parsed_with_limits(tmp_path, text, match):
    folder = save_gates(gates(), tmp_path / "g")
    (folder / "config.json").write_text(text)
    with pytest.raises(CorruptCheckpointError, match=match):
        load_gate_checkpoint(folder)


def test_eval_records_that_are_not_json_name_the_file(tmp_path):
    from trimkv.eval.cli import read_records

    (tmp_path / "metrics.json").write_text('[{"policy": "full"},\n oops]')
    with pytest.raises(DataError, match=r"metrics.json:2:\d+: not valid JSON"):
        read_records(tmp_path / "metrics.json")


# ------------------------------------------------------------------------------ 10. sizes taken from input are bounded
def test_a_huge_gate_width_is_refused_before_the_model_loads(setup, monkeypatch):
    import trimkv.train.run as run_mod

    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RecipeError, match=r"'gates.gate_hidden' = 1,000,000,000,000 is above the limit"):
        parse_recipe(with_field(recipe(setup, "x"), "gates.gate_hidden", 10**12))


def test_gates_that_would_not_fit_in_memory_are_refused_before_they_are_built(setup, monkeypatch):
    import trimkv.limits

    monkeypatch.setattr(trimkv.limits, "available_memory", lambda device: 1 << 20)      # 1 MiB free
    raw = with_field(recipe(setup, "mem"), "gates.gate_hidden", 4096)
    with pytest.raises(RecipeError, match=r"gates.gate_hidden' = 4,096 .* needs .* MiB on cpu, which has 1.0 MiB"):
        finetune(parse_recipe(raw), progress=False)


def test_a_budget_whose_cache_would_not_fit_is_refused_before_the_cache_exists(monkeypatch):
    import trimkv.limits
    from trimkv.eval.cli import check_budget_fits

    model = build_tiny_model()
    check_budget_fits(model, [64], "--budget")                             # a few KiB: fine
    monkeypatch.setattr(trimkv.limits, "available_memory", lambda device: 1 << 30)
    with pytest.raises(CacheError, match=r"--budget 4194304 tokens per KV head needs 2.2 GiB on cpu, which has 1.0 GiB free"):
        check_budget_fits(model, [64, 1 << 22], "--budget")


def test_a_gate_config_with_a_million_layers_is_refused_at_once(tmp_path):
    import time

    folder = save_gates(gates(), tmp_path / "g")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = 1_000_000
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match=r"num_layers = 1,000,000 is above the limit"):
        load_gate_checkpoint(folder)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("kwargs, match", [({"seq_len": 1 << 30}, "seq_len=1,073,741,824 is above the limit"),
                                           ({"batch_size": 1 << 20}, "batch_size=1,048,576 is above the limit"),
                                           ({"source": "builtin:qa", "seq_len": 256}, "too short for builtin:qa")])
def test_data_sizes_are_bounded(kwargs, match):
    with pytest.raises(DataError, match=match):
        DataConfig(**{"source": "builtin:prose", **kwargs})


# ------------------------------------------------------------------------------ 11. partial input is named or counted
def test_rows_without_the_text_field_are_an_error_or_a_counted_warning(tok, tmp_path):
    rows = [{"text": "the quick brown fox jumps over the lazy dog"} if i % 2 else {"body": "x"} for i in range(8)]
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(source=str(tmp_path / "half.jsonl"), seq_len=8, pack=False, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"half.jsonl row 1 has no 'text' field .* skip_incomplete: true"):
        build_dataset(DataConfig(**cfg), tok)
    with pytest.warns(UserWarning, match=r"4 of 8 rows skipped: no 'text' field"):
        assert len(build_dataset(DataConfig(**cfg, skip_incomplete=True), tok)) == 4


def test_questions_must_be_a_list_of_strings_in_the_api(gated_model, tokenizer):
    from trimkv.serve import answer

    model, _ = gated_model
    with pytest.raises(DataError, match="questions must be a string or a list of strings"):
        answer(model, tokenizer, "a context", [1, 2], max_new_tokens=1)


def test_generate_refuses_a_batch_it_would_answer_only_the_first_row_of(gated_model, tokenizer):
    model, _ = gated_model
    with pytest.raises(CacheError, match=r"ids must be \[1, T\], got \[2, 5\]"):
        generate(model, tokenizer, torch.randint(3, 50, (2, 5)), max_new_tokens=1)


# ------------------------------------------------------------------------------ 12. no stale state
def metric_steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_never_appends_to_an_earlier_runs_metrics(setup):
    raw = recipe(setup, "twice", steps=3)
    finetune(parse_recipe(raw), progress=False)
    with pytest.raises(ResumeError, match=r"holds an earlier run \(metrics.jsonl with 3 logged step\(s\), up to step "
                                          r"3\): pass --resume .* --overwrite"):
        finetune(parse_recipe(raw), progress=False)
    finetune(parse_recipe(raw), progress=False, overwrite=True)
    assert metric_steps(setup["root"] / "twice") == [1, 2, 3]


def test_a_resume_before_the_first_checkpoint_drops_the_stale_metrics(setup):
    raw = recipe(setup, "early", steps=3, save_every=10)           # no checkpoint before the last step
    finetune(parse_recipe(raw), progress=False, until_step=2)      # killed at step 2: metrics 1, 2 and no checkpoint
    assert metric_steps(setup["root"] / "early") == [1, 2]
    finetune(parse_recipe(raw), progress=False, resume=True)       # starts from step 0 again
    assert metric_steps(setup["root"] / "early") == [1, 2, 3]


def test_a_torn_last_metrics_line_does_not_break_resume(setup):
    raw = recipe(setup, "torn", steps=4, save_every=2)
    finetune(parse_recipe(raw), progress=False, until_step=3)
    metrics = setup["root"] / "torn" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "loss": 1.2')          # killed mid-write
    finetune(parse_recipe(raw), progress=False, resume=True)
    assert metric_steps(setup["root"] / "torn") == [1, 2, 3, 4]


def test_a_corrupt_data_cache_is_named_and_rebuilt(tok, tmp_path):
    from trimkv.data.batch import _cache_path

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(6)))
    cfg = DataConfig(source=str(source), seq_len=8, cache_dir=str(tmp_path / "c"))
    rows = build_dataset(cfg, tok)
    path = _cache_path(cfg, tok)
    path.write_bytes(path.read_bytes()[:50])                                      # truncated
    with pytest.warns(UserWarning, match=r"tokenised-data cache .*\.pt is unreadable .* rebuilt"):
        again = build_dataset(cfg, tok)
    assert [r["input_ids"].tolist() for r in again] == [r["input_ids"].tolist() for r in rows]
    torch.save({"input_ids": torch.zeros(3, dtype=torch.int32)}, path)            # readable, not our layout
    with pytest.warns(UserWarning, match="not a cache of tokenised rows"):
        assert len(build_dataset(cfg, tok)) == len(rows)


# ------------------------------------------------------------------------------ 13. faults reported as what they are
def test_a_run_dir_that_is_a_file_is_named(setup, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    raw = recipe(setup, "x")
    raw["output"]["run_dir"] = str(tmp_path / "run")
    with pytest.raises(RecipeError, match=r"'output.run_dir' = .*run' is a file"):
        finetune(parse_recipe(raw), progress=False)


def test_a_full_disk_names_the_path(monkeypatch, tmp_path, tok):
    import errno
    import shutil
    from collections import namedtuple

    from trimkv.train import state as state_mod

    def full_disk(*a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")                   # what torch.save says

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    monkeypatch.setattr(state_mod.torch, "save", full_disk)
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"text": "the quick brown fox jumps over"}) + "\n")
    cfg = DataConfig(source=str(source), seq_len=4, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(OSError) as err:
        build_dataset(cfg, tok)
    assert err.value.errno == errno.ENOSPC and str(tmp_path / "cache") in err.value.filename
    from trimkv.command import explain
    assert "disk is full" in explain(err.value)[1] and str(tmp_path / "cache") in explain(err.value)[1]


# ------------------------------------------------------------------------------ 14. published text never forms code
def crafted(tmp_path, **fields):
    folder = save_gates(gates(), tmp_path / "g")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def snippet_calls(card: str) -> tuple[str, set[str]]:
    import ast
    import re

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    tree = ast.parse(code)
    load = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "load_model")
    assert all(isinstance(a, ast.Constant) for a in [*load.args, *(k.value for k in load.keywords)])   # literals only
    calls = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return code, calls, {k.arg: k.value.value for k in load.keywords}


EVIL_KEY = "x=__import__('os').system('echo pwned'), y"


def test_crafted_load_kwargs_never_reach_the_cards_code(tmp_path):
    from trimkv.share import convert_checkpoint

    evil = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", EVIL_KEY: "1", "revision": "main')\nimport os  #"}
    out = convert_checkpoint(crafted(tmp_path, base_load_kwargs=evil), tmp_path / "out")     # `trimkv convert`
    code, calls, kwargs = snippet_calls((out / "README.md").read_text())
    assert calls == {"load_model", "load_gates", "answer", "print"} and "__import__" not in code
    assert kwargs == {"revision": "main')\nimport os  #"}                    # a string literal, not a statement


def test_a_card_built_in_code_drops_unknown_keys_and_non_string_values(tmp_path):
    g = RetentionGates(GateConfig(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=16, gate_hidden=8,
                                  train_budget="64)\nimport os", base_load_kwargs={
                                      "name": "org/model", EVIL_KEY: "1", "gguf_file": {"a": "b"}}))
    folder = save_gates(g, tmp_path / "g")
    code, calls, _ = snippet_calls((folder / "README.md").read_text())
    assert calls == {"load_model", "load_gates", "answer", "print"}
    assert "load_model('org/model')" in code and "budget=512" in code and "import os" not in code


@pytest.mark.parametrize("fields, match", [
    ({"base_model": "x`\n```python\nimport os\n```"}, "base_model must be a printable string"),
    ({"train_budget": "64)\nimport os"}, "train_budget must be a positive integer"),
    ({"base_load_kwargs": {"name": ["a"]}}, "base_load_kwargs must map argument names to strings"),
])
def test_provenance_fields_of_the_wrong_type_are_a_corrupt_checkpoint(tmp_path, fields, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        load_gate_checkpoint(crafted(tmp_path, **fields))

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

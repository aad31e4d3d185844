"""Every recipe in recipes/ parses, validates, documents every field, and the GPU recipes follow the paper."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trimkv.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if "smollm2" not in p.name]
FIELD = re.compile(r"^\s+[A-Za-z_]+:\s*\S")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.describe() and recipe.data.components() and recipe.loss.budget > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_field_is_commented(path):
    bare = [line for line in path.read_text().splitlines() if FIELD.match(line) and "#" not in line]
    assert not bare, f"{path.name}: fields without a comment: {bare}"


def test_the_expected_recipes_exist():
    names = {p.stem for p in RECIPES}
    for model in ("qwen3-1.7b", "qwen3-4b-openr1", "qwen3-8b", "qwen3-4b-instruct-2507", "llama-3.1-8b-instruct",
                  "phi-3-mini-128k", "smollm2"):
        assert any(n.startswith(model) for n in names), model


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipes_follow_the_paper(path):
    r = load_recipe(path)
    t = r.train
    assert (t.lr, t.warmup_steps, t.min_lr, t.grad_accum, r.data.batch_size) == (2e-4, 100, 1e-6, 4, 1)
    assert r.loss.capacity_weight == 1.0 and r.loss.kl_weight == 1.0 and r.loss.ntp_weight == 1.0
    assert r.gates.gate_hidden == 512 and r.gates.bias_init == 18.0
    assert t.bf16 and t.gradient_checkpointing and t.engine == "deepspeed" and t.zero_stage == 2
    assert r.model.dtype == "bfloat16" and t.save_every > 0
    if "openr1" in path.stem:
        assert (r.data.source, r.data.format, r.data.seq_len, r.loss.budget) == (
            "open-r1/OpenR1-Math-220k", "chat", 16384, 512)
    else:
        assert r.data.seq_len >= 32768 and r.loss.budget == 4096


@pytest.mark.parametrize("section, field, value, match", [
    ("train", "engine", "horovod", "train.engine"),
    ("train", "zero_stage", 4, "train.zero_stage"),
    ("train", "save_every", -1, "train.save_every"),
    ("train", "keep_last", 0, "train.keep_last"),
    ("train", "resume", "yes", "train.resume"),
    ("train", "zero_stag", 2, "did you mean 'zero_stage'"),
])
def test_training_fields_are_validated(section, field, value, match):
    raw = yaml.safe_load(RECIPES[0].read_text())
    raw[section][field] = value
    with pytest.raises(RecipeError, match=re.escape(match)):
        parse_recipe(raw)

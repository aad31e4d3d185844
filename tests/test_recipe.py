"""Recipes are data validated up front: every shipped YAML parses, typos and bad values raise errors that name
the field, overrides apply, and a saved recipe reads back equal."""
from __future__ import annotations

import pathlib

import pytest
import yaml

from trimkv.recipe import Recipe, RecipeError, apply_override, load_recipe, parse_recipe, save_recipe

RECIPES = sorted((pathlib.Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def minimal(**sections) -> dict:
    return {"data": {"source": "builtin:prose"}, **sections}


def test_there_are_recipes():
    assert RECIPES, "recipes/*.yaml is empty"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.components() and recipe.loss.budget >= 1 and recipe.train.steps >= 1
    assert isinstance(recipe.train.lr, float)            # YAML's "3.0e-3" / "2e-4" become floats


def test_defaults_from_a_minimal_recipe():
    recipe = parse_recipe(minimal())
    assert recipe.gates.bias_init == 18.0 and recipe.loss.capacity_form == "paper"
    assert recipe.checkpoint_dir() == pathlib.Path("runs/default/gates")


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"train\.setps.*did you mean 'steps'"):
        parse_recipe(minimal(train={"setps": 3}))


def test_unknown_section_is_named_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"'trian'.*did you mean 'train'"):
        parse_recipe(minimal(trian={"steps": 3}))


def test_missing_data_section_raises():
    with pytest.raises(RecipeError, match="data"):
        parse_recipe({"train": {"steps": 3}})


@pytest.mark.parametrize("section,key,value,pattern", [
    ("train", "lr", "fast", r"train\.lr.*number"),
    ("train", "bf16", "yes", r"train\.bf16.*true or false"),
    ("loss", "capacity_form", "papr", r"loss\.capacity_form.*not one of"),
    ("gates", "gate_type", "rg7", r"gates\.gate_type"),
    ("train", "steps", 0, r"train\.steps.*positive"),
    ("loss", "budget", -4, r"loss\.budget.*positive"),
    ("gates", "gate_hidden", 0, r"gates\.gate_hidden.*positive"),
    ("train", "grad_accum", 1.5, r"train\.grad_accum.*integer"),
    ("loss", "budget", 64.5, r"loss\.budget.*integer"),
    ("train", "lr", True, r"train\.lr.*number"),
    ("loss", "capacity_scope", "layer", r"loss\.capacity_scope.*not one of"),
    ("lora", "enabled", "yes", r"lora\.enabled.*true or false"),
    ("lora", "r", 0, r"lora\.r.*positive"),
    ("lora", "dropout", 1.0, r"lora\.dropout.*below 1"),
    ("lora", "target_modules", [], r"lora\.target_modules.*names no module"),
    ("lora", "target_modules", [1, 2], r"lora\.target_modules.*list of names"),
    ("lora", "rank", 8, r"unknown field 'lora\.rank'"),
])
def test_bad_values_raise_naming_the_field(section, key, value, pattern):
    with pytest.raises(RecipeError, match=pattern):
        parse_recipe(minimal(**{section: {key: value}}))


def test_bad_data_field_is_reported_as_a_recipe_error():
    with pytest.raises(RecipeError, match="seq_len"):
        parse_recipe({"data": {"source": "builtin:prose", "seq_len": 1}})
    with pytest.raises(RecipeError, match="seq_lne"):
        parse_recipe({"data": {"source": "builtin:prose", "seq_lne": 64}})


def test_overrides_apply(tmp_path):
    path = RECIPES[0]
    recipe = load_recipe(path, ["train.steps=3", "loss.budget=16", "gates.gate_type=rg2", "train.lr=1e-3"])
    assert (recipe.train.steps, recipe.loss.budget, recipe.gates.gate_type) == (3, 16, "rg2")
    assert recipe.train.lr == pytest.approx(1e-3)
    with pytest.raises(RecipeError, match="section.field=value"):
        apply_override({}, "steps=3")
    with pytest.raises(RecipeError, match="train.stepz"):
        load_recipe(path, ["train.stepz=3"])


def test_missing_file_and_bad_yaml_raise(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_dbtrimkv_and_lora_fields_parse():
    recipe = parse_recipe(minimal(gates={"gate_type": "rg10"}, loss={"capacity_scope": "global"},
                                  lora={"enabled": True, "r": 4, "lr": "1e-4", "target_modules": ["q_proj", "v_proj"]}))
    assert recipe.gates.gate_type == "rg10" and recipe.loss.capacity_scope == "global"
    assert recipe.lora.enabled and recipe.lora.r == 4 and recipe.lora.lr == pytest.approx(1e-4)
    assert recipe.lora.target_modules == ("q_proj", "v_proj")
    default = parse_recipe(minimal())
    assert not default.lora.enabled and default.loss.capacity_scope == "per_head"


@pytest.mark.parametrize("source", ["shipped", "custom"])
def test_save_recipe_round_trips(tmp_path, source):
    if source == "shipped":
        recipe = load_recipe(RECIPES[0])
    else:
        recipe = parse_recipe(minimal(train={"steps": 7, "lr": "2e-4", "betas": [0.8, 0.95]},
                                      loss={"budget": 32, "capacity_form": "code"}, gates={"gate_hidden": 24},
                                      lora={"enabled": True, "target_modules": ["q_proj"]}))
    out = tmp_path / "run" / "recipe.yaml"
    save_recipe(recipe, out)
    assert isinstance(yaml.safe_load(out.read_text()), dict)     # plain YAML a person can read and edit
    again = load_recipe(out)
    assert again == recipe
    assert again.train.betas == recipe.train.betas and isinstance(again.train.betas, tuple)


def test_hub_fields_parse_and_validate():
    r = parse_recipe({
        "model": {"dtype": "auto"},
        "gates": {"gate_type": "rg3", "activation": "gelu_pytorch_tanh"},
        "data": {"source": "user/long-qa", "config_name": "en", "revision": "v1", "split": "train[:1%]"},
        "output": {"push_to_hub": "me/gates", "push_checkpoints": True, "hub_private": True, "license": "mit"},
        "logging": {"tensorboard": True},
    })
    assert (r.data.config_name, r.data.revision, r.output.push_to_hub, r.output.license) == ("en", "v1", "me/gates",
                                                                                             "mit")
    assert r.logging.tensorboard and r.output.push_checkpoints and r.model.dtype == "auto"
    with pytest.raises(RecipeError, match="activation"):
        parse_recipe({"data": {"source": "builtin:prose"}, "gates": {"activation": "softmax"}})
    with pytest.raises(RecipeError, match="push_checkpoints"):
        parse_recipe({"data": {"source": "builtin:prose"}, "output": {"push_checkpoints": "yes"}})
    with pytest.raises(RecipeError, match="config_name"):
        parse_recipe({"data": {"source": "builtin:prose", "config_name": "en"}})

"""Training throughput helpers: the FLOP count matches the model's own weights, the memory sizing finds the most rows
that fit, a wall-time budget stops a run on a checkpoint it resumes from bit-identically."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _tinyrun import make_data, make_model_dir, read_metrics, recipe_dict
from conftest import build_tiny_model
from trimkv.errors import RecipeError
from trimkv.recipe import parse_recipe
from trimkv.train.run import finetune
from trimkv.train.state import TrainingCheckpoints
from trimkv.train.throughput import (ModelShape, decoder_flops, first_that_fits, frozen_fwd_bwd_flops, peak_flops,
                                     rows_for_memory, step_flops)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_linear_flops_count_every_decoder_weight_once(family):
    model = build_tiny_model(family)
    cfg = model.config
    weights = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    linear, attention = decoder_flops(ModelShape.of(cfg), tokens=10, seq_len=7)
    assert linear == 2 * weights * 10
    assert attention == 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 4 * 10   # mean ctx 4


def test_gate_step_counts_three_decoder_passes_and_the_scored_head():
    cfg = build_tiny_model().config
    shape = ModelShape.of(cfg)
    linear, attention = decoder_flops(shape, tokens=64, seq_len=32)
    no_targets = step_flops(cfg, tokens=64, seq_len=32, scored=0)
    assert no_targets == pytest.approx(3 * linear + 4 * attention)
    head = step_flops(cfg, tokens=64, seq_len=32, scored=5) - no_targets
    assert head == pytest.approx(3 * 2 * cfg.hidden_size * cfg.vocab_size * 5)
    assert frozen_fwd_bwd_flops(cfg, tokens=64, seq_len=32) == pytest.approx(
        2 * linear + 3 * attention + 2 * 2 * cfg.hidden_size * cfg.vocab_size * 64)


def test_no_peak_and_so_no_mfu_on_a_cpu():
    assert peak_flops("cpu") is None


def test_rows_for_memory_fits_the_line_through_two_probes():
    probes = []

    def peak(rows):                       # 3 GiB of weights + 1.5 GiB a row
        probes.append(rows)
        return int((3 + 1.5 * rows) * 2**30)

    assert rows_for_memory(peak, limit_bytes=30 * 2**30) == 18     # (30 - 3) / 1.5
    assert probes == [1, 2]
    assert rows_for_memory(peak, limit_bytes=30 * 2**30, most=8) == 8
    with pytest.raises(RecipeError, match="seq_len"):
        rows_for_memory(peak, limit_bytes=4 * 2**30)


def test_rows_are_halved_until_a_step_fits():
    tried = []

    def step(rows):
        tried.append(rows)
        if rows > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert first_that_fits(step, 24) == 3 and tried == [24, 12, 6, 3]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        first_that_fits(lambda rows: step(99), 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("throughput")
    return make_model_dir(base / "model"), make_data(base / "docs.jsonl", n_docs=3), base


def _recipe(setup, name):
    model_dir, data, base = setup
    return parse_recipe(recipe_dict(model_dir, data, base / name, steps=4, save_every=3, keep_last=3))


def test_time_limit_stops_on_a_checkpoint_that_resumes_bit_identically(setup):
    ref = _recipe(setup, "full")
    full = finetune(ref, progress=False)
    cut = _recipe(setup, "cut")
    finetune(cut, progress=False, time_limit=0.0)          # out of time after the first step
    run_dir = Path(cut.output.run_dir)
    assert [s for s, _ in TrainingCheckpoints(run_dir / "checkpoints").steps()] == [1]
    assert [m["step"] for m in read_metrics(run_dir)] == [1]
    out = finetune(cut, progress=False, resume=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(run_dir)] == [m["loss"] for m in read_metrics(Path(ref.output.run_dir))]

"""The training flow of a recipe, top to bottom: load the frozen model, attach fresh gates, stream batches,
run the loop, export a gate checkpoint. ``trimkv train RECIPE.yaml`` calls :func:`finetune`.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch

from .attach import attach_gates
from .checkpoint import save_gates
from .gate import GateConfig
from .models import load_model
from .recipe import Recipe, load_recipe, save_recipe
from .train import MetricsLog, pick_device, train_loop


def endless_batches(data_cfg, tokenizer) -> Iterator[dict]:
    """Epoch after epoch of the recipe's data (reshuffled per epoch by the data seed)."""
    from .data import batches

    for epoch in itertools.count():
        yield from batches(data_cfg, tokenizer, epoch=epoch)


def gate_config_for(model, recipe: Recipe) -> GateConfig:
    g = recipe.gates
    return GateConfig.for_model(
        model.config, gate_type=g.gate_type, gate_hidden=g.gate_hidden, bias_init=g.bias_init, init_std=g.init_std,
        base_revision=recipe.model.revision, train_budget=recipe.loss.budget,
        loss_weights=dict(kl=recipe.loss.kl_weight, ntp=recipe.loss.ntp_weight, capacity=recipe.loss.capacity_weight,
                          capacity_form=recipe.loss.capacity_form),
    )


def finetune(recipe: Recipe | str | Path, *, overrides: list[str] | None = None, progress: bool = True) -> Path:
    """Train gates as the recipe says; returns the exported checkpoint folder."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    run_dir = Path(recipe.output.run_dir)
    save_recipe(recipe, run_dir / "recipe.yaml")  # the resolved config lives next to every run
    torch.manual_seed(recipe.train.seed)
    device = pick_device(recipe.train.device)
    m = recipe.model
    model, tokenizer = load_model(m.name, dtype=m.dtype, revision=m.revision, gguf_file=m.gguf_file,
                                  trust_remote_code=m.trust_remote_code, device=str(device))
    handle = attach_gates(model, gate_config=gate_config_for(model, recipe), attn_impl=recipe.train.attn_impl)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout-free LMs: only switches checkpointing on; the base stays frozen
    log = MetricsLog(run_dir, recipe)
    try:
        history = train_loop(model, handle, endless_batches(recipe.data, tokenizer), recipe, log=log,
                             progress=progress)
    finally:
        log.close()
    last = history[-1] if history else {}
    meta = {"data": recipe.data.source, "steps": recipe.train.steps, "seq_len": recipe.data.seq_len,
            "final_metrics": {k: last[k] for k in ("loss", "kl", "ntp", "cap", "soft_cache") if k in last}}
    out = save_gates(handle.gates, recipe.checkpoint_dir(), metadata=meta)
    if progress:
        _summary(last, recipe)
    return out


def _summary(m: dict, recipe: Recipe) -> None:
    if not m:
        return
    betas = " ".join(f"{b:.3f}" for b in m["mean_beta"])
    print(f"done: loss {m['loss']:.4f} (kl {m['kl']:.4f}, ntp {m['ntp']:.4f}, cap {m['cap']:.4f}); "
          f"soft cache {m['soft_cache']:.1f} vs M={recipe.loss.budget}; {m['tokens_per_s']:.0f} tok/s")
    print(f"mean beta per layer: {betas}")

"""The optimiser and learning-rate schedule of every engine: AdamW over the gate parameters, linear warm-up, cosine
decay to ``min_lr`` (one construction, so plain, DDP and DeepSpeed runs read the same recipe fields)."""
from __future__ import annotations

import math

import torch


def lr_lambda(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to 1, then cosine from 1 to min_lr / lr (a multiplier for LambdaLR).

    Not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``, though its cosine is the same one: that
    warm-up is ``step / warmup``, so its first optimiser step runs at lr 0 (a step that only feeds Adam's moments),
    where this one is ``(step + 1) / (warmup + 1)``; and past ``total`` it rises again where this one stays at
    ``min_lr``. Swapping would change every run (the shipped gates were trained with this schedule) and a resumed run
    would not continue its own curve; ``tests/test_hf.py`` pins where the two agree and where they differ."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def make_adamw(params, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` with the recipe's ``train`` section (``cfg``): lr, betas, eps, weight decay
    (fused kernels on CUDA). ``params`` may also be parameter groups (dicts with ``"params"`` and their own ``"lr"``,
    e.g. LoRA adapters beside the gates); the schedule scales every group's lr by the same factor."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    flat = [p for g in groups for p in g["params"]]
    fused = bool(flat) and all(p.is_cuda for p in flat)
    return torch.optim.AdamW(groups or flat, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine (:func:`lr_lambda`) over ``cfg.steps`` optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=cfg.warmup_steps, total=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr))


def build_optimizer(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and its schedule, as every engine uses them."""
    opt = make_adamw(params, cfg)
    return opt, build_schedule(opt, cfg)

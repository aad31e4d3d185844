"""The training loop: optimiser steps of an engine over a stream of batches, with metrics, progress and training
checkpoints. One step's maths is :func:`trimkv.train.step.training_step`; how it runs on 1..N devices is
:mod:`trimkv.train.engines`; a recipe end to end is :func:`trimkv.train.run.finetune`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..attach import GateHandle
from ..errors import NonFiniteError
from ..progress import Progress
from .distributed import all_reduce_mean
from .engines import PlainEngine
from .step import StepOutput

if TYPE_CHECKING:
    from ..recipe import Recipe


class MetricsLog:
    """Every logged metric goes to ``metrics.jsonl`` (always) and to wandb (when enabled)."""

    def __init__(self, run_dir: Path, recipe: Recipe):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if recipe.logging.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(project=recipe.logging.project, name=recipe.logging.run_name,
                                    mode=recipe.logging.wandb, dir=str(run_dir), config=recipe.to_dict())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def train_loop(model, handle: GateHandle, batches: Iterator[dict], recipe: Recipe, *, log: MetricsLog | None = None,
               progress: bool = True, start_step: int = 0, optimizer=None, scheduler=None, engine=None,
               checkpoints=None, until_step: int | None = None) -> list[dict]:
    """Run optimiser steps ``start_step + 1 .. recipe.train.steps``. Returns the per-step metrics (also logged).

    ``engine`` (:mod:`trimkv.train.engines`) runs each micro-batch's training step and the optimiser; default: a
    plain single-process engine (with ``optimizer`` / ``scheduler`` if given). ``checkpoints`` (a
    :class:`trimkv.train.checkpoints.TrainingCheckpoints`) gets a training checkpoint every ``train.save_every`` steps and
    at the last step; it stores ``batches.state_dict()`` as the data position when the stream has one.
    ``until_step`` stops early after that step, as a preempted job would (the schedule still spans all steps).
    """
    cfg = recipe.train
    if engine is None:
        engine = PlainEngine(model, handle, recipe, optimizer, scheduler)
    end = min(cfg.steps, until_step) if until_step is not None else cfg.steps
    history = []
    bar = Progress("train", total=cfg.steps, done=start_step, enabled=progress and engine.info.is_main)
    t0, tokens = time.perf_counter(), 0
    for step in range(start_step, end):
        parts = []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            parts.append(engine.forward_backward(batch, last=micro == cfg.grad_accum - 1))
            tokens += batch["input_ids"].numel() * engine.info.world_size
        gnorm = engine.optimizer_step()
        elapsed = time.perf_counter() - t0
        m = _metrics(parts, gnorm, engine.lr(), tokens / elapsed, all_reduce_mean)
        m["seconds"] = elapsed                                              # since this process started the loop
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise NonFiniteError(
                f"step {step + 1}: loss {m['loss']} and gradient norm {m['grad_norm']} (kl {m['kl']}, ntp {m['ntp']}, "
                f"cap {m['cap']}): the run diverged, so it stops here without saving these gates; the newest "
                "training checkpoint is intact. Lower train.lr or check the data, then resume or restart")
        history.append({"step": step + 1, **m})
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.log(step + 1, m)
        bar.update(step + 1, info=f"loss {m['loss']:.3f} kl {m['kl']:.3f} ntp {m['ntp']:.3f} cap {m['cap']:.3f} "
                                  f"S {m['soft_cache']:.0f} {m['tokens_per_s']:.0f} tok/s")
        if checkpoints is not None and cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            position = batches.state_dict() if hasattr(batches, "state_dict") else {}
            checkpoints.save(engine, step + 1, position)
    bar.close()
    return history


def _metrics(parts: list[StepOutput], gnorm, lr: float, tok_s: float, reduce=None) -> dict[str, Any]:
    """Mean over the step's micro-batches (and over ranks, when ``reduce`` averages across processes)."""
    rows = [torch.cat([torch.stack([p.loss.detach(), p.kl, p.ntp, p.cap, p.soft_cache]).float(), p.mean_beta.float()])
            for p in parts]
    local = torch.stack(rows).double().mean(0)
    if reduce is not None:
        local = reduce(local)
    gnorm = torch.as_tensor(gnorm).detach().to(local.device, torch.float64).reshape(1)
    values = torch.cat([local, gnorm]).cpu()                                           # one host transfer per step
    loss, kl, ntp, cap, soft_cache, *betas, gnorm = values.tolist()
    return {
        "loss": loss,
        "kl": kl,
        "ntp": ntp,
        "cap": cap,
        "soft_cache": soft_cache,
        "mean_beta": betas,
        "grad_norm": gnorm,
        "lr": lr,
        "tokens_per_s": tok_s,
    }

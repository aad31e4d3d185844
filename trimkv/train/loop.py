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
from ..errors import NonFiniteError, RecipeError, write_failed
from ..extras import install_hint, require
from ..progress import Progress
from .distributed import all_gather_object, all_reduce_mean
from .engines import PlainEngine
from .step import StepOutput

if TYPE_CHECKING:
    from ..recipe import Recipe


class MetricsLog:
    """Every logged metric goes to ``metrics.jsonl`` (always), to wandb and to TensorBoard (when enabled)."""

    def __init__(self, run_dir: Path, recipe: Recipe):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        if recipe.logging.wandb != "disabled":
            wandb = require("wandb", f"logging.wandb: {recipe.logging.wandb}")
            self.wandb = wandb.init(project=recipe.logging.project, name=recipe.logging.run_name,
                                    mode=recipe.logging.wandb, dir=str(run_dir), config=recipe.to_dict())
        if recipe.logging.tensorboard:
            self.tensorboard = tensorboard_writer(run_dir / "tensorboard")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as err:
            raise write_failed(err, self.path) from err
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for name, value in scalars(metrics).items():
                self.tensorboard.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def tensorboard_writer(log_dir: Path):
    """A ``torch.utils.tensorboard.SummaryWriter``; it needs the ``tensorboard`` package (an optional extra)."""
    return summary_writer_class()(log_dir=str(log_dir))


def summary_writer_class():
    """``SummaryWriter``, or RecipeError naming the extra to install (checked before a run loads its model)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RecipeError(f"logging.tensorboard: true needs the tensorboard package: {install_hint('tensorboard')} "
                          f"(or pip install tensorboard), or set logging.tensorboard: false ({err})") from err
    return SummaryWriter


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers by name; a list (e.g. ``mean_beta`` per layer) becomes ``name/0``, ``name/1``, ..."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def train_loop(model, handle: GateHandle, batches: Iterator[dict], recipe: Recipe, *, log: MetricsLog | None = None,
               progress: bool = True, start_step: int = 0, optimizer=None, scheduler=None, engine=None,
               checkpoints=None, until_step: int | None = None, on_save=None,
               time_limit: float | None = None) -> list[dict]:
    """Run optimiser steps ``start_step + 1 .. recipe.train.steps``. Returns the per-step metrics (also logged).

    ``engine`` (:mod:`trimkv.train.engines`) runs each micro-batch's training step and the optimiser; default: a
    plain single-process engine (with ``optimizer`` / ``scheduler`` if given). ``checkpoints`` (a
    :class:`trimkv.train.state.TrainingCheckpoints`) gets a training checkpoint every ``train.save_every`` steps and
    at the last step; it stores ``batches.state_dict()`` as the data position when the stream has one.
    ``until_step`` stops early after that step, as a preempted job would (the schedule still spans all steps).
    ``time_limit`` (seconds of this call) stops after the step that reaches it, with a training checkpoint of that
    step when ``checkpoints`` is given, so a run with a wall-time budget ends on a point it can resume from.
    ``on_save(step)`` runs after each training checkpoint (e.g. a Hub push of the gates; every rank calls it).
    """
    cfg = recipe.train
    if engine is None:
        engine = PlainEngine(model, handle, recipe, optimizer, scheduler)
    end = min(cfg.steps, until_step) if until_step is not None else cfg.steps
    history = []
    bar = Progress("train", total=cfg.steps, done=start_step, enabled=progress and engine.info.is_main)
    t0, tokens = time.perf_counter(), 0
    deadline = None if time_limit is None else t0 + time_limit
    for step in range(start_step, end):
        parts = []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            parts.append(engine.forward_backward(batch, last=micro == cfg.grad_accum - 1))
            tokens += batch["input_ids"].numel() * engine.info.world_size
        gnorm = engine.optimizer_step()
        elapsed = time.perf_counter() - t0
        m = step_metrics(parts, gnorm, engine.lr(), tokens / elapsed, all_reduce_mean)
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
        out_of_time = deadline is not None and _agreed(time.perf_counter() >= deadline)
        if checkpoints is not None and cfg.save_every and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps
                                                           or out_of_time):
            position = batches.state_dict() if hasattr(batches, "state_dict") else {}
            checkpoints.save(engine, step + 1, position)
            if on_save is not None:
                on_save(step + 1)
        if out_of_time:
            break
    bar.close()
    return history


def _agreed(flag: bool) -> bool:
    """``flag`` as rank 0 sees it, on every rank (ranks stop on the same step: their clocks may disagree)."""
    return bool(all_gather_object(flag)[0])


def step_metrics(parts: list[StepOutput], gnorm, lr: float, tok_s: float, reduce=None) -> dict[str, Any]:
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

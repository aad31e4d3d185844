"""Training retention gates: the step (visible code) and the loop; engines (plain / DDP / DeepSpeed) in engine.py.

    loss = kl_weight * KL(teacher || gated) + ntp_weight * CE + capacity_weight * L_cap

The teacher is the same frozen model with the gates switched off (``handle.disabled()``) under ``no_grad``; no
second model is held in memory. Only gate parameters receive updates; gradients still flow through the frozen
layers so that a gate in layer l learns from what layers > l need.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .attach import GateHandle
from .attention import capacity_sums
from .losses import capacity_loss, distillation_losses, scored_rows
from .recipe import LossSection, Recipe


@dataclass
class StepOutput:
    loss: torch.Tensor
    kl: torch.Tensor
    ntp: torch.Tensor
    cap: torch.Tensor
    soft_cache: torch.Tensor    # [] peak soft cache size max_t S_t, mean over layers and heads (detached)
    mean_beta: torch.Tensor     # [L] mean beta per layer (detached; read once per step by _metrics)


def prepare_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, Any]:
    """A data batch (CPU tensors [B, T]) on ``device``, plus what the step needs to know about it from the host:
    ``scored_rows`` (flat indices of the positions whose next token is a target) and ``packed`` (does any row hold
    several documents). Working these out here, before the copy, keeps the GPU step free of host syncs."""
    pos, mask = batch["position_ids"], batch["loss_mask"].bool()
    out: dict[str, Any] = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["scored_rows"] = scored_rows(mask.cpu()).to(device, non_blocking=True)
    out["packed"] = bool((pos[:, 1:] != pos[:, :-1] + 1).any())
    return out


def training_step(model: torch.nn.Module, handle: GateHandle, batch: dict[str, Any],
                  loss_cfg: LossSection) -> StepOutput:
    """One forward of teacher and student and the three losses (no backward, no optimiser).

    ``batch``: ``input_ids`` / ``position_ids`` / ``loss_mask`` [B, T], optionally with the host-side extras of
    :func:`prepare_batch` (``scored_rows``, ``packed``).
    """
    input_ids, position_ids, loss_mask = batch["input_ids"], batch["position_ids"], batch["loss_mask"]
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    with handle.rows_packed(batch.get("packed")):
        with torch.no_grad(), handle.disabled():
            teacher = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        with handle.recording() as records:
            student = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    softcap = getattr(model.config, "final_logit_softcapping", None)
    kl, ntp = distillation_losses(student, teacher, lm_head, input_ids, loss_mask, rows=batch.get("scored_rows"),
                                  chunk_size=loss_cfg.chunk_size, logit_softcap=softcap)
    if not records:
        raise RuntimeError("no gate records were collected: are the gates attached and enabled?")
    # Every layer sees the same positions: one capacity computation over all layers' heads [B, L * Hkv, T]
    # (the mean over it is the mean over layers of each layer's capacity loss, all layers being the same size).
    first = records[min(records)]
    logb = torch.cat([records[idx].logb for idx in sorted(records)], dim=1)            # [B, L * Hkv, T]
    S = capacity_sums(logb, first.pos, first.seg)                                       # [B, L * Hkv, T]
    cap = capacity_loss(S, first.pos, loss_cfg.budget, form=loss_cfg.capacity_form)
    L = len(records)
    loss = loss_cfg.kl_weight * kl + loss_cfg.ntp_weight * ntp + loss_cfg.capacity_weight * cap
    # metrics stay on the device: no per-layer host sync inside the step
    soft_cache = S.detach().amax(-1).mean()                                             # peak soft cache size
    mean_beta = logb.detach().exp().unflatten(1, (L, -1)).mean(dim=(0, 2, 3))           # [L]
    return StepOutput(loss, kl.detach(), ntp.detach(), cap.detach(), soft_cache, mean_beta)


def lr_lambda(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to 1, then cosine from 1 to min_lr / lr (a multiplier for LambdaLR)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def build_optimizer(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup=cfg.warmup_steps, total=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr))
    return opt, sched


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_loop(model, handle: GateHandle, batches: Iterator[dict], recipe: Recipe, *, log: MetricsLog | None = None,
               progress: bool = True, start_step: int = 0, optimizer=None, scheduler=None, engine=None,
               checkpoints=None, until_step: int | None = None) -> list[dict]:
    """Run optimiser steps ``start_step + 1 .. recipe.train.steps``. Returns the per-step metrics (also logged).

    ``engine`` (trimkv.engine) runs each micro-batch's training step and the optimiser; default: a plain
    single-process engine (with ``optimizer`` / ``scheduler`` if given). ``checkpoints`` (a
    :class:`trimkv.resume.TrainingCheckpoints`) gets a training checkpoint every ``train.save_every`` steps and
    at the last step; it stores ``batches.state_dict()`` as the data position when the stream has one.
    ``until_step`` stops early after that step, as a preempted job would (the schedule still spans all steps).
    """
    from .engine import PlainEngine, all_reduce_mean

    cfg = recipe.train
    if engine is None:
        engine = PlainEngine(model, handle, recipe, optimizer, scheduler)
    end = min(cfg.steps, until_step) if until_step is not None else cfg.steps
    history = []
    bar = _progress(cfg.steps, start_step, enabled=progress and engine.info.is_main)
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
        history.append({"step": step + 1, **m})
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.log(step + 1, m)
        bar.update(step + 1, m)
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


class _progress:
    """A rich progress bar with the loss components, tokens/s and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.bar is not None:
            info = (f"loss {m['loss']:.3f} kl {m['kl']:.3f} ntp {m['ntp']:.3f} cap {m['cap']:.3f} "
                    f"S {m['soft_cache']:.0f} {m['tokens_per_s']:.0f} tok/s")
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

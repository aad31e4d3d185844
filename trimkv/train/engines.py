"""Engines: how one :func:`~trimkv.train.step.training_step` becomes an optimiser step on 1..N devices.

Every engine has the same small interface, so the loop (:mod:`trimkv.train.loop`) reads the same for all of them::

    for micro in range(grad_accum):
        out = engine.forward_backward(batch, last=micro == grad_accum - 1)   # training_step + backward
    grad_norm = engine.optimizer_step()                                     # clip, step, schedule, zero

- :class:`PlainEngine`: one process, CPU or one GPU. The reference the others are tested against.
- :class:`DDPEngine`: ``torch.nn.parallel.DistributedDataParallel`` under torchrun (gloo on CPU, nccl on GPU).
  Only the gates are trainable, so only their gradients are all-reduced; the frozen base is excluded from
  DDP's start-up broadcast (every rank loads the same weights anyway).
- :class:`DeepSpeedEngine`: ZeRO-2 (default) or ZeRO-3 over the gate parameters. DeepSpeed is imported here
  and nowhere else. Mixed precision is the same for all engines: fp32 gates + torch bf16 autocast on GPU
  (DeepSpeed's own ``bf16`` mode would cast the fp32 gates to bf16, see :func:`deepspeed_config`).
  ZeRO-2 is tested on CPU. ZeRO-3 fails on CPU with DeepSpeed 0.19.8 (recomputed checkpoint chunks see the
  partitioned frozen LM head; the ZeRO-3 + checkpointing + frozen parameters issue, DeepSpeed PR #8148).

Where a process sits in the launch (rank, device) is :mod:`trimkv.train.distributed`'s; AdamW and the schedule are
built by :mod:`trimkv.train.optim` for every engine.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..extras import require
from ..lora import adapter_state_dict, load_adapter_state_dict
from ..recipe import ENGINES
from .distributed import DistInfo
from .optim import build_optimizer, build_schedule, make_adamw
from .step import prepare_batch, training_step


class _StepModule(nn.Module):
    """``forward(batch)`` = the training step, so DDP / DeepSpeed see one module call per micro-batch."""

    def __init__(self, model: nn.Module, handle, loss_cfg, autocast: bool):
        super().__init__()
        self.model = model                     # holds the frozen base and the gates (model.trimkv_gates)
        self.handle, self.loss_cfg, self.autocast = handle, loss_cfg, autocast

    def forward(self, batch: dict[str, torch.Tensor]):
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            return training_step(self.model, self.handle, batch, self.loss_cfg)


def param_groups(handle, recipe) -> list[dict[str, Any]]:
    """AdamW parameter groups: the gates at ``train.lr``; LoRA adapters, when attached, at ``lora.lr``."""
    groups = [{"params": [p for p in handle.gates.parameters() if p.requires_grad]}]
    if handle.adapter_params:
        groups.append({"params": list(handle.adapter_params), "lr": recipe.lora.lr})
    return groups


class PlainEngine:
    """One process: forward, ``(loss / grad_accum).backward()``, clip, AdamW, schedule."""

    name = "plain"

    def __init__(self, model: nn.Module, handle, recipe, optimizer=None, scheduler=None,
                 info: DistInfo | None = None):
        self.info = info or DistInfo(device=next(model.parameters()).device)
        self.model, self.handle, self.recipe = model, handle, recipe
        self.params = handle.trainable_parameters()
        if optimizer is None:
            optimizer, scheduler = build_optimizer(param_groups(handle, recipe), recipe.train)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = next(model.parameters()).device
        autocast = recipe.train.bf16 and self.device.type == "cuda"
        self.step_module = _StepModule(model, handle, recipe.loss, autocast)
        self.wrapped: nn.Module = self.step_module

    def forward_backward(self, batch: dict[str, torch.Tensor], *, last: bool):
        """One micro-batch: training step + backward of ``loss / grad_accum``; returns the StepOutput."""
        batch = prepare_batch(batch, self.device)
        with self._sync_context(last):
            out = self.wrapped(batch)
            (out.loss / self.recipe.train.grad_accum).backward()
        return out

    def _sync_context(self, last: bool):
        return contextlib.nullcontext()

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step, schedule, zero the gradients; returns the (pre-clip) global gradient norm as a 0-d tensor on
        the device (read by the loop together with the step's metrics: one host transfer per step)."""
        clip = self.recipe.train.grad_clip or float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # Training-state checkpoints (trimkv.train.state): the optimiser and schedule, rank 0 writes them.
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_extra(self, folder: Path) -> None:
        """Engine-specific files in a checkpoint folder (collective: every rank calls it)."""

    def load_extra(self, folder: Path) -> None:
        """Read back what :meth:`save_extra` wrote."""

    def trainable_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(gate weights, LoRA adapter weights) as fp32 CPU tensors; the adapters' dict is empty without LoRA. The
        gates' keys are a gate checkpoint's, the adapters' peft's (``lora/adapter_model.safetensors``)."""
        adapters = self.handle.adapters
        return self.handle.gates.fp32_state_dict(), (adapter_state_dict(adapters) if adapters is not None else {})

    def load_trainable_state(self, gates: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor] | None) -> None:
        self.handle.gates.load_state_dict(gates)
        if adapters is not None:
            load_adapter_state_dict(self.handle.adapters, adapters)


class DDPEngine(PlainEngine):
    """DistributedDataParallel around the training step; gradients of the gates are averaged over ranks.

    The gates are a submodule of the model, so wrapping the model works. ``find_unused_parameters=False``: every
    gate gets a gradient every step. Micro-batches before the last one of an optimiser step run under
    ``no_sync()``, so gradients are all-reduced once per step.
    """

    name = "ddp"

    def __init__(self, model, handle, recipe, optimizer=None, scheduler=None, info: DistInfo | None = None):
        super().__init__(model, handle, recipe, optimizer, scheduler, info)
        if not dist.is_initialized():
            raise RuntimeError("the ddp engine needs a process group: launch with torchrun "
                               "(launch/torchrun.sh) or use train.engine: plain")
        frozen = [n for n, p in self.step_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in self.step_module.named_buffers()]
        # The frozen base is identical on every rank: no start-up broadcast, no gradient buckets for it.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.step_module, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.wrapped = nn.parallel.DistributedDataParallel(
            self.step_module, device_ids=ids, find_unused_parameters=False)
        # (DDP broadcasts the gates from rank 0 here, so ranks start equal even if their seeds differ.)

    def _sync_context(self, last: bool):
        return contextlib.nullcontext() if last else self.wrapped.no_sync()


class DeepSpeedEngine(PlainEngine):
    """DeepSpeed ZeRO over the gate parameters (the only ones the optimiser sees).

    The optimiser is a client ``torch.optim.AdamW`` (with ``zero_allow_untested_optimizer``), so nothing is
    JIT-compiled and the CPU path (gloo) runs in CI. DeepSpeed owns gradient accumulation
    (``engine.step()`` after every micro-batch only steps at the boundary), clipping and the LR schedule.
    Checkpoints go through ``save_checkpoint(..., exclude_frozen_parameters=True)``.
    """

    name = "deepspeed"

    def __init__(self, model, handle, recipe, optimizer=None, scheduler=None, info: DistInfo | None = None):
        deepspeed = require("deepspeed", "train.engine: deepspeed")

        self.info = info or DistInfo(device=next(model.parameters()).device)
        self.model, self.handle, self.recipe = model, handle, recipe
        self.params = handle.trainable_parameters()
        cfg = recipe.train
        optimizer = optimizer or make_adamw(param_groups(handle, recipe), cfg)   # the same AdamW as every engine

        self.device = next(model.parameters()).device
        autocast = cfg.bf16 and self.device.type == "cuda"
        self.step_module = _StepModule(model, handle, recipe.loss, autocast)
        ds_cfg = deepspeed_config(recipe, world_size=self.info.world_size)
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.step_module, model_parameters=self.params, optimizer=optimizer,
            lr_scheduler=scheduler or (lambda opt: build_schedule(opt, cfg)), config=ds_cfg, dist_init_required=False)
        self.zero_stage = ds_cfg["zero_optimization"]["stage"]

    def forward_backward(self, batch, *, last: bool):
        batch = prepare_batch(batch, self.device)
        out = self.wrapped(batch)
        self.wrapped.backward(out.loss)   # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.wrapped.step()           # accumulates only (not a boundary)
        return out

    def optimizer_step(self) -> torch.Tensor:
        self.wrapped.step()               # boundary: reduce, clip, AdamW, schedule, zero
        gnorm = self.wrapped.get_global_grad_norm()
        return torch.as_tensor(float("nan") if gnorm is None else gnorm, dtype=torch.float32)

    def lr(self) -> float:
        return self.wrapped.get_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {}  # optimiser and schedule live in DeepSpeed's own files (save_extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_extra(self, folder: Path) -> None:
        self.wrapped.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True,
                                     save_latest=False)

    def load_extra(self, folder: Path) -> None:
        path, _ = self.wrapped.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {folder}/deepspeed")

    def trainable_state(self):
        with self._gathered():
            return super().trainable_state()

    def load_trainable_state(self, gates, adapters) -> None:
        with self._gathered(modifier_rank=0):
            super().load_trainable_state(gates, adapters)

    def _gathered(self, modifier_rank: int | None = None):
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=modifier_rank)


def deepspeed_config(recipe, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a recipe: ``train.ds_config`` (a JSON) or one built from ``train.zero_stage``.

    The JSON owns ZeRO settings (stage, offload, buckets); the recipe owns the hyperparameters, so batch size,
    accumulation and clipping are always set from the recipe. DeepSpeed's ``bf16``/``fp16`` modes must stay off:
    they cast every parameter, fp32 gates included, to 16 bits; trimkv uses torch autocast (``train.bf16``).
    """
    cfg = recipe.train
    if cfg.ds_config:
        path = Path(cfg.ds_config)
        if not path.is_file():
            raise FileNotFoundError(f"train.ds_config = {cfg.ds_config!r} does not exist (see launch/ds_zero*.json)")
        ds = json.loads(path.read_text())
    else:
        ds = {"zero_optimization": {"stage": cfg.zero_stage}}
    for mode in ("bf16", "fp16"):
        if ds.get(mode, {}).get("enabled"):
            raise ValueError(f"{cfg.ds_config}: DeepSpeed '{mode}.enabled' casts the fp32 gates to 16 bits; set it "
                             "to false and use the recipe's train.bf16 (torch autocast over the frozen model)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{cfg.ds_config}: remove the '{key}' section; trimkv builds AdamW and the schedule "
                             "from the recipe's train section")
    ds.update(
        train_micro_batch_size_per_gpu=recipe.data.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=recipe.data.batch_size * cfg.grad_accum * world_size,
        gradient_clipping=cfg.grad_clip,
        zero_allow_untested_optimizer=True,
        steps_per_print=ds.get("steps_per_print", 10**9),
    )
    ds.setdefault("zero_optimization", {}).setdefault("stage", cfg.zero_stage)
    return ds


def resolve_engine(name: str, world_size: int) -> str:
    """``auto`` -> ``ddp`` when the launcher started several processes, else ``plain``."""
    if name not in ENGINES:
        raise ValueError(f"train.engine = {name!r} is not one of {ENGINES}")
    if name == "auto":
        return "ddp" if world_size > 1 else "plain"
    if name == "plain" and world_size > 1:
        raise ValueError(f"train.engine = plain but WORLD_SIZE = {world_size}: every rank would train alone; "
                         "use engine ddp or deepspeed (or auto) under a multi-process launcher")
    return name


def build_engine(model: nn.Module, handle, recipe, info: DistInfo | None = None, **kwargs) -> PlainEngine:
    """The engine the recipe asks for (``train.engine``), given the launcher's world size."""
    info = info or DistInfo(device=next(model.parameters()).device)
    name = resolve_engine(recipe.train.engine, info.world_size)
    cls = {"plain": PlainEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine}[name]
    return cls(model, handle, recipe, info=info, **kwargs)

"""A recipe end to end, top to bottom: join the launcher's process group, load the frozen model, inject LoRA adapters
(if the recipe's ``lora`` section asks), attach fresh gates, pick the engine, resume if asked, stream this rank's
batches, run the loop, export a gate checkpoint (with the adapters in ``lora/``).
``trimkv train RECIPE.yaml [--resume]`` calls :func:`finetune`; so does every rank under torchrun / deepspeed.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from ..attach import attach_gates
from ..base_model import DEFAULT_WEIGHTS, is_default_model, load_model
from ..data import DataError, batches, hub_dataset_ids, prepare_data
from ..errors import GateCheckpointError, TrimKVError, write_failed
from ..extras import require
from ..gate import GateConfig, RetentionGates, check_compatible
from ..limits import check_fits
from ..lora import add_lora
from ..recipe import Recipe, RecipeError, load_recipe, recipe_changes, save_recipe
from ..share import PretrainedGates, load_gate_checkpoint, push_to_hub, save_gates
from .distributed import barrier, close_distributed, init_distributed, main_process_first, print0
from .engines import build_engine
from .loop import MetricsLog, summary_writer_class, train_loop
from .rundir import (METRICS_FILE, check_folders, clear_run, earlier_run, export_folder, record_export,
                     truncate_metrics)
from .state import ResumeError, TrainingCheckpoints, run_dir_lock


class EpochStream:
    """Epoch after epoch of the recipe's data for one rank (reshuffled per epoch by the data seed).

    ``state_dict()`` is the position ``{"epoch", "index", "world_size"}`` (``index`` = batches this rank has
    taken from the epoch); a stream built with that ``position`` continues with the very next batch.
    """

    def __init__(self, data_cfg, tokenizer, *, rank: int = 0, world_size: int = 1, position: dict | None = None):
        self.cfg, self.tokenizer, self.rank, self.world_size = data_cfg, tokenizer, rank, world_size
        self.epoch, self.index = 0, 0
        if position:
            self.epoch, self.index = int(position["epoch"]), _rescale(position, world_size)
        self._it: Iterator[dict] | None = None

    def __iter__(self) -> "EpochStream":
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = batches(self.cfg, self.tokenizer, epoch=self.epoch, skip_batches=self.index,
                                   rank=self.rank, world_size=self.world_size)
            try:
                item = next(self._it)
            except StopIteration:
                if self.index == 0:              # a whole epoch without one batch
                    raise DataError(f"{self.cfg.describe()}: epoch {self.epoch} gave no batch for rank {self.rank} "
                                    f"of {self.world_size}") from None
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            return item

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "world_size": self.world_size}


def _rescale(position: dict, world_size: int) -> int:
    """Per-rank batch index after a change of world size (each rank took ``index`` of every world_size)."""
    old = int(position.get("world_size", world_size))
    seen = int(position["index"]) * old            # batches of the epoch consumed by all ranks together
    if seen % world_size:
        print0(f"resume: {seen} batches of the epoch were consumed by {old} processes; with {world_size} "
               f"processes {seen % world_size} of them are seen again")
    return seen // world_size


def gate_config_for(model, recipe: Recipe) -> GateConfig:
    g, m = recipe.gates, recipe.model
    load = {"name": m.name, "revision": m.revision, "gguf_file": m.gguf_file}   # how the card's snippet loads the base
    base = {"base_revision": m.revision}
    if is_default_model(m.name):   # the weights it really is: the GGUF's repo and revision (not the safetensors model)
        base = {"base_model": DEFAULT_WEIGHTS["base_model"], "base_revision": DEFAULT_WEIGHTS["base_revision"],
                "extra": {"base_weights": DEFAULT_WEIGHTS["note"], "base_gguf_file": DEFAULT_WEIGHTS["gguf_file"]}}
    return GateConfig.for_model(
        model.config, gate_type=g.gate_type, gate_hidden=g.gate_hidden, bias_init=g.bias_init, init_std=g.init_std,
        activation=g.activation, **base, train_budget=recipe.loss.budget,
        base_load_kwargs={k: v for k, v in load.items() if v is not None},
        loss_weights=dict(kl=recipe.loss.kl_weight, ntp=recipe.loss.ntp_weight, capacity=recipe.loss.capacity_weight,
                          capacity_form=recipe.loss.capacity_form, capacity_scope=recipe.loss.capacity_scope),
    )


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the frozen decoder layers (transformers renamed the method in 5.x;
    the old name warns and goes in v6)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def initial_gates(model, recipe: Recipe) -> RetentionGates:
    """Fresh gates as the recipe's ``gates`` section says, or - with ``gates.init_from`` - those weights loaded from a
    gate checkpoint (a warm start; the exported config still records this recipe's budget and loss weights)."""
    config = gate_config_for(model, recipe)
    _check_sizes(config, model, recipe)
    gates = PretrainedGates(config)
    source = recipe.gates.init_from
    if source:
        start = load_gate_checkpoint(source)
        check_compatible(start.config, model)
        mine, theirs = gates.config, start.config
        shape = ("gate_type", "gate_hidden", "activation")
        if [getattr(mine, k) for k in shape] != [getattr(theirs, k) for k in shape]:
            raise RecipeError(f"gates.init_from={source!r} holds {theirs.gate_type} gates of width {theirs.gate_hidden} "
                              f"({theirs.activation}), the recipe asks for {mine.gate_type} gates of width "
                              f"{mine.gate_hidden} ({mine.activation}): set gates.gate_type / gates.gate_hidden / "
                              "gates.activation to match the checkpoint")
        gates.load_state_dict(start.state_dict())
    return gates


def _check_sizes(config: GateConfig, model, recipe: Recipe) -> None:
    """The gates (with gradients and AdamW's two moments) must fit the model's device; a ``seq_len`` beyond the
    model's positions is said."""
    params = config.num_parameters()
    device = next(model.parameters()).device
    check_fits(16 * params, device, error=RecipeError,
               what=f"gates of width 'gates.gate_hidden' = {config.gate_hidden:,} ({params:,} parameters with their "
                    "gradients and AdamW state)",
               fix="lower gates.gate_hidden (the paper uses 512)")
    cfg = getattr(model.config, "text_config", None) or model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and recipe.data.seq_len > limit:
        warnings.warn(f"'data.seq_len' = {recipe.data.seq_len} is beyond the {limit} positions {recipe.model.name} "
                      "was trained for: its attention (and so the teacher) may degrade there", stacklevel=3)


def finetune(recipe: Recipe | str | Path, *, overrides: list[str] | None = None, progress: bool = True,
             resume: bool | None = None, until_step: int | None = None, time_limit: float | None = None,
             overwrite: bool = False) -> Path:
    """Train gates as the recipe says; returns the exported checkpoint folder.

    ``resume`` (default: the recipe's ``train.resume``) continues from the newest valid training checkpoint in
    ``<run_dir>/checkpoints``. ``until_step`` stops after that step, like a preempted job (for tests and
    time-limited allocations); the gates exported then are the gates of that step. ``time_limit`` (seconds of
    training, after the model and data are loaded) does the same on a wall-time budget.

    Nothing another run wrote is lost: gates already in ``output.checkpoint`` that this run did not write stay, and
    this run exports to a new folder beside them (``<name>-2``, ...; said at the start); a ``run_dir`` that holds an
    earlier run (metrics or training checkpoints) is refused unless resumed. ``overwrite=True`` (``--overwrite``)
    replaces those gates and starts that run over instead.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    resume = recipe.train.resume if resume is None else resume
    check_folders(recipe)
    info = init_distributed(recipe.train.device, engine=recipe.train.engine)
    try:
        lock = run_dir_lock(recipe.output.run_dir) if info.is_main else contextlib.nullcontext()
        with lock:
            out = _preflight(recipe, resume, write=info.is_main, overwrite=overwrite)
            return _finetune(recipe, info, resume, progress, until_step, out, time_limit)
    finally:
        close_distributed(info)


def _preflight(recipe: Recipe, resume: bool, *, write: bool, overwrite: bool = False) -> Path:
    """Everything that can be checked before the model loads: where the gates will go, whether the run folder
    holds an earlier run, and - on resume - that the recipe changed only in fields a resume may change. Then the
    resolved recipe is saved next to the run. Returns the folder the gates will be exported to."""
    run_dir = Path(recipe.output.run_dir)
    if recipe.logging.tensorboard:
        summary_writer_class()
    if recipe.logging.wandb != "disabled":
        require("wandb", f"logging.wandb: {recipe.logging.wandb}")
    if recipe.lora.enabled:
        require("peft", "LoRA co-training (lora.enabled: true)")
    if recipe.train.engine == "deepspeed":
        require("deepspeed", "train.engine: deepspeed")
    earlier = None if resume else earlier_run(run_dir)
    if earlier and not overwrite:
        raise ResumeError(f"{run_dir} holds an earlier run ({earlier}): pass --resume (train.resume: true) to continue "
                          "it, --overwrite to start it over (its metrics and training checkpoints are deleted), or "
                          "choose another output.run_dir")
    out = export_folder(recipe, resume, overwrite=overwrite)
    saved = run_dir / "recipe.yaml"
    if resume and saved.is_file():
        changed = recipe_changes(load_recipe(saved), recipe)
        if changed:
            raise ResumeError(f"resuming {run_dir} with a recipe that differs from the one it was trained with in "
                              f"{len(changed)} field(s) a resume cannot honour: " + "; ".join(changed)
                              + ". Only steps, logging, checkpoint cadence, device, the export folder and the Hub settings may change; "
                              "start a new run (another output.run_dir, or gates.init_from) for the rest")
    if write:
        if earlier:
            clear_run(run_dir)
            print0(f"--overwrite: {run_dir} held an earlier run ({earlier}); starting it over")
        save_recipe(recipe, saved)  # the resolved config lives next to every run
        record_export(recipe, out)
    return out


def _finetune(recipe: Recipe, info, resume: bool, progress: bool, until_step: int | None, out: Path,
              time_limit: float | None = None) -> Path:
    run_dir, cfg = Path(recipe.output.run_dir), recipe.train
    checkpoints = TrainingCheckpoints(run_dir / "checkpoints", keep_last=cfg.keep_last)
    torch.manual_seed(cfg.seed)
    m = recipe.model
    with main_process_first():  # one rank downloads / converts the model and tokenises the data
        model, tokenizer = load_model(m.name, dtype=m.dtype, revision=m.revision, gguf_file=m.gguf_file,
                                      trust_remote_code=m.trust_remote_code, device=str(info.device))
        if not recipe.data.streaming:
            prepare_data(recipe.data, tokenizer)
    lora = recipe.lora
    adapters = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                        target_modules=lora.target_modules) if lora.enabled else None
    handle = attach_gates(model, initial_gates(model, recipe), attn_impl=cfg.attn_impl, adapters=adapters)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()  # dropout-free LMs: only switches checkpointing on; the base stays frozen
    engine = build_engine(model, handle, recipe, info)
    state = checkpoints.load_latest(engine) if resume else None
    if resume and state is None:
        print0(f"resume: no training checkpoint in {checkpoints.folder} yet; starting from step 0")
    stream = EpochStream(recipe.data, tokenizer, rank=info.rank, world_size=info.world_size,
                         position=state.data if state else None)
    if info.is_main and resume:
        truncate_metrics(run_dir / METRICS_FILE, state.step if state else 0)  # steps after the checkpoint are redone
    log = MetricsLog(run_dir, recipe) if info.is_main else None
    push_each = recipe.output.push_to_hub and recipe.output.push_checkpoints
    try:
        history = train_loop(model, handle, stream, recipe, log=log, progress=progress,
                             start_step=state.step if state else 0, engine=engine,
                             checkpoints=checkpoints if cfg.save_every else None, until_step=until_step,
                             time_limit=time_limit,
                             on_save=(lambda step: _push_step(engine, handle, recipe, info, step)) if push_each else None)
    finally:
        if log is not None:
            log.close()
    gates, adapter_state = exported_gates(engine, handle)
    last = history[-1] if history else {}
    if info.is_main:
        reached = last.get("step", state.step if state else 0)
        meta = card_metadata(recipe, reached, last)
        if adapters is not None:
            meta["lora"] = (f"r={lora.r}, alpha={lora.alpha}, {'/'.join(lora.target_modules)}, lr {lora.lr}; "
                            "adapters in lora/ (a peft adapter folder)")
        try:
            save_gates(gates, out, metadata=meta, adapters=adapters, adapter_state=adapter_state or None)
        except TrimKVError:
            raise
        except (OSError, RuntimeError, SafetensorError) as err:   # a full disk: the previous folder is intact
            raise write_failed(err, out) from err
        if progress:
            _summary(last, recipe)
        if recipe.output.push_to_hub:
            url = push_to_hub(out, recipe.output.push_to_hub, private=recipe.output.hub_private,
                              commit_message=f"trimkv gates after {reached} steps")
            print0(f"pushed the gates to {url}")
    barrier()
    return out


def exported_gates(engine, handle) -> tuple[RetentionGates, dict[str, torch.Tensor]]:
    """The trained gates as a fresh fp32 CPU module, and the LoRA adapters' state ({} without adapters); collective
    under ZeRO-3: every rank calls it."""
    gates = PretrainedGates(handle.gates.config)
    gate_state, adapter_state = engine.trainable_state()
    gates.load_state_dict(gate_state)
    return gates, adapter_state


def card_metadata(recipe: Recipe, steps: int, last: dict) -> dict[str, Any]:
    """What the exported checkpoint's model card says about the run (license and Hub datasets go into its front
    matter; local paths are shown by name only)."""
    return {"license": recipe.output.license, "datasets": hub_dataset_ids(recipe.data),
            "data": recipe.data.describe(), "steps": steps, "seq_len": recipe.data.seq_len,
            "final_metrics": {k: last[k] for k in ("loss", "kl", "ntp", "cap", "soft_cache") if k in last}}


def _push_step(engine, handle, recipe: Recipe, info, step: int) -> None:
    """``output.push_checkpoints``: push the gates of a training checkpoint (one Hub commit per save). A failed push
    is reported and training goes on; the push at the end of training is the one that must succeed."""
    gates, adapter_state = exported_gates(engine, handle)
    if info.is_main:
        with tempfile.TemporaryDirectory(prefix="trimkv-step-") as tmp:
            folder = save_gates(gates, Path(tmp) / recipe.checkpoint_dir().name, metadata=card_metadata(recipe, step, {}),
                                adapters=handle.adapters, adapter_state=adapter_state or None)
            try:
                push_to_hub(folder, recipe.output.push_to_hub, private=recipe.output.hub_private,
                            commit_message=f"trimkv gates at step {step}")
            except (OSError, ValueError, GateCheckpointError) as err:   # Hub errors derive from OSError / ValueError
                print0(f"warning: pushing the gates of step {step} to {recipe.output.push_to_hub} failed "
                       f"({type(err).__name__}: {err}); training goes on")
    barrier()


def _summary(m: dict, recipe: Recipe) -> None:
    if not m:
        return
    betas = " ".join(f"{b:.3f}" for b in m["mean_beta"])
    print(f"done: loss {m['loss']:.4f} (kl {m['kl']:.4f}, ntp {m['ntp']:.4f}, cap {m['cap']:.4f}); "
          f"soft cache {m['soft_cache']:.1f} vs M={recipe.loss.budget}; {m['tokens_per_s']:.0f} tok/s")
    print(f"mean beta per layer: {betas}")

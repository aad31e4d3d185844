"""Training-state checkpoints: stop a run anywhere, resume it exactly.

A run's training checkpoints live in ``<run_dir>/checkpoints/step-N/``, one folder per saved step::

    gates.safetensors   the gate weights (fp32, the same keys as a gate checkpoint's model.safetensors)
    adapters.safetensors  LoRA co-training only: the adapter weights (peft's keys, as in lora/adapter_model.safetensors)
    state.pt            optimiser + LR schedule state, RNG states of every rank, step, data position
                        (read back with ``torch.load(weights_only=True)``: tensors and plain containers only)
    deepspeed/          DeepSpeed engine only: its optimiser partitions (``exclude_frozen_parameters=True``)
    manifest.json       step, world size, engine, and the size + sha256 of every file above (written last)

Only trainable state is stored, never the frozen base model. A folder is written as ``.step-N.partial`` and
renamed into place when complete, so a crash (even SIGKILL) mid-save leaves the previous checkpoints intact;
leftover partial folders are ignored and removed at the next save. Loading walks from the newest checkpoint
to the oldest and takes the first whose files match its manifest (a truncated or corrupt newest checkpoint
falls back to the previous one). The last ``keep_last`` checkpoints are kept.

Every function that takes an engine is collective: all ranks call it; rank 0 writes the shared files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ResumeError, write_failed
from ..gate import nonfinite_keys
from .distributed import all_gather_object, barrier, is_main_process, print0

FORMAT_VERSION = 1
GATES_FILE = "gates.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")




@dataclass
class TrainState:
    """Where a resumed run continues: the next step to run and the data stream's position."""

    step: int = 0
    data: dict[str, Any] = field(default_factory=dict)   # e.g. {"epoch": 0, "index": 12, "world_size": 2}
    path: Path | None = None                              # the checkpoint it came from


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, torch (CPU and every CUDA device) and numpy (if imported) RNG states, as weights_only types."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, g = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, g))


# ------------------------------------------------------------------------------------------ files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {}
    for p in _files(folder):
        _fsync(p)
        files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    text = json.dumps({**meta, "format_version": FORMAT_VERSION, "files": files}, indent=2)
    (folder / MANIFEST_FILE).write_text(text + "\n")
    _fsync(folder / MANIFEST_FILE)


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint folder; raises ResumeError naming what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{folder}: no readable {MANIFEST_FILE} ({err})") from None
    for name, info in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise ResumeError(f"{folder}: {name} is missing")
        if p.stat().st_size != info["bytes"]:
            raise ResumeError(f"{folder}: {name} has {p.stat().st_size} bytes, the manifest says {info['bytes']} "
                              "(truncated by a crash or a full disk?)")
        if _sha256(p) != info["sha256"]:
            raise ResumeError(f"{folder}: {name} does not match its sha256 in {MANIFEST_FILE} (corrupt)")
    for name in (GATES_FILE, STATE_FILE):
        if name not in manifest.get("files", {}):
            raise ResumeError(f"{folder}: the manifest lists no {name}")
    return manifest


# ------------------------------------------------------------------------------------ checkpoints


class TrainingCheckpoints:
    """The ``step-N`` folders of one run: save (atomic, keep last K), list, load the newest valid one."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least one training checkpoint")
        self.folder, self.keep_last = Path(folder), keep_last

    def steps(self) -> list[tuple[int, Path]]:
        """Complete (renamed-into-place) checkpoint folders, oldest first. Validity is checked on load."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def save(self, engine, step: int, data_state: dict[str, Any]) -> Path:
        """Write ``step-{step}`` (collective). Returns its path."""
        final = self.folder / f"step-{step}"
        tmp = self.folder / f".step-{step}.partial"
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        try:
            engine.save_extra(tmp)                       # DeepSpeed: every rank writes its partition
            rngs = all_gather_object(rng_state())
            gates, adapters = engine.trainable_state()
            if is_main_process():
                try:
                    save_file(gates, str(tmp / GATES_FILE), metadata={"format": "pt", "step": str(step)})
                    if adapters:
                        save_file(adapters, str(tmp / ADAPTERS_FILE), metadata={"format": "pt", "step": str(step)})
                    torch.save({"step": step, "data": data_state, "engine": engine.state_dict(), "rng": rngs},
                               tmp / STATE_FILE)
                    _write_manifest(tmp, {"step": step, "engine": engine.name, "world_size": len(rngs)})
                except (OSError, RuntimeError, SafetensorError) as err:   # torch.save: "basic_ios::clear" on a full disk
                    raise write_failed(err, tmp) from err
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)                   # the commit point
                self._prune()
        except BaseException:
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()
        return final

    def _prune(self) -> None:
        for _, path in self.steps()[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.folder.glob(".step-*.partial"):   # left behind by a killed save
            shutil.rmtree(stale, ignore_errors=True)

    def newest_valid(self) -> Path | None:
        """The newest folder that passes :func:`verify` (warns about each newer one that does not)."""
        for _, path in reversed(self.steps()):
            try:
                verify(path)
                bad = nonfinite_keys(load_file(str(path / GATES_FILE)))
                if bad:
                    raise ResumeError(f"{path}: the gates hold NaN or inf ({bad[:3]}): the run had diverged")
                return path
            except ResumeError as err:
                warnings.warn(f"skipping training checkpoint: {err}", stacklevel=2)
        return None

    def load_latest(self, engine) -> TrainState | None:
        """Restore gates, optimiser, schedule and RNG from the newest valid checkpoint (collective).

        Returns where to continue, or None when the run has no checkpoint yet (a fresh start).
        """
        path = self.newest_valid() if is_main_process() else None
        if dist.is_initialized():
            box = [str(path) if path else None]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] else None
        if path is None:
            if self.steps():
                raise ResumeError(f"no valid training checkpoint in {self.folder}: every step-N folder failed its "
                                  "check (see the warnings); delete them to start over")
            return None
        return self.load(path, engine)

    def load(self, path: Path, engine) -> TrainState:
        """Restore from one checkpoint folder (collective)."""
        with_adapters = engine.handle.adapters is not None
        if with_adapters != (path / ADAPTERS_FILE).is_file():
            raise ResumeError(f"{path}: the checkpoint was written {'without' if with_adapters else 'with'} LoRA "
                              f"adapters and this run has {'them' if with_adapters else 'none'}: set lora.enabled as "
                              "the run that wrote it did")
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            gates = load_file(str(path / GATES_FILE))
            adapters = load_file(str(path / ADAPTERS_FILE)) if with_adapters else None
        except Exception as err:
            raise ResumeError(f"{path}: cannot read the training state ({err})") from err
        engine.load_extra(path)
        engine.load_state_dict(state["engine"])
        engine.load_trainable_state(gates, adapters)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rngs = state["rng"]
        if len(rngs) != (dist.get_world_size() if dist.is_initialized() else 1):
            print0(f"resume: the checkpoint was written by {len(rngs)} processes, this run has a different "
                   "number; RNG streams are not restored exactly")
        set_rng_state(rngs[rank % len(rngs)])
        print0(f"resumed from {path} (step {state['step']})")
        return TrainState(step=int(state["step"]), data=dict(state["data"]), path=path)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` for the duration of a run, so that a second run on the same folder is refused instead
    of interleaving its metrics and checkpoints with the first. The OS drops the lock when the process dies (even by
    SIGKILL), so a crashed run never blocks its resume."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise ResumeError(f"{run_dir} is in use by a running training ({owner}): wait for it to finish, or give "
                              "this run another output.run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

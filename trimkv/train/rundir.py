"""What a run folder (``output.run_dir``) holds and who may write where: one run per folder, and gates another run
exported are never replaced without being told.

    <run_dir>/recipe.yaml     the resolved recipe          <run_dir>/metrics.jsonl   one JSON row per logged step
    <run_dir>/checkpoints/    training checkpoints         <run_dir>/export.json     where this run exports its gates
    <run_dir>/.lock           held while a run trains (:func:`trimkv.train.state.run_dir_lock`)

A fresh run refuses a folder holding an earlier run (metrics or checkpoints) unless told to start it over
(``--overwrite``: :func:`clear_run`); a resumed run truncates ``metrics.jsonl`` to its checkpoint's step
(:func:`truncate_metrics`, a torn last line skipped). Gates already in ``output.checkpoint`` that this run did not write
stay: the run exports to a new folder beside them (:func:`export_folder`), and remembers it for its resumes.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from ..errors import RecipeError, write_failed
from ..recipe import Recipe
from ..share import check_writable
from .distributed import print0
from .state import TrainingCheckpoints

METRICS_FILE = "metrics.jsonl"
EXPORT_RECORD = "export.json"     # in run_dir: {"requested": output.checkpoint, "folder": where this run exports}


def check_folders(recipe: Recipe) -> None:
    """``output.run_dir`` and ``output.checkpoint`` must be folders (or not exist yet) under folders."""
    for field, path in (("output.run_dir", Path(recipe.output.run_dir)), ("output.checkpoint", recipe.checkpoint_dir())):
        if field == "output.run_dir" and path.exists() and not path.is_dir():   # a checkpoint file: check_writable's
            raise RecipeError(f"'{field}' = {str(path)!r} is a file: give a folder path (or move the file away)")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise RecipeError(f"'{field}' = {str(path)!r} lies under {str(parent)!r}, which is a file: give another "
                              "folder path")


def earlier_run(run_dir: Path) -> str | None:
    """What an earlier run left in ``run_dir`` (training checkpoints, metrics), or None."""
    steps = TrainingCheckpoints(run_dir / "checkpoints").steps()
    if steps:
        return f"training checkpoints up to step {steps[-1][0]}"
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        rows = read_metrics(metrics)
        return f"{METRICS_FILE} with {len(rows)} logged step(s)" + (f", up to step {rows[-1]['step']}" if rows else "")
    return None


def clear_run(run_dir: Path) -> None:
    """Delete what an earlier run left (``--overwrite``): training checkpoints, TensorBoard events, metrics, the
    export record."""
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (METRICS_FILE, EXPORT_RECORD):
        (run_dir / name).unlink(missing_ok=True)


def export_folder(recipe: Recipe, resume: bool, *, overwrite: bool) -> Path:
    """Where this run exports its gates: ``output.checkpoint``, unless gates this run did not write are there (then a
    new folder beside it, unless ``overwrite``). A resumed run keeps the folder it chose when it started."""
    requested = recipe.checkpoint_dir()
    check_writable(requested)                      # a file, or a folder that is no trimkv checkpoint: refused
    record = _read_record(Path(recipe.output.run_dir) / EXPORT_RECORD)
    if resume and record.get("requested") == os.path.abspath(requested) and record.get("folder"):
        own = Path(record["folder"])
        if own != requested.absolute():
            check_writable(own)
            print0(f"resume: exporting to {own}, the folder this run chose at its start ({requested} held other gates)")
            return own
        return requested
    if overwrite or not (requested.is_dir() and any(requested.iterdir())):
        return requested
    n = 2
    while (new := requested.with_name(f"{requested.name}-{n}")).exists():
        n += 1
    print0(f"output.checkpoint {requested} holds gates this run did not write; they stay, and this run exports to "
           f"{new} (pass --overwrite to replace them)")
    return new


def record_export(recipe: Recipe, folder: Path) -> None:
    """Remember in ``run_dir`` where this run exports (a resume keeps exporting there)."""
    record = {"requested": os.path.abspath(recipe.checkpoint_dir()), "folder": os.path.abspath(folder)}
    (Path(recipe.output.run_dir) / EXPORT_RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")


def _read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is skipped, an unreadable line
    elsewhere is skipped with a warning naming it."""
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if n < len(lines):
                warnings.warn(f"{path}:{n} is not a metrics row; it is dropped", stacklevel=2)
            continue
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of ``metrics.jsonl`` up to ``step`` (a resumed run redoes the steps after its checkpoint;
    no checkpoint yet: step 0, every row goes). Written atomically."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(err, path) from err

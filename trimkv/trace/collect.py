"""Writing a trace store: the frozen model runs once over the rows of a data source, shard by shard.

    store = write_traces(model, tokenizer, DataConfig(source="builtin:qa-plain", seq_len=1024, pack=False,
                                                      max_samples=64),
                         "runs/traces/qa", TraceSettings(rows=64))

The rows are the data source's first ``rows`` rows of epoch 0 (the order training would see, fixed by the data seed).
Before it starts it prints the store's size; then a progress line. A folder that already holds a store written with
the same model, data and settings is continued from its last whole shard (a killed run loses at most one shard of
work); one written with others is refused unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from .._version import __version__
from ..attach import attention_modules
from ..attention_impl import packed_documents
from ..base_model import input_device
from ..errors import DataError, NonFiniteError, TraceMismatchError, TraceStoreError
from ..progress import Progress
from .capture import TracePlan, trace_row
from .store import (FORMAT, MANIFEST, STORE_DTYPES, VERSION, TraceStore, fingerprint, read_manifest, row_bytes,
                    shard_name, stale_files, tensor_name, write_manifest, write_shard)
from .settings import TraceSettings
from .targets import TARGETS, target_names

def model_shapes(model) -> dict:
    cfg = model.config
    heads = cfg.num_attention_heads
    return {"num_layers": len(attention_modules(model)), "num_heads": heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "hidden_size": cfg.hidden_size}


def _check_layers(name: str, layers, num_layers: int) -> tuple[int, ...]:
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise DataError(f"trace {name} {bad}: the model has layers 0-{num_layers - 1}")
    return tuple(sorted(set(layers)))


def plan_manifest(model, data_cfg, settings: TraceSettings, *, model_name: str, recipe_hash: str | None = None) -> dict:
    """The manifest a new store of these inputs starts with (no shards yet)."""
    shapes = model_shapes(model)
    layers = _check_layers("layers", settings.layers, shapes["num_layers"]) or tuple(range(shapes["num_layers"]))
    hidden = _check_layers("hidden_layers", settings.hidden_layers, shapes["num_layers"])
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in ("cache_dir", "batch_size")}
    model_info = {"name": model_name, "name_or_path": getattr(model.config, "_name_or_path", None),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    manifest = {
        "format": FORMAT, "version": VERSION, "trimkv_version": __version__,
        "model": model_info, "data": data, "data_description": data_cfg.describe(), "recipe_hash": recipe_hash,
        "seq_len": data_cfg.seq_len, "rows": settings.rows, "layers": list(layers), "hidden_layers": list(hidden),
        "targets": target_names(settings.targets, settings.horizons), "horizons": list(settings.horizons),
        "target_meaning": {t: TARGETS[t] for t in TARGETS if t in settings.targets or t == "future"},
        "recon_prompt": settings.recon_prompt if "recon" in settings.targets else None,
        "dtype": settings.dtype, "shard_rows": settings.shard_rows, "shapes": shapes,
    }
    keys = ("model", "data", "seq_len", "rows", "layers", "hidden_layers", "targets", "dtype", "shard_rows",
            "recon_prompt", "shapes")
    manifest["fingerprint"] = fingerprint({k: manifest[k] for k in keys})
    manifest.update(rows_done=0, shards=[], cost={"seconds": 0.0, "tokens": 0, "runs": []})
    return manifest


def describe_size(manifest: dict) -> str:
    per = row_bytes(manifest)
    rows = manifest["rows"]
    total = sum(per.values()) * rows
    shards = -(-rows // manifest["shard_rows"])
    parts = ", ".join(f"{k} {_gb(v * rows)}" for k, v in per.items() if v)
    return (f"{rows} rows x {manifest['seq_len']} tokens, {len(manifest['layers'])} layers, targets "
            f"{manifest['targets']}: about {_gb(total)} in {shards} shard(s) of {manifest['shard_rows']} rows "
            f"({parts})")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def start_or_resume(out: Path, manifest: dict, *, overwrite: bool) -> dict:
    """The manifest to continue: the folder's own when it was written with the same inputs (resume), else the new
    one (an empty or missing folder; or ``overwrite``, which removes the old store's files)."""
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except TraceStoreError:
            if not overwrite:
                raise
            old = None
        if old is not None and old["fingerprint"] == manifest["fingerprint"]:
            for p in stale_files(out):
                p.unlink()
            return old
        if not overwrite:
            keys = ("model", "data", "seq_len", "rows", "layers", "hidden_layers", "targets", "dtype",
                    "shard_rows", "recon_prompt", "shapes")
            diff = [f"{k}: {old.get(k)!r:.80} -> {manifest[k]!r:.80}" for k in keys if old.get(k) != manifest[k]]
            raise TraceMismatchError(f"{out} holds a trace store written with other inputs ({'; '.join(diff)}): "
                                     "give another --out, or --overwrite to replace it")
        _remove_store(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TraceStoreError(f"{out} is not empty and holds no trace store: give an empty or new folder "
                                  "(or --overwrite to write into it anyway)")
    out.mkdir(parents=True, exist_ok=True)
    for p in stale_files(out):
        p.unlink()
    write_manifest(out, manifest)
    return manifest


def _remove_store(out: Path) -> None:
    for p in out.iterdir():
        if p.name == MANIFEST or p.name.startswith("shard-") or ".tmp" in p.name:
            p.unlink() if p.is_file() else shutil.rmtree(p)


def source_rows(data_cfg, tokenizer, rows: int) -> list[dict]:
    """The first ``rows`` rows of epoch 0 of the data source, in training order."""
    from ..data import epoch_rows

    got = epoch_rows(data_cfg, tokenizer, 0)
    if len(got) < rows:
        raise DataError(f"{data_cfg.describe()} gives {len(got)} rows of seq_len={data_cfg.seq_len}, fewer than the "
                        f"{rows} asked for: trace fewer rows, or add data (data.max_samples for the builtin QA)")
    return got[:rows]


def trace_plan(manifest: dict, settings: TraceSettings) -> TracePlan:
    """What :func:`~trimkv.trace.capture.trace_row` captures for a store of this manifest."""
    return TracePlan(layers=tuple(manifest["layers"]), hidden_layers=tuple(manifest["hidden_layers"]),
                     horizons=tuple(manifest["horizons"]), answer="answer" in manifest["targets"],
                     later=any(t.startswith("later@") for t in manifest["targets"]),
                     mean="mean" in manifest["targets"],
                     query_chunk=settings.query_chunk)


def write_traces(model, tokenizer, data_cfg, out: str | Path, settings: TraceSettings | None = None, *,
                 model_name: str = "", recipe_hash: str | None = None, overwrite: bool = False,
                 progress: bool = True, max_shards: int | None = None, say=print) -> TraceStore:
    """Trace ``settings.rows`` rows of ``data_cfg`` through the frozen ``model`` into the store at ``out`` (see the
    module docstring); ``max_shards``: stop after writing that many shards in this call (a later call continues).
    Returns the store, opened for reading."""
    settings = settings or TraceSettings()
    out = Path(out)
    manifest = plan_manifest(model, data_cfg, settings, model_name=model_name, recipe_hash=recipe_hash)
    manifest = start_or_resume(out, manifest, overwrite=overwrite)
    done, total = manifest["rows_done"], manifest["rows"]
    say(f"trimkv trace: {describe_size(manifest)} -> {out}" + (f" (resuming at row {done})" if done else ""))
    if done >= total:
        say(f"trimkv trace: {out} is complete ({total} rows)")
        return TraceStore(out)
    rows = source_rows(data_cfg, tokenizer, total)
    if manifest["recon_prompt"] is not None:
        packed = [r for r in range(done, total) if packed_documents(rows[r]["position_ids"]) is not None]
        if packed:
            raise DataError(f"the 'recon' target reads one document per row, but {len(packed)} of the rows pack "
                            f"several (row {packed[0]} first): trace with data.pack: false, or leave 'recon' out")
    device = input_device(model)
    plan = trace_plan(manifest, settings)
    recon_ids = None
    if manifest["recon_prompt"] is not None:
        recon_ids = torch.tensor(tokenizer(manifest["recon_prompt"], add_special_tokens=False)["input_ids"],
                                 device=device)
    dtype = STORE_DTYPES[manifest["dtype"]]
    t0, cpu0, tokens, written = time.perf_counter(), time.process_time(), 0, 0
    with Progress("trace", total=total, done=done, enabled=progress) as bar:
        while done < total and (max_shards is None or written < max_shards):
            index = len(manifest["shards"])
            end = min(done + manifest["shard_rows"], total)
            traced = []
            for r in range(done, end):
                row = rows[r]
                trace = trace_row(model, row["input_ids"].long().to(device), row["position_ids"].long().to(device),
                                  row["loss_mask"].to(device), plan, recon_ids=recon_ids)
                traced.append((row, trace))
                tokens += row["input_ids"].numel()
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(r + 1, info=f"{rate:.0f} tok/s")
            tensors = shard_tensors(manifest, traced, dtype)
            manifest["shards"].append(write_shard(out, index, tensors, (done, end)))
            done = manifest["rows_done"] = end
            written += 1
            _record_cost(manifest, time.perf_counter() - t0, time.process_time() - cpu0, tokens, device,
                         final=False)
            write_manifest(out, manifest)
    _record_cost(manifest, time.perf_counter() - t0, time.process_time() - cpu0, tokens, device, final=True)
    write_manifest(out, manifest)
    return TraceStore(out)


def _record_cost(manifest: dict, seconds: float, cpu_seconds: float, tokens: int, device, *, final: bool) -> None:
    """Cost of this call in ``cost.runs[-1]`` (updated after each shard), and the totals over all calls: wall
    seconds, CPU seconds of the process (all threads; on a shared machine the wall time says little), tokens."""
    runs = manifest["cost"]["runs"]
    entry = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "tokens": tokens,
             "device": str(device),
             "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)" if device.type == "cpu"
             else (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type),
             "torch": torch.__version__, "python": sys.version.split()[0]}
    if runs and runs[-1].get("open"):
        runs[-1] = entry
    else:
        runs.append(entry)
    runs[-1]["open"] = not final
    manifest["cost"]["seconds"] = round(sum(r["seconds"] for r in runs), 2)
    manifest["cost"]["cpu_seconds"] = round(sum(r.get("cpu_seconds", 0.0) for r in runs), 2)
    manifest["cost"]["tokens"] = sum(r["tokens"] for r in runs)


def shard_tensors(manifest: dict, traced: list, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one shard from its rows' traces, right-padded to ``seq_len``."""
    T, n = manifest["seq_len"], len(traced)
    s = manifest["shapes"]
    H, D, d = s["num_kv_heads"], s["head_dim"], s["hidden_size"]
    out = {"input_ids": torch.zeros(n, T, dtype=torch.int32), "pos": torch.full((n, T), -1, dtype=torch.int32),
           "valid": torch.zeros(n, T, dtype=torch.bool), "loss_mask": torch.zeros(n, T, dtype=torch.bool)}
    for layer in manifest["layers"]:
        out[tensor_name(layer, "keys")] = torch.zeros(n, H, T, D, dtype=dtype)
        out[tensor_name(layer, "values")] = torch.zeros(n, H, T, D, dtype=dtype)
        for t in manifest["targets"]:
            out[tensor_name(layer, f"target.{t}")] = torch.zeros(n, H, T, dtype=dtype)
    for layer in manifest["hidden_layers"]:
        out[tensor_name(layer, "hidden")] = torch.zeros(n, T, d, dtype=dtype)
    for i, (row, trace) in enumerate(traced):
        L = row["input_ids"].numel()
        out["input_ids"][i, :L] = row["input_ids"]
        out["pos"][i, :L] = row["position_ids"]
        out["valid"][i, :L] = True
        out["loss_mask"][i, :L] = row["loss_mask"]
        for layer in manifest["layers"]:
            out[tensor_name(layer, "keys")][i, :, :L] = trace.keys[layer].cpu()
            out[tensor_name(layer, "values")][i, :, :L] = trace.values[layer].cpu()
            for t in manifest["targets"]:
                out[tensor_name(layer, f"target.{t}")][i, :, :L] = trace.targets[layer][t].cpu()
        for layer in manifest["hidden_layers"]:
            out[tensor_name(layer, "hidden")][i, :L] = trace.hidden[layer].cpu()
    for name, t in out.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"trace tensor {name} overflows {manifest['dtype']} (values beyond its range): "
                                 "write the store with dtype bfloat16")
    return out

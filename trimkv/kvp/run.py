"""``trimkv kvp train``: a trace store folder -> a KVP ranker checkpoint folder, one layer at a time, resumable.

    train_from_store("runs/traces/smollm2-qa-1k", "checkpoints/smollm2-135m-qa-kvp", time_limit=900)

After each layer the rankers trained so far are written to ``<out>.partial/`` (weights + the list of finished
layers); ``resume=True`` starts from there, so a run stopped by its time limit or Ctrl-C loses at most one layer.
The checkpoint itself is written once, at the end (atomically, :func:`~trimkv.kvp.checkpoint.save_rankers`), and the
partial folder is removed.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from ..errors import DataError, ResumeError
from ..share.folder import check_writable
from .checkpoint import save_rankers
from .ranker import KVPConfig, KVPRankers
from .train import train_rankers

PARTIAL_SUFFIX = ".partial"


def open_store(path: str | os.PathLike):
    """The trace store at ``path`` (:class:`trimkv.trace.TraceStore`); DataError naming what is missing."""
    try:
        from ..trace import TraceStore
    except ImportError:
        raise DataError("this trimkv has no trace store reader (trimkv.trace.TraceStore, issue 21): build the store "
                        "and read it with a trimkv that has one") from None
    return TraceStore(path)


def train_from_store(store, out: str | os.PathLike, *, hidden: int = 64, target: str = "auto",
                     objective: str = "expected", steps: int = 300, rows: int = 8, tokens: int = 256, lr: float = 3e-3,
                     sink: int = 4, window: int = 16, time_limit: float | None = None, seed: int = 0,
                     resume: bool = False, progress: bool = True) -> pathlib.Path:
    """Train rankers on every layer of ``store`` (a folder or an opened store) and save them to ``out``.

    ``target="auto"``: ``answer`` when the store holds it (QA rows: the attention the answer tokens pay each token,
    the closest the store has to the paper's "attention from the tokens after the cut"), else ``future``. On the
    default QA store the ``future`` target (a max over every later query) is nearly flat: a random order's
    all-budget cost is 1.7-2.1x the best one's, the top 10 tokens of a row hold 1-2% of its mass; ``answer`` separates
    tokens (random 8-20x the best), and rankers trained on it reach 1.6-2.5x where recency is at 5.6-10x."""
    out = pathlib.Path(out)
    check_writable(out)
    store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    if target == "auto":
        target = "answer" if "answer" in (getattr(store, "targets", None) or ()) else "future"
    config = store_config(store, hidden=hidden, target=target, objective=objective)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    rankers, done = _resume(partial, config) if resume else (None, [])
    if getattr(store, "complete", True) is False and progress:
        print(f"trimkv kvp: the trace store holds {store.num_rows} of {store.manifest['rows']} rows (still being "
              "written?): training on those", flush=True)
    if not resume and partial.exists():
        raise ResumeError(f"{partial} holds an unfinished run: pass --resume to continue it, or delete it")
    rankers = rankers or KVPRankers(config, seed=seed)
    metrics: list[dict] = _read_metrics(partial) if resume else []
    t0 = time.perf_counter()

    def on_layer(layer: int, r: KVPRankers, m: dict) -> None:
        done.append(layer)
        metrics.append(m)
        _write_partial(partial, r, done, metrics)

    todo = [l for l in range(config.num_layers) if l not in done]
    train_rankers(store.layer, config, steps=steps, rows=rows, tokens=tokens, lr=lr, sink=sink, window=window,
                  objective=objective, time_limit=time_limit, seed=seed, layers=todo, rankers=rankers,
                  on_layer=on_layer, progress=progress)
    keys = [k for k in metrics[0] if k.startswith("val_cost")] if metrics else []
    summary = {k: round(sum(m[k] for m in metrics) / len(metrics), 4) for k in keys}
    rankers.config.extra = dict(store=_public_store(store), steps_per_layer=steps, rows=rows, tokens=tokens, lr=lr,
                                sink=sink, window=window, seed=seed, seconds=round(time.perf_counter() - t0, 1),
                                **{f"mean_{k}": v for k, v in summary.items()})
    path = save_rankers(rankers, out, metadata={"per_layer": [{k: m[k] for k in ("layer", "steps", *keys)}
                                                              for m in metrics]})
    shutil.rmtree(partial, ignore_errors=True)
    return path


def store_config(store, *, hidden: int, target: str, objective: str) -> KVPConfig:
    """The rankers' shape from the store's manifest (layers, KV heads, head dim, the model it traced, the row length)."""
    manifest = getattr(store, "manifest", {}) or {}
    shapes = manifest.get("shapes", {})
    first = store.layer(0, rows=[0]) if not shapes else None
    num_layers = int(getattr(store, "num_layers", None) or shapes.get("num_layers"))
    stored = list(getattr(store, "layers", None) or range(num_layers))
    if sorted(stored) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(stored))
        raise DataError(f"the trace store holds layers {stored}, not layers {missing}: KVP ranks every layer's "
                        "tokens; trace all layers (trimkv trace without --layers)")
    targets = getattr(store, "targets", None)
    if targets is not None and target not in targets:
        raise DataError(f"the trace store holds the targets {list(targets)}, not {target!r}: pick one with --target")
    model = manifest.get("model")
    name = model.get("name") or model.get("name_or_path") if isinstance(model, dict) else (model or
                                                                                            manifest.get("base_model"))
    return KVPConfig(num_layers=num_layers,
                     num_kv_heads=int(shapes.get("num_kv_heads") or first.num_kv_heads),
                     head_dim=int(shapes.get("head_dim") or first.keys.shape[-1]), hidden=hidden,
                     pos_scale=int(manifest.get("seq_len") or first.pos.shape[-1]), target=target, objective=objective,
                     base_model=name, base_revision=manifest.get("base_revision"))


def _public_store(store) -> str | None:
    path = getattr(store, "path", None)
    return pathlib.Path(path).name if path is not None else None


def _write_partial(partial: pathlib.Path, rankers: KVPRankers, done: list[int], metrics: list[dict]) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in rankers.state_dict().items()}
    save_file(state, str(partial / "model.tmp"))
    os.replace(partial / "model.tmp", partial / "model.safetensors")
    text = json.dumps(dict(config=rankers.config.to_dict(), done=done, metrics=metrics), indent=1)
    (partial / "progress.tmp").write_text(text)
    os.replace(partial / "progress.tmp", partial / "progress.json")


def _resume(partial: pathlib.Path, config: KVPConfig) -> tuple[KVPRankers | None, list[int]]:
    if not (partial / "progress.json").is_file():
        return None, []
    data = json.loads((partial / "progress.json").read_text())
    saved = KVPConfig.from_dict(data["config"])
    shape = lambda c: (c.num_layers, c.num_kv_heads, c.head_dim, c.hidden, c.target, c.objective)   # noqa: E731
    if shape(saved) != shape(config):
        raise ResumeError(f"{partial} was trained with {shape(saved)} (layers, heads, dim, hidden, target, objective), "
                          f"this run asks for {shape(config)}: use the same options or delete {partial}")
    rankers = KVPRankers(saved)
    rankers.load_state_dict(load_file(str(partial / "model.safetensors")))
    return rankers, list(data["done"])


def _read_metrics(partial: pathlib.Path) -> list[dict]:
    file = partial / "progress.json"
    return json.loads(file.read_text())["metrics"] if file.is_file() else []

"""Rows into the batches the training loop sees, and the on-disk cache of tokenised rows.

Every batch is a dict of three tensors of the same shape ``[B, T]``:

- ``input_ids``    int64  token ids.
- ``position_ids`` int64  position of the token inside its document: 0 at each packed document's
  first token, then 1, 2, ... The attention reads document boundaries from these (a new document
  starts wherever ``position_ids == 0``), so packed documents never attend to each other.
- ``loss_mask``    bool   True where ``input_ids[b, t]`` is a *target*: a token the model predicts
  from position ``t - 1``. A document's first token is never a target (see :mod:`trimkv.data.tokenize`
  for which tokens are).

Without packing, the rows of a batch are right-padded to the longest row with the pad token (positions keep
counting, ``loss_mask`` False on padding).

**Order**: the rows are cached on disk (see :func:`build_dataset`) and shuffled per epoch with a generator seeded by
``(seed, epoch)``; ``skip_batches`` skips what a resumed run already saw. Streaming keeps a shuffle buffer of rows
instead, seeded the same way. A mixture draws each row from one of its sources by weight.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from ..errors import DataError, write_failed
from . import builtin, corpus, synthqa
from .config import DataConfig, seeded_generator
from .pack import source_rows
from .sources import local_files

SHUFFLE_BUFFER_ROWS = 1024  # streaming shuffle buffer, in packed rows
CACHE_VERSION = 1  # bump when the tokenisation or packing rules change


# ----------------------------------------------------------------------------- cache


def build_dataset(cfg: DataConfig, tokenizer) -> list[dict]:
    """All rows of ``cfg`` as dicts of 1-D tensors [T] (``input_ids`` int32, ``position_ids`` int32,
    ``loss_mask`` bool); cached under ``cfg.cache_dir`` and reloaded without tokenising again.

    The cache key hashes the config fields that change the rows, the tokenizer (name, vocabulary,
    chat template) and, for local files, their paths, sizes and modification times.
    """
    path = _cache_path(cfg, tokenizer)
    if path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    rows = list(source_rows(cfg, tokenizer))
    if not rows:
        raise DataError(f"{cfg.source} gave no training rows: it is empty after filtering, or has "
                        f"fewer than seq_len={cfg.seq_len} tokens in all (pack={cfg.pack})")
    flat = _flatten_rows(rows)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(flat, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    except (OSError, RuntimeError) as err:   # torch.save: "basic_ios::clear: iostream error" on a full disk
        tmp.unlink(missing_ok=True)
        raise write_failed(err, path) from err
    return _split_rows(flat)


def _read_cache(path: Path) -> list[dict] | None:
    """The rows of a cache file, or None (with a warning naming it; the file is removed and rebuilt) when it is
    unreadable or does not hold what :func:`_flatten_rows` writes."""
    try:
        flat = torch.load(path, map_location="cpu", weights_only=True)
        problem = _cache_problem(flat)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, pickled objects: all mean "rebuild"
        problem = f"unreadable ({type(err).__name__})"
    if problem is None:
        return _split_rows(flat)
    warnings.warn(f"the tokenised-data cache {path} is {problem}: it is rebuilt", stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def _cache_problem(flat) -> str | None:
    keys = {"input_ids": torch.int32, "position_ids": torch.int32, "loss_mask": torch.bool, "offsets": None}
    if not isinstance(flat, dict) or set(flat) != set(keys):
        return "not a cache of tokenised rows"
    if not all(torch.is_tensor(flat[k]) and flat[k].dim() == 1 and (t is None or flat[k].dtype == t)
               for k, t in keys.items()):
        return "corrupt (a tensor of the wrong type or shape)"
    n, offsets = flat["input_ids"].numel(), flat["offsets"]
    if (flat["position_ids"].numel() != n or flat["loss_mask"].numel() != n or offsets.numel() < 2
            or int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets[1:] < offsets[:-1]).any())):
        return "corrupt (its row offsets do not match its tokens)"
    return None


def _flatten_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of lists -> flat tensors [sum T] plus ``offsets`` [N + 1]."""
    lengths = torch.tensor([0] + [len(r["input_ids"]) for r in rows])
    return {
        "input_ids": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32),
        "position_ids": torch.tensor([p for r in rows for p in r["position_ids"]],
                                     dtype=torch.int32),
        "loss_mask": torch.tensor([m for r in rows for m in r["loss_mask"]], dtype=torch.bool),
        "offsets": torch.cumsum(lengths, 0),
    }


def _split_rows(flat: dict[str, torch.Tensor]) -> list[dict]:
    bounds = flat["offsets"].tolist()
    keys = ("input_ids", "position_ids", "loss_mask")
    return [{k: flat[k][a:b] for k in keys} for a, b in zip(bounds[:-1], bounds[1:])]


def _cache_path(cfg: DataConfig, tokenizer) -> Path:
    fields = {k: v for k, v in asdict(cfg).items()     # skip_incomplete: the rows are the same when the build succeeds
              if k not in ("batch_size", "seed", "streaming", "cache_dir", "skip_incomplete")}
    vocab = sorted(tokenizer.get_vocab().items())
    key = {
        "version": CACHE_VERSION, "config": fields, "source": _source_fingerprint(cfg),
        "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                      tokenizer.chat_template, tokenizer.eos_token_id,
                      hashlib.sha256(json.dumps(vocab).encode()).hexdigest()],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    root = Path(cfg.cache_dir or "~/.cache/trimkv/data").expanduser()
    return root / f"{digest[:24]}.pt"


def _source_fingerprint(cfg: DataConfig) -> list:
    """What identifies the source's content: file stats for local paths, module source for builtins."""
    if cfg.source.startswith("builtin:"):
        digest = hashlib.sha256(Path(corpus.__file__).read_bytes()).hexdigest()
        grouped = cfg.source != "builtin:prose"   # the seed groups documents; builtin.py builds them
        builder = hashlib.sha256(Path(builtin.__file__).read_bytes()).hexdigest()
        if cfg.source.startswith("builtin:qa"):
            builder += hashlib.sha256(Path(synthqa.__file__).read_bytes()).hexdigest()
        return [digest, cfg.seed, CACHE_VERSION + 1, builder] if grouped else [digest]
    files = local_files(cfg.source)
    if files is None:
        return [cfg.source]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# ----------------------------------------------------------------------------- batches


def batches(cfg: DataConfig, tokenizer, *, epoch: int = 0, skip_batches: int = 0,
            rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch: dicts of ``input_ids`` / ``position_ids`` (int64) and ``loss_mask``
    (bool), each [B, T] (see the module docstring).

    The order depends only on ``(cfg.seed, epoch)``. ``skip_batches=k`` yields the same stream
    without its first k batches (exact resume). With ``world_size > 1``, rank r gets batches
    r, r + world_size, ... of the epoch's stream (``skip_batches`` counts this rank's batches) and
    every rank gets the same number of batches. A partial last batch is dropped.
    """
    if cfg.streaming:
        stream = _streamed_batches(cfg, tokenizer, epoch)
    else:
        rows = epoch_rows(cfg, tokenizer, epoch)
        if len(rows) < cfg.batch_size * world_size:
            raise DataError(f"{cfg.describe()} gave {len(rows)} rows of seq_len={cfg.seq_len}, fewer than "
                            f"batch_size={cfg.batch_size} x world_size={world_size}: add data or "
                            "lower DataConfig.batch_size / seq_len")
        stream = (_collate(rows[s: s + cfg.batch_size], tokenizer)
                  for s in range(0, len(rows) - cfg.batch_size + 1, cfg.batch_size))
    yield from _shard(stream, rank, world_size, skip_batches)


def prepare_data(cfg: DataConfig, tokenizer) -> int:
    """Build (or find cached) the rows of every source of ``cfg``; returns how many rows an epoch has."""
    return sum(len(build_dataset(c, tokenizer)) for c, _ in cfg.components())


def epoch_rows(cfg: DataConfig, tokenizer, epoch: int) -> list[dict]:
    """The rows of one epoch in training order, which depends only on ``(cfg.seed, epoch)``.

    One source: its rows, shuffled. A mixture: as many rows as all its sources hold together, each drawn from a
    source picked with probability proportional to its weight; every source walks through its own shuffled rows
    (starting over when the draws ask for more than it has).
    """
    g = seeded_generator(cfg.seed, epoch)
    comps = cfg.components()
    tables = [build_dataset(c, tokenizer) for c, _ in comps]
    perms = [torch.randperm(len(t), generator=g).tolist() for t in tables]
    if len(tables) == 1:
        return [tables[0][i] for i in perms[0]]
    weights = torch.tensor([w for _, w in comps], dtype=torch.float64)
    picks = torch.multinomial(weights, sum(map(len, tables)), replacement=True, generator=g).tolist()
    cursor, rows = [0] * len(tables), []
    for c in picks:
        rows.append(tables[c][perms[c][cursor[c] % len(perms[c])]])
        cursor[c] += 1
    return rows


def num_batches(cfg: DataConfig, tokenizer, *, world_size: int = 1) -> int:
    """Batches per epoch and rank that ``batches`` yields (not available when streaming)."""
    if cfg.streaming:
        raise DataError("the number of batches of a streamed dataset is unknown: set a max_steps")
    return prepare_data(cfg, tokenizer) // cfg.batch_size // world_size


def _shard(stream: Iterator, rank: int, world_size: int, skip: int) -> Iterator:
    """Every ``world_size``-th item from ``rank``, all ranks equally many, first ``skip`` dropped."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    group, seen = [], 0
    for item in stream:
        group.append(item)
        if len(group) == world_size:
            if seen >= skip:
                yield group[rank]
            group, seen = [], seen + 1


def _streamed_batches(cfg: DataConfig, tokenizer, epoch: int) -> Iterator[dict]:
    """Rows straight from the source through a seeded shuffle buffer, collated into batches."""
    rng, buffer, batch, produced = random.Random(f"{cfg.seed}:{epoch}"), [], [], False
    for row in source_rows(cfg, tokenizer):
        buffer.append(row)
        if len(buffer) >= SHUFFLE_BUFFER_ROWS:
            batch.append(buffer.pop(rng.randrange(len(buffer))))
        if len(batch) == cfg.batch_size:
            yield _collate(batch, tokenizer)
            batch, produced = [], True
    rng.shuffle(buffer)
    for row in buffer:
        batch.append(row)
        if len(batch) == cfg.batch_size:
            yield _collate(batch, tokenizer)
            batch, produced = [], True
    if not produced:
        raise DataError(f"{cfg.source} gave no full batch of {cfg.batch_size} rows of "
                        f"seq_len={cfg.seq_len} (empty after filtering, or too few tokens)")


def _collate(rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Rows (lists or tensors, lengths T_i) -> batch of [B, max T_i]; padding is not a target."""
    width = max(len(r["input_ids"]) for r in rows)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)  # padding keeps counting
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.as_tensor(r["input_ids"])
        position_ids[b, :n] = torch.as_tensor(r["position_ids"])
        loss_mask[b, :n] = torch.as_tensor(r["loss_mask"])
    return {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask}

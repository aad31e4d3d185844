"""Which documents a data source yields: a Hub dataset (``datasets.load_dataset``), local ``.jsonl`` / ``.json`` /
``.parquet`` / ``.txt`` files or a folder of them, or an offline built-in (:mod:`trimkv.data.builtin`).

Rows come back as they are stored (``datasets.Dataset``, or ``IterableDataset`` when streaming); turning them into
tokens is :mod:`trimkv.data.tokenize`'s job.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .builtin import builtin_documents
from .config import LOCAL_BUILDERS, DataConfig, is_hub_source


def hub_dataset_ids(cfg: DataConfig) -> list[str]:
    """The Hub datasets a config (or mixture) reads, in order, once each (for model cards)."""
    ids = [c.source for c, _ in cfg.components() if is_hub_source(c.source)]
    return list(dict.fromkeys(ids))


def local_files(source: str) -> list[Path] | None:
    """The data files behind a local ``source``, or None when ``source`` names a Hub dataset."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS)
        if not files:
            raise DataError(f"folder {source} holds no {sorted(LOCAL_BUILDERS)} files")
        return files
    if path.is_file():
        return [path]
    if not is_hub_source(source):
        raise DataError(f"local data path {source} does not exist (DataConfig.source)")
    return None


def first_problem(files: list[Path]) -> str | None:
    """``"file:line[:column]: what is wrong"`` for the first line of a local text file that is not UTF-8, or of a
    ``.jsonl`` / ``.json`` file that is not a JSON object per row; None when nothing is found (the library's own
    message is then the best there is)."""
    for f in files:
        if f.suffix == ".parquet":
            continue
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            return f"{f}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): save it as UTF-8"
        if f.suffix == ".json":
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                return f"{f}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})"
        elif f.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{f}:{n}:{err.colno}: not valid JSON ({err.msg}); each line must be one JSON object"
                if not isinstance(row, dict):
                    return f"{f}:{n}: each line must be a JSON object (a row of named fields), got {type(row).__name__}"
    return None


def load_documents(cfg: DataConfig, tokenizer=None):
    """Raw rows of ``cfg.source``: a ``datasets.Dataset``, or an ``IterableDataset`` when streaming.
    (``tokenizer``: the builtin QA sources fit their documents to ``seq_len`` tokens with it.)"""
    import datasets

    if cfg.source.startswith("builtin:"):
        docs = builtin_documents(cfg, tokenizer)
        ds = datasets.Dataset.from_list(docs) if docs and isinstance(docs[0], dict) else \
            datasets.Dataset.from_dict({"text": docs})
        ds = ds.to_iterable_dataset() if cfg.streaming else ds
    elif (files := local_files(cfg.source)) is not None:
        builders = {LOCAL_BUILDERS[f.suffix] for f in files}
        if len(builders) > 1:
            raise DataError(f"{cfg.source} mixes file types {sorted(builders)}: use one type")
        builder = builders.pop()
        extra = {"sample_by": "document"} if builder == "text" else {}
        if cfg.cache_dir:  # keep datasets' Arrow copy of local files beside our own cache
            extra["cache_dir"] = str(Path(cfg.cache_dir).expanduser() / "datasets")
        for f in files:
            if builder != "parquet" and not f.read_text(errors="replace").strip():
                raise DataError(f"{f} is empty: give data.source a file with at least one document")
        try:
            ds = datasets.load_dataset(builder, data_files={cfg.split: [str(f) for f in files]},
                                       split=cfg.split, streaming=cfg.streaming, **extra)
        except Exception as err:  # noqa: BLE001 - datasets raises its own types; the cause names the bad row
            cause = err.__cause__ or err.__context__ or err
            where = first_problem(files)
            raise DataError(f"{cfg.source} could not be read as {builder}: "
                            + (where or " ".join(f"{type(cause).__name__}: {cause}".split())[:400])) from err
    else:
        ds = datasets.load_dataset(cfg.source, name=cfg.config_name, revision=cfg.revision, split=cfg.split,
                                   streaming=cfg.streaming)
    if cfg.max_samples is not None and not cfg.source.startswith("builtin:qa"):
        ds = ds.take(cfg.max_samples) if cfg.streaming else ds.select(
            range(min(cfg.max_samples, len(ds))))
    return ds

"""What a data config says: where the training text comes from and how it becomes ``[B, T]`` batches.

:class:`DataConfig` is validated when it is built (a wrong field raises :class:`~trimkv.errors.DataError` naming it);
the constants list the values its fields take. :func:`is_hub_source` is here because the validation needs it (a
Hub config name or revision applies to Hub datasets only); :func:`seeded_generator` is the one place a seed becomes
an order (epoch shuffles, mixtures, the grouping of built-in documents).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..errors import DataError
from ..limits import MAX_TOKENS

FORMATS = ("auto", "text", "chat", "completion")
TOO_LONG = ("truncate", "drop", "error")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
# builtin:qa / qa-plain documents hold up to 6 facts and 3 questions: about 300-360 tokens before any haystack with
# the SmolLM2 tokenizer (measured), so a shorter seq_len can never hold them
QA_MIN_SEQ_LEN = 320
MAX_ROWS = 1 << 16      # batch_size (plausibility; memory is the model's to tell)


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes ``[B, T]`` batches.

    ``source``: ``"builtin:prose"`` (the corpus shipped with trimkv), a Hub dataset id, or a local
    ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file or a folder of such files. A Hub dataset takes
    ``config_name`` (its subset, ``datasets.load_dataset(source, name=...)``), ``revision`` (a branch, tag or commit)
    and ``split``.
    ``format``: ``"auto"`` picks ``"chat"`` if ``messages_column`` exists, else ``"completion"`` if
    ``prompt_column`` and ``completion_column`` exist (the completion is the target), else ``"text"`` if
    ``text_column`` exists (every token a target, or only those in a ``target_spans`` column when present).
    ``cache_dir`` defaults to ``~/.cache/trimkv/data``.
    ``mixture``: instead of ``source``, a list of sources, each a mapping with ``source``, ``weight`` (default 1)
    and any of ``format``, ``*_column``, ``split``, ``pack``, ``too_long``, ``max_samples`` (the mixture's own
    values of these are the defaults); every batch row comes from one of them, drawn with probability
    proportional to its weight (``seq_len``, ``batch_size``, ``seed``, ``cache_dir`` are shared).
    ``skip_incomplete``: a row without the field its format reads (or ``null`` there) is an error naming the row
    (``False``, the default), or skipped and counted in a warning (``True``).
    """

    source: str | None = None
    format: str = "auto"
    text_column: str = "text"
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    split: str = "train"
    config_name: str | None = None
    revision: str | None = None
    seq_len: int = 1024
    batch_size: int = 1
    pack: bool = True
    too_long: str = "truncate"
    seed: int = 0
    streaming: bool = False
    max_samples: int | None = None
    cache_dir: str | None = None
    mixture: list | None = None
    skip_incomplete: bool = False

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "seed", "max_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DataError(f"DataConfig.{name} must be an integer, got {value!r}")
        for name in ("pack", "streaming", "skip_incomplete"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.format not in FORMATS:
            raise DataError(f"DataConfig.format={self.format!r}: choose one of {FORMATS}")
        if self.too_long not in TOO_LONG:
            raise DataError(f"DataConfig.too_long={self.too_long!r}: choose one of {TOO_LONG}")
        if self.seq_len < 2:
            raise DataError(f"DataConfig.seq_len={self.seq_len}: need at least 2 tokens per row")
        if self.seq_len > MAX_TOKENS:
            raise DataError(f"DataConfig.seq_len={self.seq_len:,} is above the limit {MAX_TOKENS:,}: a typo?")
        if self.batch_size > MAX_ROWS:
            raise DataError(f"DataConfig.batch_size={self.batch_size:,} is above the limit {MAX_ROWS:,}: a typo?")
        if self.source in ("builtin:qa", "builtin:qa-plain") and self.seq_len < QA_MIN_SEQ_LEN:
            raise DataError(f"DataConfig.seq_len={self.seq_len} is too short for {self.source}: its documents need "
                            f"{QA_MIN_SEQ_LEN} tokens or more (up to 6 facts and 3 questions before any haystack): "
                            f"raise seq_len (the shipped QA recipes use 1024 or more)")
        if self.batch_size < 1:
            raise DataError(f"DataConfig.batch_size={self.batch_size}: must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"DataConfig.max_samples={self.max_samples}: must be >= 1 or None")
        if self.mixture is not None:
            if self.source:
                raise DataError("give DataConfig.source or DataConfig.mixture, not both")
            self.components()                                   # validates every entry
        elif not self.source:
            raise DataError("DataConfig.source is empty: give 'builtin:prose', a Hub id or a path "
                             "(or a mixture of sources)")
        elif (self.config_name or self.revision) and not is_hub_source(self.source):
            raise DataError(f"DataConfig.config_name / revision apply to Hub datasets, but source={self.source!r} "
                             "is a local path or a builtin: drop them")

    def describe(self) -> str:
        """The source, or the mixture's sources with their weights."""
        if self.mixture is None:
            return str(self.source)
        return "mixture of " + ", ".join(f"{c.source} (weight {w:g})" for c, w in self.components())

    def components(self) -> list[tuple["DataConfig", float]]:
        """A mixture's sources as (DataConfig, weight) pairs; a plain config is its own single component."""
        if self.mixture is None:
            return [(self, 1.0)]
        if not isinstance(self.mixture, (list, tuple)) or not self.mixture:
            raise DataError("DataConfig.mixture must be a non-empty list of {source: ..., weight: ...} mappings")
        shared = {"seq_len", "batch_size", "seed", "cache_dir", "streaming"}
        own = {f.name for f in fields(DataConfig)} - shared - {"mixture"}
        out = []
        for i, entry in enumerate(self.mixture):
            if not isinstance(entry, dict) or "source" not in entry:
                raise DataError(f"DataConfig.mixture[{i}] must be a mapping with a 'source', got {entry!r}")
            unknown = sorted(set(entry) - own - {"weight"})
            if unknown:
                raise DataError(f"DataConfig.mixture[{i}] has unknown field(s) {unknown}; a component may set "
                                 f"weight and {sorted(own)} (shared: {sorted(shared)})")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                    or weight == float("inf"):
                raise DataError(f"DataConfig.mixture[{i}].weight must be a positive number, got {weight!r}")
            values = {f.name: getattr(self, f.name) for f in fields(DataConfig) if f.name != "mixture"}
            values.update({k: v for k, v in entry.items() if k != "weight"})   # the mixture's fields are defaults
            out.append((DataConfig(**values), float(weight)))
        if self.streaming:
            raise DataError("DataConfig.mixture does not stream yet: set streaming: false")
        return out


def is_hub_source(source: str) -> bool:
    """True when ``source`` names a Hub dataset (not a builtin, not a local file or folder)."""
    if source.startswith("builtin:"):
        return False
    path = Path(source).expanduser()
    return not (path.exists() or source.startswith(("/", ".", "~")) or path.suffix in LOCAL_BUILDERS)


def seeded_generator(seed: int, epoch: int) -> torch.Generator:
    """The torch generator of every seeded order: the same ``(seed, epoch)`` gives the same order anywhere."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

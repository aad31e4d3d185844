"""The settings of a trace store: which layers, targets, horizons, what precision, how many rows per shard.

The recipe's ``trace:`` section (:mod:`trimkv.recipe`) has these fields, plus ``out``; ``trimkv trace`` options
override them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .targets import TARGETS

STORE_DTYPE_NAMES = ("float16", "bfloat16")

RECON_PROMPT = "\n\nRepeat the previous context exactly.\n\n"


@dataclass
class TraceSettings:
    """What a store holds (the recipe's ``trace:`` section has the same fields, plus ``out``).

    ``layers``: decoder layers traced (empty = all). ``hidden_layers``: layers whose attention input x is kept too
    (large: T x hidden per row and layer; empty = none). ``targets``: among :data:`~trimkv.trace.targets.TARGETS`
    (``future`` always; ``recon`` adds a second pass). ``horizons``: one ``future@<h>`` target each. ``dtype``: the
    16-bit float of keys, values, x and targets. ``shard_rows``: rows per shard (the unit of resume).
    ``query_chunk``: queries per attention block (memory O(chunk x T) per layer). ``recon_prompt``: what the model
    reads between the row and its repetition (``recon``)."""

    rows: int = 64
    layers: tuple[int, ...] = ()
    hidden_layers: tuple[int, ...] = ()
    targets: tuple[str, ...] = ("future", "answer")
    horizons: tuple[int, ...] = (16, 64, 256)
    dtype: str = "float16"
    shard_rows: int = 8
    query_chunk: int = 256
    recon_prompt: str = RECON_PROMPT

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise DataError(f"unknown trace target(s) {unknown}: choose from {list(TARGETS)} (future@<h> comes "
                             "from the horizons)")
        if self.dtype not in STORE_DTYPE_NAMES:
            raise DataError(f"trace dtype {self.dtype!r}: choose one of {list(STORE_DTYPE_NAMES)}")
        for name in ("rows", "shard_rows", "query_chunk"):
            if getattr(self, name) < 1:
                raise DataError(f"trace {name} must be >= 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.horizons) or len(set(self.horizons)) != len(self.horizons):
            raise DataError(f"trace horizons must be distinct positive integers, got {list(self.horizons)}")

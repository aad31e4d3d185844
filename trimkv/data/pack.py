"""Documents into rows: each row a dict of ``input_ids``, ``position_ids`` and ``loss_mask`` lists.

- **Packing** (``pack=True``) concatenates the token streams of consecutive documents and cuts
  them into rows of exactly ``seq_len`` tokens, so no compute is spent on padding. A document that
  crosses a row boundary, or is longer than ``seq_len``, continues in the next row as a new piece
  that restarts at position 0 (its first token there is not a target: the context it would be
  predicted from is in another row). The last, partial row is dropped.
- **No packing** (``pack=False``): one document per row, at most ``seq_len`` tokens (``too_long``, applied by
  :func:`~trimkv.data.tokenize.tokenized_documents`); :mod:`trimkv.data.batch` right-pads the rows of a batch.

``position_ids`` restart at 0 at each document (piece): the attention reads document boundaries from them, so packed
documents never attend to each other.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from .config import DataConfig
from .tokenize import tokenized_documents


def pack_documents(docs: Iterable[dict], seq_len: int) -> Iterator[dict]:
    """Concatenate documents and cut rows of exactly ``seq_len`` tokens.

    ``docs``: dicts with ``input_ids`` [n] and ``target`` [n]. Yields dicts of lists, each [seq_len]:
    ``input_ids``, ``position_ids`` (0 at each document piece's first token), ``loss_mask``. A
    document that does not fit in the current row continues in the next one as a new piece starting
    at position 0 (first token not a target). The last, partial row is dropped.
    """
    row = _empty_row()
    for doc in docs:
        ids, target, start = doc["input_ids"], doc["target"], 0
        while start < len(ids):
            take = min(seq_len - len(row["input_ids"]), len(ids) - start)
            row["input_ids"] += ids[start: start + take]
            row["position_ids"] += range(take)
            row["loss_mask"] += [False] + list(target[start + 1: start + take])
            start += take
            if len(row["input_ids"]) == seq_len:
                yield row
                row = _empty_row()


def _empty_row() -> dict:
    return {"input_ids": [], "position_ids": [], "loss_mask": []}


def _unpacked_rows(docs: Iterable[dict]) -> Iterator[dict]:
    """One row per document (``pack=False``); lengths vary, at most ``seq_len``."""
    for doc in docs:
        yield {"input_ids": doc["input_ids"], "position_ids": list(range(len(doc["input_ids"]))),
               "loss_mask": [False] + list(doc["target"][1:])}


def source_rows(cfg: DataConfig, tokenizer) -> Iterator[dict]:
    """The rows of ``cfg``'s documents: packed into ``seq_len`` tokens each, or one per document."""
    docs = tokenized_documents(cfg, tokenizer)
    return pack_documents(docs, cfg.seq_len) if cfg.pack else _unpacked_rows(docs)

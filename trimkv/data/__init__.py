"""Training data: load documents, tokenise them, pack them into rows, batch the rows.

Every batch the training loop sees is a dict of ``input_ids``, ``position_ids`` and ``loss_mask``, each ``[B, T]``
(:mod:`.batch` says what each holds). Read in this order:

* :mod:`.config`   - ``DataConfig``, validated when built, and the values its fields take.
* :mod:`.sources`  - which documents a source yields: a Hub dataset, local files, or a built-in.
* :mod:`.builtin`  - the offline built-in sources, made from :mod:`.corpus` (the standard library's docs) and
  :mod:`.synthqa` (synthetic long-context QA).
* :mod:`.tokenize` - one document into token ids and targets (plain text, completions, chat).
* :mod:`.pack`     - documents into rows: packed into ``seq_len`` tokens, or one per document.
* :mod:`.batch`    - the cached rows, their order per epoch, ranks, and ``[B, T]`` batches.

Each decision is tested in ``tests/test_data.py``. The names below are imported on first use, so the torch-free
modules (:mod:`.corpus`, :mod:`.synthqa`) can be read without loading torch (the command line's help does).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import DataError

# public name -> the module that defines it
_EXPORTS = {
    "DataConfig": ".config", "FORMATS": ".config", "TOO_LONG": ".config", "LOCAL_BUILDERS": ".config",
    "is_hub_source": ".config",
    "BUILTIN_SOURCES": ".builtin", "QA_DOCUMENTS": ".builtin",
    "SPANS_COLUMN": ".tokenize", "tokenize_document": ".tokenize",
    "CACHE_VERSION": ".batch", "SHUFFLE_BUFFER_ROWS": ".batch", "build_dataset": ".batch", "prepare_data": ".batch",
    "epoch_rows": ".batch", "num_batches": ".batch", "batches": ".batch",
    "hub_dataset_ids": ".sources", "load_documents": ".sources",
    "pack_documents": ".pack",
}

__all__ = ["DataConfig", "DataError", "FORMATS", "TOO_LONG", "LOCAL_BUILDERS", "BUILTIN_SOURCES", "QA_DOCUMENTS",
           "SPANS_COLUMN", "CACHE_VERSION", "SHUFFLE_BUFFER_ROWS", "is_hub_source", "hub_dataset_ids",
           "load_documents", "tokenize_document", "pack_documents", "build_dataset", "prepare_data", "epoch_rows",
           "num_batches", "batches"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trimkv.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .batch import CACHE_VERSION, SHUFFLE_BUFFER_ROWS, batches, build_dataset, epoch_rows, num_batches, prepare_data
    from .builtin import BUILTIN_SOURCES, QA_DOCUMENTS
    from .config import FORMATS, LOCAL_BUILDERS, TOO_LONG, DataConfig, is_hub_source
    from .pack import pack_documents
    from .sources import hub_dataset_ids, load_documents
    from .tokenize import SPANS_COLUMN, tokenize_document

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

Each decision is tested in ``tests/test_data.py``.
"""
from ..errors import DataError
from .batch import CACHE_VERSION, SHUFFLE_BUFFER_ROWS, batches, build_dataset, epoch_rows, num_batches, prepare_data
from .builtin import BUILTIN_SOURCES, QA_DOCUMENTS
from .config import FORMATS, LOCAL_BUILDERS, TOO_LONG, DataConfig, is_hub_source
from .pack import pack_documents
from .sources import hub_dataset_ids, load_documents
from .tokenize import SPANS_COLUMN, tokenize_document

__all__ = ["DataConfig", "DataError", "FORMATS", "TOO_LONG", "LOCAL_BUILDERS", "BUILTIN_SOURCES", "QA_DOCUMENTS",
           "SPANS_COLUMN", "CACHE_VERSION", "SHUFFLE_BUFFER_ROWS", "is_hub_source", "hub_dataset_ids",
           "load_documents", "tokenize_document", "pack_documents", "build_dataset", "prepare_data", "epoch_rows",
           "num_batches", "batches"]

"""Training data: load documents, tokenise them, pack them into rows, batch the rows.

Every batch the training loop sees is a dict of three tensors of the same shape ``[B, T]``:

- ``input_ids``    int64  token ids.
- ``position_ids`` int64  position of the token inside its document: 0 at each packed document's
  first token, then 1, 2, ... The attention reads document boundaries from these (a new document
  starts wherever ``position_ids == 0``), so packed documents never attend to each other.
- ``loss_mask``    bool   True where ``input_ids[b, t]`` is a *target*: a token the model predicts
  from position ``t - 1``. A document's first token is never a target. Plain text: every other token
  is a target. Chat: only the assistant replies are, including the end-of-turn token that closes
  each reply (so the model learns to stop); system / user tokens and the role headers are not.

Decisions (each is tested in ``tests/test_data.py``):

- **Packing** (``pack=True``) concatenates the token streams of consecutive documents and cuts
  them into rows of exactly ``seq_len`` tokens, so no compute is spent on padding. A document that
  crosses a row boundary, or is longer than ``seq_len``, continues in the next row as a new piece
  that restarts at position 0 (its first token there is not a target: the context it would be
  predicted from is in another row). The last, partial row is dropped.
- **No packing** (``pack=False``): one document per row; rows of a batch are right-padded to the
  longest row with the pad token (positions keep counting, ``loss_mask`` False on padding).
  ``too_long`` says what happens to a document longer than ``seq_len``: ``"truncate"`` keeps its
  first ``seq_len`` tokens (with packing nothing is truncated: the document continues in the next
  rows), ``"drop"`` skips it, ``"error"`` raises; the last two apply with or without packing.
- **Plain text** is tokenised with the tokenizer's special tokens (BOS where the model uses one)
  and the EOS token appended, so a document's end is a target too. A ``.txt`` file is one document.
- **Chat** rows are rendered with ``tokenizer.apply_chat_template(..., tokenize=False)`` and
  tokenised once, with character offsets. Assistant spans come from the template itself: when it
  marks them with ``{% generation %}`` we use ``return_assistant_tokens_mask``; otherwise we render
  prefixes of the conversation (``messages[:k]`` with the generation prompt = where reply k starts,
  ``messages[:k+1]`` = where it ends, trailing whitespace after the end-of-turn token excluded)
  and mark every token that overlaps such a span. This works for any template whose renders of a
  prefix are prefixes of the full render (ChatML, Llama 3, Mistral, Gemma, ...); other templates
  raise a DataError that says so.
- **Order**: the packed rows are cached on disk (see ``build_dataset``) and shuffled per epoch with
  a generator seeded by ``(seed, epoch)``; ``skip_batches`` skips what a resumed run already saw.
  Streaming keeps a shuffle buffer of rows instead, seeded the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import DataError

FORMATS = ("auto", "text", "chat", "completion")
TOO_LONG = ("truncate", "drop", "error")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
SHUFFLE_BUFFER_ROWS = 1024  # streaming shuffle buffer, in packed rows
BUILTIN_SOURCES = ("prose", "prose-long", "prose-recall", "prose-facts", "qa", "qa-plain")
QA_DOCUMENTS = 2048  # documents a builtin:qa source generates (max_samples overrides)
SPANS_COLUMN = "target_spans"  # optional with format text: [[start, end), ...] character spans that are the targets
CACHE_VERSION = 1  # bump when the tokenisation or packing rules change
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")




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

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "seed", "max_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DataError(f"DataConfig.{name} must be an integer, got {value!r}")
        for name in ("pack", "streaming"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.format not in FORMATS:
            raise DataError(f"DataConfig.format={self.format!r}: choose one of {FORMATS}")
        if self.too_long not in TOO_LONG:
            raise DataError(f"DataConfig.too_long={self.too_long!r}: choose one of {TOO_LONG}")
        if self.seq_len < 2:
            raise DataError(f"DataConfig.seq_len={self.seq_len}: need at least 2 tokens per row")
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


# ----------------------------------------------------------------------------- loading


def is_hub_source(source: str) -> bool:
    """True when ``source`` names a Hub dataset (not a builtin, not a local file or folder)."""
    if source.startswith("builtin:"):
        return False
    path = Path(source).expanduser()
    return not (path.exists() or source.startswith(("/", ".", "~")) or path.suffix in LOCAL_BUILDERS)


def hub_dataset_ids(cfg: DataConfig) -> list[str]:
    """The Hub datasets a config (or mixture) reads, in order, once each (for model cards)."""
    ids = [c.source for c, _ in cfg.components() if is_hub_source(c.source)]
    return list(dict.fromkeys(ids))


def _local_files(source: str) -> list[Path] | None:
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


def load_documents(cfg: DataConfig, tokenizer=None):
    """Raw rows of ``cfg.source``: a ``datasets.Dataset``, or an ``IterableDataset`` when streaming.
    (``tokenizer``: the builtin QA sources fit their documents to ``seq_len`` tokens with it.)"""
    import datasets

    if cfg.source.startswith("builtin:"):
        docs = _builtin_documents(cfg, tokenizer)
        ds = datasets.Dataset.from_list(docs) if docs and isinstance(docs[0], dict) else \
            datasets.Dataset.from_dict({"text": docs})
        ds = ds.to_iterable_dataset() if cfg.streaming else ds
    elif (files := _local_files(cfg.source)) is not None:
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
            raise DataError(f"{cfg.source} could not be read as {builder}: {cause}") from err
    else:
        ds = datasets.load_dataset(cfg.source, name=cfg.config_name, revision=cfg.revision, split=cfg.split,
                                   streaming=cfg.streaming)
    if cfg.max_samples is not None and not cfg.source.startswith("builtin:qa"):
        ds = ds.take(cfg.max_samples) if cfg.streaming else ds.select(
            range(min(cfg.max_samples, len(ds))))
    return ds


def _builtin_documents(cfg: DataConfig, tokenizer=None) -> list[str] | list[dict]:
    """Documents of a ``builtin:<name>`` source.

    ``builtin:prose``: one document per docstring (short: ~100 tokens each).
    ``builtin:prose-long``: the same text, shuffled by ``cfg.seed`` and joined into documents of about
    ``2 * seq_len`` tokens, so that attention (and retention) spans whole training rows.
    ``builtin:prose-recall``: documents of ~``seq_len`` tokens ending in a copy of an earlier paragraph.
    ``builtin:prose-facts``: documents of ~0.9 ``seq_len`` tokens with made-up facts recalled far later (see
    :func:`_with_facts`); use it with ``pack: false`` so that no fact is cut off from its recall.
    ``builtin:qa`` / ``builtin:qa-plain``: long-context QA documents of at most ``seq_len`` tokens, chat / plain
    text with the answers as the only targets (:mod:`trimkv.synthqa`); ``max_samples`` documents (default
    :data:`QA_DOCUMENTS`). Use them with ``pack: false``.
    """
    name = cfg.source.split(":", 1)[1]
    if name not in BUILTIN_SOURCES:
        raise DataError(f"unknown builtin source {cfg.source!r}: choose one of "
                        f"{['builtin:' + n for n in BUILTIN_SOURCES]}")
    from trimkv.corpus import prose_documents  # lazy: the corpus is only needed for this source

    docs = prose_documents(cfg.split)
    if name == "prose":
        return docs
    if name in ("qa", "qa-plain"):
        if tokenizer is None:
            raise DataError(f"{cfg.source} fits its documents to seq_len tokens: it needs the tokenizer")
        from trimkv.synthqa import qa_documents

        paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
        try:
            return qa_documents(paragraphs, tokenizer, length=cfg.seq_len, n_docs=cfg.max_samples or QA_DOCUMENTS,
                                chat=name == "qa", seed=cfg.seed)
        except ValueError as err:
            raise DataError(f"{cfg.source}: {err}") from err
    # characters of docstrings per training token, and how a group of docstrings becomes one document
    chars_per_token, build = {
        "prose-long": (8, lambda parts, i: "\n\n".join(parts)),
        "prose-recall": (3, _with_recall),
        "prose-facts": (2.7, lambda parts, i: _with_facts(parts, random.Random(cfg.seed * 100_003 + i))),
    }[name]
    target_chars = chars_per_token * cfg.seq_len
    order = torch.randperm(len(docs), generator=_generator(cfg.seed, -1)).tolist()
    joined, current = [], []
    for i in order:
        current.append(docs[i])
        if sum(map(len, current)) >= target_chars:
            joined.append(build(current, i))
            current = []
    if current:
        joined.append("\n\n".join(current))
    return joined


def _with_recall(parts: list[str], seed: int) -> str:
    """``builtin:prose-recall``: the joined text, then a verbatim copy of one paragraph from its first half.

    The copy is predictable only from the earlier occurrence, so the distillation loss rewards gates that keep
    informative tokens of earlier text (numbers, names) alive, a long-range signal ordinary prose rarely has.
    Measured once on SmolLM2 (150 steps x 512 tokens, M=64): passkey at 2k stayed at 0/8, like ``prose-long``.
    """
    text = "\n\n".join(parts)
    paragraphs = [p for p in text[: len(text) // 2].split("\n\n") if 80 <= len(p) <= 400]
    if not paragraphs:
        return text
    return text + "\n\n" + paragraphs[seed % len(paragraphs)]


# ``builtin:prose-facts``. The wording is our own and shares nothing with the evaluation tasks of trimkv.eval.tasks
# (no "pass key", "magic number", "VAR", JSON or UUIDs; the prose comes from the corpus's train split, the evaluation
# haystacks from its eval split or from filler sentences). tests/test_data.py checks this.
_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vas", "el", "dun", "pri", "sol", "ba", "qu", "zen", "fa", "ri", "mo")
_ATTRIBUTES = ("room number", "order number", "badge number", "serial number", "ticket number", "account number",
               "locker code", "invoice number", "phone extension", "batch code", "shelf mark", "seat number")
_STATEMENTS = ("Note that the {attr} of {name} is {value}.", "{name}'s {attr} is {value}.",
               "For the record, {name} was given {attr} {value}.", "The {attr} assigned to {name} is {value}.")
_RECALLS = ("To recap, the {attr} of {name} is {value}.", "As noted earlier, {name}'s {attr} is {value}.",
            "Recall that {name} was given {attr} {value}.", "Once more: the {attr} assigned to {name} is {value}.")


def _made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def _with_facts(parts: list[str], rng: random.Random, num_facts: int = 5) -> str:
    """``builtin:prose-facts``: the joined paragraphs with ``num_facts`` made-up facts ("<name>'s <attribute> is
    <value>") inserted in the first 60% of the text, each restated once at least 30% of the text later.

    A restated value (a 3-7 digit number or a made-up word) is predictable only from its statement, hundreds of
    tokens back, so the distillation loss pays for keeping those few tokens in a budget far smaller than the
    text - the skill a memory-bounded cache needs - while the prose around them stays ordinary text.
    """
    paragraphs = "\n\n".join(parts).split("\n\n")
    inserts: list[tuple[float, int, str]] = []   # (depth, order, sentence); order keeps a statement first
    for _ in range(num_facts):
        name = f"{_made_up_word(rng, 2).title()} {_made_up_word(rng, 3).title()}"
        attr = rng.choice(_ATTRIBUTES)
        value = (str(rng.randint(10 ** (d := rng.randint(3, 7)) // 10, 10 ** d - 1)) if rng.random() < 0.75
                 else _made_up_word(rng, 3))
        said = rng.uniform(0.0, 0.6)
        inserts.append((said, 0, rng.choice(_STATEMENTS).format(attr=attr, name=name, value=value)))
        inserts.append((rng.uniform(said + 0.3, 1.0), 1, rng.choice(_RECALLS).format(attr=attr, name=name,
                                                                                    value=value)))
    extra: list[list[str]] = [[] for _ in paragraphs]
    for depth, _, sentence in sorted(inserts):   # appended at the end of the paragraph at that depth, in order
        extra[min(int(depth * len(paragraphs)), len(paragraphs) - 1)].append(sentence)
    return "\n\n".join(" ".join([p, *e]) for p, e in zip(paragraphs, extra))


def _resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    """``"text"`` or ``"chat"`` for a dataset with these columns; DataError if a column is missing."""
    fmt = cfg.format
    if fmt == "auto":
        fmt = ("chat" if cfg.messages_column in columns
               else "completion" if cfg.prompt_column in columns and cfg.completion_column in columns
               else "text" if cfg.text_column in columns else None)
        if fmt is None:
            raise DataError(
                f"{cfg.source} has no {cfg.messages_column!r}, {cfg.prompt_column!r} + "
                f"{cfg.completion_column!r} or {cfg.text_column!r} column (it has {columns}): set "
                "DataConfig.messages_column, .prompt_column / .completion_column or .text_column")
    needed = {"text": [("text_column", cfg.text_column)], "chat": [("messages_column", cfg.messages_column)],
              "completion": [("prompt_column", cfg.prompt_column), ("completion_column", cfg.completion_column)]}
    for field_name, column in needed[fmt]:
        if column not in columns:
            raise DataError(f"{cfg.source} has no column {column!r} for format={fmt!r} "
                            f"(it has {columns}): set DataConfig.{field_name}")
    return fmt


# ----------------------------------------------------------------------------- tokenising


def tokenize_document(example: dict, tokenizer, cfg: DataConfig) -> dict:
    """One raw row -> ``{"input_ids": list[int] [n], "target": list[bool] [n]}``.

    ``target[i]`` is True where token i is trained on (predicted from token i - 1); ``target[0]``
    is always False. ``cfg.format="auto"`` is resolved from this row's keys.
    """
    fmt = cfg.format if cfg.format != "auto" else _resolve_format(cfg, list(example))
    if fmt == "chat":
        ids, target = _tokenize_chat(example[cfg.messages_column], tokenizer)
    elif fmt == "completion":
        prompt, completion = example[cfg.prompt_column], example[cfg.completion_column]
        _check_str(prompt, cfg.prompt_column), _check_str(completion, cfg.completion_column)
        ids, target = _tokenize_spans(prompt + completion, [[len(prompt), len(prompt) + len(completion)]],
                                      tokenizer)
    elif example.get(SPANS_COLUMN) is not None:                 # text whose targets are character spans
        ids, target = _tokenize_spans(example[cfg.text_column], example[SPANS_COLUMN], tokenizer)
    else:
        ids = tokenizer(example[cfg.text_column], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        target = [True] * len(ids)
    if target:
        target[0] = False
    return {"input_ids": list(ids), "target": target}


def _check_str(value, column: str, where: str = "") -> None:
    if not isinstance(value, str):
        at = f"{where}: " if where else ""
        raise DataError(f"{at}column {column!r} must hold strings, got {type(value).__name__}: {value!r:.80}")


def _tokenize_spans(text: str, spans, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids [n] of ``text`` (special tokens as the tokenizer adds them) and whether each overlaps one of the
    ``[start, end)`` character ``spans``; an EOS is appended (not a target) so the document ends visibly."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    target = _overlaps(offsets, sorted((int(a), int(b)) for a, b in spans))
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        target.append(False)
    return ids, target


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids [n] and assistant mask [n] of one conversation (see the module docstring)."""
    if tokenizer.chat_template is None:
        raise DataError("chat data needs a tokenizer with a chat_template: set "
                        "tokenizer.chat_template, or use DataConfig.format='text'")
    if _GENERATION_TAG.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text, spans = _assistant_char_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _overlaps(enc["offset_mapping"], spans)


def _assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Full render of ``messages`` and the ``[start, end)`` character span of each assistant reply."""
    def render(msgs, prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(
                "this chat template renders a conversation prefix differently from the start of "
                "the whole conversation, so assistant tokens cannot be located by prefix renders; "
                "use a template that marks replies with {% generation %} ... {% endgeneration %}")
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return full, spans


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's character span [n], whether it overlaps one of the sorted ``spans``."""
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        mask.append(j < len(spans) and start < spans[j][1] and end > spans[j][0])
    return mask


def _iter_tokenized(cfg: DataConfig, tokenizer) -> Iterator[dict]:
    """Tokenised documents of ``cfg.source``, with empty rows skipped and ``too_long`` applied."""
    ds = load_documents(cfg, tokenizer)
    columns = ds.column_names
    if columns is None:  # streaming without known features: look at the first row
        columns = list(next(iter(ds), {}).keys())
    tcfg = DataConfig(**{**asdict(cfg), "format": _resolve_format(cfg, columns)})
    untrained = seen = 0
    for index, example in enumerate(ds):
        seen += 1
        if tcfg.format == "text":
            text = example[tcfg.text_column]
            if text is not None:
                _check_str(text, tcfg.text_column, f"{cfg.source} row {index}")
            if not (text or "").strip():
                continue
        if tcfg.format == "chat" and not any(
                m.get("role") == "assistant" for m in example[tcfg.messages_column] or []):
            raise DataError(f"{cfg.source} row {index} has no assistant message, so it has "
                            "nothing to train on: remove such rows or use format='text'")
        doc = tokenize_document(example, tokenizer, tcfg)
        if len(doc["input_ids"]) > cfg.seq_len:
            if cfg.too_long == "error":
                raise DataError(f"{cfg.source} row {index} has {len(doc['input_ids'])} tokens > "
                                f"seq_len={cfg.seq_len}: raise DataConfig.seq_len or set "
                                "too_long='truncate' / 'drop'")
            if cfg.too_long == "drop":
                continue
            if not cfg.pack:
                doc = {k: v[: cfg.seq_len] for k, v in doc.items()}
        if len(doc["input_ids"]) < 2:
            continue
        if not any(doc["target"][1:]):             # nothing to train on: empty replies, or cut off at seq_len
            untrained += 1
            continue
        yield doc
    if untrained:
        warnings.warn(f"{cfg.source}: {untrained} of {seen} documents have no target token (empty replies or "
                      f"completions, or targets cut off at seq_len={cfg.seq_len} with pack=false) and are skipped; "
                      "raise DataConfig.seq_len if they were truncated", stacklevel=2)


# ----------------------------------------------------------------------------- packing


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


def _rows(cfg: DataConfig, tokenizer) -> Iterator[dict]:
    docs = _iter_tokenized(cfg, tokenizer)
    return pack_documents(docs, cfg.seq_len) if cfg.pack else _unpacked_rows(docs)


# ----------------------------------------------------------------------------- cache


def build_dataset(cfg: DataConfig, tokenizer) -> list[dict]:
    """All rows of ``cfg`` as dicts of 1-D tensors [T] (``input_ids`` int32, ``position_ids`` int32,
    ``loss_mask`` bool); cached under ``cfg.cache_dir`` and reloaded without tokenising again.

    The cache key hashes the config fields that change the rows, the tokenizer (name, vocabulary,
    chat template) and, for local files, their paths, sizes and modification times.
    """
    path = _cache_path(cfg, tokenizer)
    if path.exists():
        return _split_rows(torch.load(path, weights_only=True))
    rows = list(_rows(cfg, tokenizer))
    if not rows:
        raise DataError(f"{cfg.source} gave no training rows: it is empty after filtering, or has "
                        f"fewer than seq_len={cfg.seq_len} tokens in all (pack={cfg.pack})")
    flat = _flatten_rows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(flat, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    return _split_rows(flat)


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
    fields = {k: v for k, v in asdict(cfg).items()
              if k not in ("batch_size", "seed", "streaming", "cache_dir")}
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
        import trimkv.corpus

        digest = hashlib.sha256(Path(trimkv.corpus.__file__).read_bytes()).hexdigest()
        grouped = cfg.source != "builtin:prose"   # the seed groups documents; data.py builds them
        builder = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        if cfg.source.startswith("builtin:qa"):
            import trimkv.synthqa

            builder += hashlib.sha256(Path(trimkv.synthqa.__file__).read_bytes()).hexdigest()
        return [digest, cfg.seed, CACHE_VERSION + 1, builder] if grouped else [digest]
    files = _local_files(cfg.source)
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
    g = _generator(cfg.seed, epoch)
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
    for row in _rows(cfg, tokenizer):
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


def _generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

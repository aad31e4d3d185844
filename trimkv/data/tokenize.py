"""Tokenising one document: token ids and which of them are targets (trained on).

- **Plain text** is tokenised with the tokenizer's special tokens (BOS where the model uses one)
  and the EOS token appended, so a document's end is a target too. A ``.txt`` file is one document.
  A ``target_spans`` column (``[[start, end), ...]`` character spans) makes only those characters targets.
- **Completion** rows (``prompt`` + ``completion``): the completion is the target.
- **Chat** rows are rendered with ``tokenizer.apply_chat_template(..., tokenize=False)`` and
  tokenised once, with character offsets. Assistant spans come from the template itself: when it
  marks them with ``{% generation %}`` we use ``return_assistant_tokens_mask``; otherwise we render
  prefixes of the conversation (``messages[:k]`` with the generation prompt = where reply k starts,
  ``messages[:k+1]`` = where it ends, trailing whitespace after the end-of-turn token excluded)
  and mark every token that overlaps such a span. This works for any template whose renders of a
  prefix are prefixes of the full render (ChatML, Llama 3, Mistral, Gemma, ...); other templates
  raise a DataError that says so. Only the assistant replies are targets, including the end-of-turn
  token that closes each reply (so the model learns to stop).

:func:`tokenized_documents` applies this to every row of a source. ``too_long`` says what happens to a document
longer than ``seq_len``: ``"truncate"`` keeps its first ``seq_len`` tokens (with packing nothing is truncated: the
document continues in the next rows), ``"drop"`` skips it, ``"error"`` raises; the last two apply with or without
packing.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import asdict
from typing import Iterator

from ..errors import DataError
from .config import DataConfig
from .sources import first_problem, load_documents, local_files

SPANS_COLUMN = "target_spans"  # optional with format text: [[start, end), ...] character spans that are the targets
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


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


def tokenized_documents(cfg: DataConfig, tokenizer) -> Iterator[dict]:
    """Tokenised documents of ``cfg.source``, ``too_long`` applied. Every row the source holds is accounted for: a
    row without the field its format needs is an error naming it (or, with ``skip_incomplete``, skipped), and each
    kind of skipped row is counted in one warning at the end (``N of M rows skipped: ...``)."""
    ds = load_documents(cfg, tokenizer)
    columns = ds.column_names
    if columns is None:  # streaming without known features: look at the first row
        columns = list(next(iter(ds), {}).keys())
    tcfg = DataConfig(**{**asdict(cfg), "format": _resolve_format(cfg, columns)})
    needed = {"text": [tcfg.text_column], "chat": [tcfg.messages_column],
              "completion": [tcfg.prompt_column, tcfg.completion_column]}[tcfg.format]
    skipped: Counter[str] = Counter()
    seen = 0
    for index, example in enumerate(_rows(ds, cfg)):
        seen += 1
        where = f"{cfg.source} row {index + 1}"
        missing = [c for c in needed if example.get(c) is None]
        if missing:
            if not cfg.skip_incomplete:
                raise DataError(f"{where} has no {missing[0]!r} field (format={tcfg.format!r} reads "
                                f"{', '.join(map(repr, needed))}): fix the row, point DataConfig.{_FIELD_OF[tcfg.format]} "
                                "at the right column, or set skip_incomplete: true to skip such rows with a count")
            skipped[f"no {missing[0]!r} field"] += 1
            continue
        if tcfg.format == "text":
            _check_str(example[tcfg.text_column], tcfg.text_column, where)
            if not example[tcfg.text_column].strip():
                skipped[f"empty {tcfg.text_column!r}"] += 1
                continue
        if tcfg.format == "chat":
            _check_messages(example[tcfg.messages_column], tcfg.messages_column, where)
            if not any(m["role"] == "assistant" for m in example[tcfg.messages_column]):
                raise DataError(f"{where} has no assistant message, so it has nothing to train on: remove such rows "
                                "or use format='text'")
        doc = tokenize_document(example, tokenizer, tcfg)
        if len(doc["input_ids"]) > cfg.seq_len:
            if cfg.too_long == "error":
                raise DataError(f"{where} has {len(doc['input_ids'])} tokens > seq_len={cfg.seq_len}: raise "
                                "DataConfig.seq_len or set too_long='truncate' / 'drop'")
            if cfg.too_long == "drop":
                skipped[f"longer than seq_len={cfg.seq_len} (too_long='drop')"] += 1
                continue
            if not cfg.pack:
                doc = {k: v[: cfg.seq_len] for k, v in doc.items()}
        if len(doc["input_ids"]) < 2:
            skipped["shorter than 2 tokens"] += 1
            continue
        if not any(doc["target"][1:]):             # nothing to train on: empty replies, or cut off at seq_len
            skipped["untrained"] += 1
            continue
        yield doc
    untrained = skipped.pop("untrained", 0)
    if skipped:
        warnings.warn(f"{cfg.source}: " + "; ".join(f"{n} of {seen} rows skipped: {why}" for why, n in skipped.items()),
                      stacklevel=2)
    if untrained:
        warnings.warn(f"{cfg.source}: {untrained} of {seen} documents have no target token (empty replies or "
                      f"completions, or targets cut off at seq_len={cfg.seq_len} with pack=false) and are skipped; "
                      "raise DataConfig.seq_len if they were truncated", stacklevel=2)


def _rows(ds, cfg: DataConfig) -> Iterator[dict]:
    """The rows of ``ds``; text that turns out not to be UTF-8 while reading (datasets decodes lazily) is a
    DataError naming the file and the line."""
    it = iter(ds)
    while True:
        try:
            example = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as err:
            files = local_files(cfg.source) or []
            raise DataError(f"{cfg.source} could not be read: " + (first_problem(files) or f"not UTF-8 text ({err})")) \
                from None
        yield example


_FIELD_OF = {"text": "text_column", "chat": "messages_column", "completion": "prompt_column / completion_column"}


def _check_messages(messages, column: str, where: str) -> None:
    """A conversation must be a non-empty list of ``{"role": str, "content": str}`` mappings."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: column {column!r} must hold a non-empty list of {{'role': ..., 'content': ...}} "
                        f"messages, got {type(messages).__name__}: {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {column}[{i}] must be a mapping with string 'role' and 'content', got "
                            f"{type(m).__name__}: {m!r:.80}")

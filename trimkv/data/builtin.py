"""The offline built-in sources (``data.source: builtin:<name>``): documents made from the prose corpus shipped with
every Python (:mod:`trimkv.data.corpus`), nothing downloaded.

* ``builtin:prose``       - one document per standard-library docstring.
* ``builtin:prose-long``  - the same text joined into documents of about two training rows.
* ``builtin:prose-facts`` - long documents with made-up facts restated far later (a long-range signal).
* ``builtin:qa`` / ``builtin:qa-plain`` - synthetic long-context QA, chat / plain text (:mod:`trimkv.data.synthqa`).
"""
from __future__ import annotations

import random

import torch

from ..errors import DataError
from .config import DataConfig, seeded_generator
from .corpus import prose_documents
from .synthqa import SYLLABLES, qa_documents

BUILTIN_SOURCES = ("prose", "prose-long", "prose-facts", "qa", "qa-plain")
QA_DOCUMENTS = 2048  # documents a builtin:qa source generates (max_samples overrides)


def builtin_documents(cfg: DataConfig, tokenizer=None) -> list[str] | list[dict]:
    """Documents of a ``builtin:<name>`` source.

    ``builtin:prose``: one document per docstring (short: ~100 tokens each).
    ``builtin:prose-long``: the same text, shuffled by ``cfg.seed`` and joined into documents of about
    ``2 * seq_len`` tokens, so that attention (and retention) spans whole training rows.
    ``builtin:prose-facts``: documents of ~0.9 ``seq_len`` tokens with made-up facts recalled far later (see
    :func:`_with_facts`); use it with ``pack: false`` so that no fact is cut off from its recall.
    ``builtin:qa`` / ``builtin:qa-plain``: long-context QA documents of at most ``seq_len`` tokens, chat / plain
    text with the answers as the only targets (:mod:`trimkv.data.synthqa`); ``max_samples`` documents (default
    :data:`QA_DOCUMENTS`). Use them with ``pack: false``.
    """
    name = cfg.source.split(":", 1)[1]
    if name not in BUILTIN_SOURCES:
        raise DataError(f"unknown builtin source {cfg.source!r}: choose one of "
                        f"{['builtin:' + n for n in BUILTIN_SOURCES]}")
    docs = prose_documents(cfg.split)
    if name == "prose":
        return docs
    if name in ("qa", "qa-plain"):
        if tokenizer is None:
            raise DataError(f"{cfg.source} fits its documents to seq_len tokens: it needs the tokenizer")
        paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
        try:
            return qa_documents(paragraphs, tokenizer, length=cfg.seq_len, n_docs=cfg.max_samples or QA_DOCUMENTS,
                                chat=name == "qa", seed=cfg.seed)
        except ValueError as err:
            raise DataError(f"{cfg.source}: {err}") from err
    # characters of docstrings per training token, and how a group of docstrings becomes one document
    chars_per_token, build = {
        "prose-long": (8, lambda parts, i: "\n\n".join(parts)),
        "prose-facts": (2.7, lambda parts, i: _with_facts(parts, random.Random(cfg.seed * 100_003 + i))),
    }[name]
    target_chars = chars_per_token * cfg.seq_len
    order = torch.randperm(len(docs), generator=seeded_generator(cfg.seed, -1)).tolist()
    joined, current = [], []
    for i in order:
        current.append(docs[i])
        if sum(map(len, current)) >= target_chars:
            joined.append(build(current, i))
            current = []
    if current:
        joined.append("\n\n".join(current))
    return joined


# ``builtin:prose-facts``. The wording is our own and shares nothing with the evaluation tasks of trimkv.eval.tasks
# (no "pass key", "magic number", "VAR", JSON or UUIDs; the prose comes from the corpus's train split, the evaluation
# haystacks from its eval split or from filler sentences). tests/test_data.py checks this.
_FACT_SYLLABLES = SYLLABLES[:16]   # prose-facts' made-up words use the first 16 (its documents stay as they were)
_ATTRIBUTES = ("room number", "order number", "badge number", "serial number", "ticket number", "account number",
               "locker code", "invoice number", "phone extension", "batch code", "shelf mark", "seat number")
_STATEMENTS = ("Note that the {attr} of {name} is {value}.", "{name}'s {attr} is {value}.",
               "For the record, {name} was given {attr} {value}.", "The {attr} assigned to {name} is {value}.")
_RECALLS = ("To recap, the {attr} of {name} is {value}.", "As noted earlier, {name}'s {attr} is {value}.",
            "Recall that {name} was given {attr} {value}.", "Once more: the {attr} assigned to {name} is {value}.")


def _made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_FACT_SYLLABLES) for _ in range(syllables))


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

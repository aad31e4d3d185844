"""builtin:qa / builtin:qa-plain (trimkv.data.synthqa): documents fit their rows, the answers (and only they) are
targets, the facts are varied and look alike, and nothing is worded like the evaluation tasks."""
from __future__ import annotations

import random
import re

import pytest

from test_data import tokenizer  # noqa: F401  (the tiny offline BPE with a ChatML template)
from trimkv.data import DataConfig, DataError, build_dataset
from trimkv.data.corpus import prose_documents
from trimkv.eval import tasks
from trimkv.data.synthqa import ATTRIBUTES, make_facts, make_value

EVAL_WORDS = ("pass key", "magic number", "var ", "uuid", "question:", "answer:", "json")


def _cfg(source, tmp_path, **kw):
    return DataConfig(source=source, seq_len=kw.pop("seq_len", 700), pack=False, max_samples=kw.pop("n", 12),
                      cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("source", ["builtin:qa", "builtin:qa-plain"])
def test_documents_fit_and_only_the_answers_are_targets(tokenizer, tmp_path, source):  # noqa: F811
    cfg = _cfg(source, tmp_path)
    rows = build_dataset(cfg, tokenizer)
    docs = data_docs(cfg, tokenizer)
    assert len(rows) == len(docs) == 12
    for row, doc in zip(rows, docs):
        n = len(row["input_ids"])
        assert cfg.seq_len * 0.8 < n <= cfg.seq_len, n                        # fitted with the tokenizer
        target = tokenizer.decode(row["input_ids"][row["loss_mask"]].tolist())
        if source == "builtin:qa":
            replies = [m["content"] for m in doc["messages"] if m["role"] == "assistant"]
            assert target.replace("<|im_end|>", "\n").split() == " ".join(replies).split()
        else:
            values = [doc["text"][a:b] for a, b in doc["target_spans"]]
            assert target.replace(" ", "") == "".join(values).replace(" ", "")
            assert all(re.fullmatch(r".+\.", v) for v in values)          # a value and its full stop


def data_docs(cfg, tok):
    from trimkv.data.builtin import builtin_documents

    return builtin_documents(cfg, tok)


def test_every_asked_fact_is_stated_in_the_context(tokenizer, tmp_path):  # noqa: F811
    for doc in data_docs(_cfg("builtin:qa", tmp_path, n=20), tokenizer):
        context = doc["messages"][0]["content"]
        for reply in (m["content"] for m in doc["messages"] if m["role"] == "assistant"):
            value = reply.rsplit(" is ", 1)[1].rstrip(".")
            assert context.count(value) == 1, value                          # stated once, before the questions


def test_same_seed_same_documents_other_seed_other_facts(tokenizer, tmp_path):  # noqa: F811
    a = data_docs(_cfg("builtin:qa-plain", tmp_path), tokenizer)
    b = data_docs(_cfg("builtin:qa-plain", tmp_path), tokenizer)
    c = data_docs(_cfg("builtin:qa-plain", tmp_path, seed=1), tokenizer)
    assert a == b and a != c


def test_facts_are_varied_and_look_alike():
    rng = random.Random(0)
    kinds, digits = set(), set()
    for _ in range(200):
        facts = make_facts(rng, 6)
        assert len({(f.subject, f.attribute) for f in facts}) == 6 and len({f.value for f in facts}) == 6
        by_attr = {}
        for f in facts:
            kinds.add(ATTRIBUTES[f.attribute])
            by_attr.setdefault(f.attribute, []).append(f.value)
            if ATTRIBUTES[f.attribute] == "number":
                digits.add(len(f.value))
        for attr, values in by_attr.items():       # distractors: one attribute, values of one shape
            if ATTRIBUTES[attr] == "number":
                assert len({len(v) for v in values}) == 1
        assert len({f.attribute for f in facts}) < 6 or len({f.subject for f in facts}) < 6
    assert kinds == {"number", "word", "name", "code", "date", "phrase"}
    assert digits == set(range(3, 10))
    assert re.fullmatch(r"[A-Z]{2}-\d{2}[A-Z]\d", make_value("code", rng, 0))


def _our_wording(text: str, prose: set[str]) -> str:
    """``text`` without the corpus paragraphs of its haystack (a statement follows a paragraph after a space)."""
    kept = []
    for chunk in text.split("\n\n"):
        cuts = [i for i, c in enumerate(chunk) if c == " "] + [len(chunk)]
        prefix = next((i for i in reversed(cuts) if chunk[:i] in prose), 0)
        kept.append(chunk[prefix:])
    return "\n\n".join(kept)


def test_wording_shares_nothing_with_the_eval_tasks(tokenizer, tmp_path):  # noqa: F811
    """Our wording: intros, statements, questions, answer leads and values. The haystack is library prose, which may
    name UUIDs or JSON (which docstrings a sample draws depends on the interpreter's version)."""
    prose = {p.strip() for d in prose_documents("train") for p in d.split("\n\n") if p.strip()}
    for source in ("builtin:qa", "builtin:qa-plain"):
        for doc in data_docs(_cfg(source, tmp_path, n=30), tokenizer):
            text = doc.get("text") or "\n\n".join(m["content"] for m in doc["messages"])
            ours = _our_wording(text, prose)
            assert len(ours) < len(text), "no corpus paragraph was found in the document"
            for words in EVAL_WORDS:
                assert words not in ours.lower(), (source, words, ours)
    assert tasks.FILLER.split(".")[0] not in str(data_docs(_cfg("builtin:qa", tmp_path, n=5), tokenizer))


def test_too_short_rows_are_explained(tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(DataError, match="raise seq_len"):
        build_dataset(_cfg("builtin:qa", tmp_path, seq_len=60), tokenizer)


def test_every_row_keeps_its_answers_with_the_real_tokenizer_shape(tokenizer, tmp_path):  # noqa: F811
    """Fitting counts the whole rendering (pieces tokenise differently once joined): no row is cut short."""
    for source in ("builtin:qa", "builtin:qa-plain"):
        for length in (700, 900):
            rows = build_dataset(_cfg(source, tmp_path, seq_len=length, n=25), tokenizer)
            assert len(rows) == 25 and all(r["loss_mask"].any() and len(r["input_ids"]) <= length for r in rows)

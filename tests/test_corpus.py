"""The offline prose corpus: disjoint splits, stable order, prose rather than code."""
import pytest

from trimkv.data import corpus


def paragraphs(docs):
    return {p for d in docs for p in d.split("\n\n")}


def test_splits_are_disjoint_and_nonempty():
    train, evals = corpus.prose_documents("train"), corpus.prose_documents("eval")
    assert len(train) > 100 and len(evals) > 20
    assert not paragraphs(train) & paragraphs(evals)  # not even a paragraph is shared


def test_split_modules_do_not_overlap():
    assert not set(corpus._TRAIN_MODULES) & set(corpus._EVAL_MODULES)


def test_sizes_are_useful():
    stats = corpus.corpus_stats()
    # CPython 3.11 gives ~690 kB / ~215 kB; floors leave room for other interpreter versions.
    assert stats["train"]["chars"] > 300_000
    assert stats["eval"]["chars"] > 100_000


def test_documents_are_deterministic():
    first = corpus.prose_documents("eval")
    corpus._documents.cache_clear()
    assert corpus.prose_documents("eval") == first


def test_min_chars_is_respected():
    docs = corpus.prose_documents("train", min_chars=1000)
    assert docs and all(len(d) >= 1000 for d in docs)
    assert len(docs) < len(corpus.prose_documents("train"))


def test_documents_are_prose_not_code():
    for doc in corpus.prose_documents("train") + corpus.prose_documents("eval"):
        assert ">>>" not in doc and "::=" not in doc
        assert "\n\n\n" not in doc and doc == doc.strip()
        for paragraph in doc.split("\n\n"):
            assert "\n" not in paragraph and "  " not in paragraph


def test_prose_text_is_seeded_and_sized():
    a = corpus.prose_text("train", 5000, seed=1)
    assert a == corpus.prose_text("train", 5000, seed=1)
    assert a != corpus.prose_text("train", 5000, seed=2)
    assert 4900 <= len(a) <= 5000
    assert not a[-1].isspace()


@pytest.mark.parametrize("split", corpus.SPLITS)
def test_prose_text_comes_from_its_split(split):
    other = "eval" if split == "train" else "train"
    text = corpus.prose_text(split, 20_000, seed=0)
    full = text.split("\n\n")[:-1]  # the last paragraph may be cut short
    assert set(full) <= paragraphs(corpus.prose_documents(split))
    assert not set(full) & paragraphs(corpus.prose_documents(other))


def test_prose_text_repeats_when_asked_for_more_than_the_split():
    size = corpus.corpus_stats()["eval"]["chars"]
    text = corpus.prose_text("eval", 2 * size, seed=0)
    assert len(text) > 1.9 * size


def test_bad_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="train, eval"):
        corpus.prose_documents("test")
    with pytest.raises(ValueError, match="valid splits"):
        corpus.prose_text("validation", 100)

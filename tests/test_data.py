"""Tests for trimkv.data: loading, tokenising, packing, batching and caching (offline, fast)."""

import json
import re

import pytest
import torch

from trimkv import data
from trimkv.data import DataConfig, DataError, batches, build_dataset, pack_documents

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a retention gate decides which tokens stay in the cache",
    "packing puts several short documents into one long row",
    "what is two plus two? two plus two is four.",
    "you are a helpful assistant who answers briefly",
]
CHAT = [
    {"messages": [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "two plus two is four."},
        {"role": "user", "content": "and the fox?"},
        {"role": "assistant", "content": "the quick brown fox jumps"},
    ]},
    {"messages": [
        {"role": "user", "content": "packing puts documents"},
        {"role": "assistant", "content": "into one long row"},
    ]},
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained here, with a ChatML chat template (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    docs = [{"text": " ".join(SENTENCES[i % 5: i % 5 + 1 + i % 3])} for i in range(40)]
    return write_jsonl(tmp_path / "docs.jsonl", docs)


def cfg_for(source, tmp_path, **kw):
    kw = {"seq_len": 16, "cache_dir": str(tmp_path / "cache"), **kw}
    return DataConfig(source=source, **kw)


def as_lists(batch_list):
    return [tuple(b["input_ids"].flatten().tolist()) for b in batch_list]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [("format", "csv"), ("too_long", "split")])
def test_config_rejects_unknown_choice_naming_field_and_choices(field, value):
    with pytest.raises(ValueError, match=rf"{field}=.*{value}.*choose one of"):
        DataConfig(source="x.jsonl", **{field: value})


# ----------------------------------------------------------------------------- packing


def doc(n, start=100):
    return {"input_ids": list(range(start, start + n)), "target": [False] + [True] * (n - 1)}


def test_packing_rows_have_seq_len_and_positions_restart_at_documents():
    rows = list(pack_documents([doc(3), doc(4, 200), doc(5, 300), doc(4, 400)], seq_len=5))
    assert [len(r["input_ids"]) for r in rows] == [5, 5, 5]  # 16 tokens: partial row dropped
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[1]["position_ids"] == [0, 1, 0, 1, 2]  # doc 2 continues as a new piece
    assert rows[0]["input_ids"] == [100, 101, 102, 200, 201]
    for r in rows:
        assert all(not m for m, p in zip(r["loss_mask"], r["position_ids"]) if p == 0)
        assert all(m for m, p in zip(r["loss_mask"], r["position_ids"]) if p > 0)


def test_packing_splits_a_long_document_into_pieces_starting_at_zero():
    rows = list(pack_documents([doc(13)], seq_len=4))
    assert len(rows) == 3
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3]] * 3
    assert [r["input_ids"][0] for r in rows] == [100, 104, 108]
    assert [r["loss_mask"] for r in rows] == [[False, True, True, True]] * 3


def test_packing_keeps_chat_targets_in_place():
    chat = {"input_ids": list(range(6)), "target": [False, False, True, True, False, True]}
    (row,) = pack_documents([doc(2), chat], seq_len=8)
    assert row["loss_mask"] == [False, True, False, False, True, True, False, True]


# ----------------------------------------------------------------------------- text batches


def test_text_batches_format(tokenizer, text_file, tmp_path):
    cfg = cfg_for(text_file, tmp_path, batch_size=3)
    out = list(batches(cfg, tokenizer))
    assert out and all(b["input_ids"].shape == (3, 16) for b in out)
    b = out[0]
    assert b["input_ids"].dtype == b["position_ids"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.bool
    assert b["position_ids"].shape == b["loss_mask"].shape == (3, 16)
    starts = b["position_ids"] == 0
    assert starts[:, 0].all()
    assert torch.equal(b["loss_mask"], ~starts)  # plain text: every non-first token is a target


def test_text_documents_end_with_eos(tokenizer, text_file, tmp_path):
    rows = build_dataset(cfg_for(text_file, tmp_path, seq_len=64), tokenizer)
    ids = torch.cat([r["input_ids"] for r in rows])
    pos = torch.cat([r["position_ids"] for r in rows])
    before_start = torch.nonzero(pos[1:] == 0).flatten()
    assert (ids[before_start] == tokenizer.eos_token_id).float().mean() > 0.5


@pytest.mark.parametrize("suffix", ["txt", "parquet"])
def test_txt_and_parquet_folders_load(tokenizer, tmp_path, suffix):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, sentence in enumerate(SENTENCES):
        if suffix == "txt":
            (folder / f"{i}.txt").write_text(f"{sentence}\n{sentence}\n")
        else:
            import pandas as pd
            pd.DataFrame({"body": [sentence] * 3}).to_parquet(folder / f"{i}.parquet")
    column = "text" if suffix == "txt" else "body"
    rows = build_dataset(cfg_for(str(folder), tmp_path, text_column=column), tokenizer)
    assert rows and all(len(r["input_ids"]) == 16 for r in rows)
    if suffix == "txt":  # one document per file: 5 documents in the packed stream
        n_docs = sum(int((r["position_ids"] == 0).sum()) for r in rows)
        assert n_docs >= 5


def test_unpacked_rows_are_padded_and_truncated(tokenizer, text_file, tmp_path):
    cfg = cfg_for(text_file, tmp_path, pack=False, seq_len=8, batch_size=4)
    for b in batches(cfg, tokenizer):
        assert b["input_ids"].shape[1] <= 8
        assert (b["position_ids"] == torch.arange(b["input_ids"].shape[1])).all()
        padding = b["input_ids"] == tokenizer.pad_token_id
        assert not (b["loss_mask"] & padding).any()
        assert not b["loss_mask"][:, 0].any()


def test_too_long_drop_removes_long_documents(tokenizer, text_file, tmp_path):
    kept = build_dataset(cfg_for(text_file, tmp_path, pack=False, too_long="drop", seq_len=12),
                         tokenizer)
    assert kept and all(len(r["input_ids"]) <= 12 for r in kept)
    every = build_dataset(cfg_for(text_file, tmp_path, pack=False, seq_len=12), tokenizer)
    assert len(kept) < len(every)


# ----------------------------------------------------------------------------- chat


def target_text(tokenizer, tokenized):
    ids = [i for i, t in zip(tokenized["input_ids"], tokenized["target"]) if t]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("template", [CHATML, CHATML_GENERATION], ids=["prefix", "generation"])
def test_chat_targets_are_exactly_the_assistant_replies(tokenizer, template, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", template)
    cfg = DataConfig(source="x.jsonl", format="chat")
    out = data.tokenize_document(CHAT[0], tokenizer, cfg)
    assert len(out["input_ids"]) == len(out["target"])
    assert target_text(tokenizer, out) == (
        "two plus two is four.<|im_end|>the quick brown fox jumps<|im_end|>")
    assert out["target"][0] is False


def test_generation_and_prefix_masks_agree(tokenizer, monkeypatch):
    cfg = DataConfig(source="x.jsonl", format="chat")
    by_prefix = data.tokenize_document(CHAT[0], tokenizer, cfg)
    monkeypatch.setattr(tokenizer, "chat_template", CHATML_GENERATION)
    by_generation = data.tokenize_document(CHAT[0], tokenizer, cfg)
    assert by_prefix == by_generation


def test_chat_batches_mask_only_assistant_tokens(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", CHAT * 6)
    cfg = cfg_for(source, tmp_path, seq_len=32, batch_size=2)
    rows = build_dataset(cfg, tokenizer)
    targets = torch.cat([r["input_ids"][r["loss_mask"]] for r in rows]).tolist()
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start not in targets
    decoded = tokenizer.decode(targets)
    assert "user" not in decoded and "helpful" not in decoded and "what is" not in decoded
    assert "<|im_end|>" in decoded
    assert not any(r["loss_mask"][r["position_ids"] == 0].any() for r in rows)


# ----------------------------------------------------------------------------- order and resume


def test_order_is_deterministic_by_seed_and_epoch(tokenizer, text_file, tmp_path):
    run = lambda seed=0, epoch=0: as_lists(batches(cfg_for(text_file, tmp_path, seed=seed),  # noqa: E731
                                                   tokenizer, epoch=epoch))
    first = run()
    assert first == run()
    assert first != run(seed=1) and sorted(first) == sorted(run(seed=1))
    assert first != run(epoch=1) and sorted(first) == sorted(run(epoch=1))


@pytest.mark.parametrize("streaming", [False, True])
def test_skip_batches_gives_the_tail_of_the_same_stream(tokenizer, text_file, tmp_path, streaming):
    cfg = cfg_for(text_file, tmp_path, batch_size=2, streaming=streaming)
    full = as_lists(batches(cfg, tokenizer, epoch=3))
    assert as_lists(batches(cfg, tokenizer, epoch=3, skip_batches=4)) == full[4:]


def test_ranks_get_disjoint_equal_shares(tokenizer, text_file, tmp_path):
    cfg = cfg_for(text_file, tmp_path)
    full = as_lists(batches(cfg, tokenizer))
    shares = [as_lists(batches(cfg, tokenizer, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    assert [b for group in zip(*shares) for b in group] == full[: 3 * len(shares[0])]
    assert data.num_batches(cfg, tokenizer, world_size=3) == len(shares[0])


def test_streaming_gives_the_same_rows(tokenizer, text_file, tmp_path):
    rows = build_dataset(cfg_for(text_file, tmp_path), tokenizer)
    streamed = as_lists(batches(cfg_for(text_file, tmp_path, streaming=True), tokenizer))
    assert sorted(streamed) == sorted(tuple(r["input_ids"].tolist()) for r in rows)


# ----------------------------------------------------------------------------- cache


def test_second_build_reads_the_cache(tokenizer, text_file, tmp_path, monkeypatch):
    calls = []
    real = data.tokenize_document
    monkeypatch.setattr("trimkv.data.tokenize.tokenize_document", lambda *a: calls.append(1) or real(*a))
    first = build_dataset(cfg_for(text_file, tmp_path), tokenizer)
    n = len(calls)
    assert n > 0
    again = build_dataset(cfg_for(text_file, tmp_path, batch_size=4, seed=9), tokenizer)
    assert len(calls) == n  # batch size and seed do not change the rows: cache hit
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    build_dataset(cfg_for(text_file, tmp_path, seq_len=8), tokenizer)
    assert len(calls) == 2 * n  # seq_len changes the rows: tokenised again


def test_editing_a_local_file_invalidates_the_cache(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": SENTENCES[0]}] * 4)
    before = build_dataset(cfg_for(source, tmp_path, seq_len=8), tokenizer)
    write_jsonl(tmp_path / "d.jsonl", [{"text": SENTENCES[1] + " " + SENTENCES[2]}] * 4)
    after = build_dataset(cfg_for(source, tmp_path, seq_len=8), tokenizer)
    assert not torch.equal(before[0]["input_ids"], after[0]["input_ids"])


# ----------------------------------------------------------------------------- errors


def test_missing_path_is_named(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl does not exist"):
        build_dataset(cfg_for(str(tmp_path / "nowhere.jsonl"), tmp_path), tokenizer)


def test_empty_dataset_names_the_source(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(DataError, match=r"blank\.jsonl gave no training rows"):
        build_dataset(cfg_for(source, tmp_path), tokenizer)
    with pytest.raises(DataError, match=r"blank\.jsonl gave no full batch"):
        list(batches(cfg_for(source, tmp_path, streaming=True), tokenizer))


def test_missing_column_lists_columns_and_field(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"\['question', 'answer'\].*text_column"):
        build_dataset(cfg_for(source, tmp_path), tokenizer)
    with pytest.raises(DataError, match=r"no column 'messages'.*messages_column"):
        build_dataset(cfg_for(source, tmp_path, format="chat"), tokenizer)


def test_too_few_rows_for_a_batch_is_explained(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "small.jsonl", [{"text": SENTENCES[0]}])
    with pytest.raises(DataError, match=r"fewer than batch_size=64"):
        next(batches(cfg_for(source, tmp_path, seq_len=4, batch_size=64), tokenizer))


def test_too_long_error_names_row_and_length(tokenizer, text_file, tmp_path):
    with pytest.raises(DataError, match=r"row \d+ has \d+ tokens > seq_len=4"):
        build_dataset(cfg_for(text_file, tmp_path, seq_len=4, too_long="error"), tokenizer)


def test_chat_row_without_assistant_is_named(tokenizer, tmp_path):
    rows = CHAT + [{"messages": [{"role": "user", "content": "hello"}]}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat.jsonl row 3 has no assistant message"):
        build_dataset(cfg_for(source, tmp_path), tokenizer)


def test_prefix_unstable_template_is_explained(tokenizer, monkeypatch):
    # a template that numbers turns from the end renders a prefix differently from the whole chat
    unstable = "{% for m in messages %}{{ messages|length - loop.index }}:{{ m['content'] }}|{% endfor %}"
    monkeypatch.setattr(tokenizer, "chat_template", unstable)
    with pytest.raises(DataError, match=r"generation"):
        data.tokenize_document(CHAT[1], tokenizer, DataConfig(source="x.jsonl", format="chat"))


# ----------------------------------------------------------------------------- builtin corpus


def test_builtin_prose(tokenizer, tmp_path):
    pytest.importorskip("trimkv.data.corpus")
    cfg = cfg_for("builtin:prose", tmp_path, seq_len=32, max_samples=20, batch_size=2)
    b = next(batches(cfg, tokenizer))
    assert b["input_ids"].shape == (2, 32)
    assert not b["loss_mask"][b["position_ids"] == 0].any()


def test_prose_facts_restate_each_fact_later_in_words_the_eval_tasks_never_use():
    import random as _random

    from trimkv.data.builtin import _with_facts

    parts = [f"Paragraph {i} talks about sockets, files and the number {i}." for i in range(40)]
    for seed in range(20):
        text = _with_facts(parts, _random.Random(seed))
        assert text == _with_facts(parts, _random.Random(seed))                       # seeded
        inserted = [s for s in re.split(r"(?<=\.)\s+", text) if not s.startswith("Paragraph")]
        inserted = [s.strip() for s in inserted]
        assert len(inserted) == 10, inserted                                          # 5 statements + 5 recalls
        values = [s.rstrip(".").split()[-1] for s in inserted]
        for value in set(values):
            first, second = [i for i, v in enumerate(values) if v == value][:2]
            pos = [text.index(inserted[first]), text.rindex(inserted[second])]
            assert pos[0] < pos[1] and (pos[1] - pos[0]) > 0.2 * len(text)             # recalled far later
        lowered = text.lower()
        for eval_words in ("pass key", "magic number", "var ", "uuid", "question:", "answer:"):
            assert eval_words not in lowered


def test_prose_facts_builtin_documents_fit_their_rows(tokenizer, tmp_path):
    pytest.importorskip("trimkv.data.corpus")
    from trimkv.data.builtin import builtin_documents

    cfg = cfg_for("builtin:prose-facts", tmp_path, seq_len=512, pack=False)
    docs = builtin_documents(cfg)
    assert len(docs) > 10 and all("\n\n" in d for d in docs[:-1])
    assert sum("To recap" in d or "As noted earlier" in d or "Recall that" in d or "Once more" in d
               for d in docs) >= len(docs) // 2


# ----------------------------------------------------------------------------- completion format, mixtures


def test_completion_rows_train_on_the_completion_only(tokenizer, tmp_path):
    rows = [{"prompt": "what is two plus two?", "completion": " two plus two is four."},
            {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"}]
    source = write_jsonl(tmp_path / "pc.jsonl", rows)
    built = build_dataset(cfg_for(source, tmp_path, seq_len=64, pack=False), tokenizer)
    for row, raw in zip(built, rows):
        target = tokenizer.decode(row["input_ids"][row["loss_mask"]].tolist())
        assert target.strip() == raw["completion"].strip()


def test_completion_column_of_the_wrong_type_is_named(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(DataError, match="'completion' must hold strings"):
        build_dataset(cfg_for(source, tmp_path, seq_len=64, pack=False), tokenizer)


def test_mixture_draws_rows_by_weight_each_source_keeping_its_masks(tokenizer, tmp_path):
    text_file = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(SENTENCES[i % 5:])} for i in range(300)])
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT * 40)
    mix = DataConfig(mixture=[{"source": text_file, "weight": 3}, {"source": chat, "weight": 1, "pack": False}],
                     seq_len=128, cache_dir=str(tmp_path / "cache"), batch_size=1)
    text_rows = {tuple(r["input_ids"].tolist())
                 for r in build_dataset(cfg_for(text_file, tmp_path, seq_len=128), tokenizer)}
    rows = data.epoch_rows(mix, tokenizer, epoch=0)
    assert len(rows) == data.prepare_data(mix, tokenizer)
    from_text = [tuple(r["input_ids"].tolist()) in text_rows for r in rows]
    share = sum(from_text) / len(rows)
    assert 0.6 < share < 0.9, share                                   # weight 3 : 1
    for row, is_text in zip(rows, from_text):
        if is_text:
            assert row["loss_mask"][row["position_ids"] > 0].all()     # plain text: all but each document's first
        else:
            assert 0 < row["loss_mask"].sum() < len(row["loss_mask"])   # chat: the assistant replies only
    assert [tuple(r["input_ids"].tolist()) for r in data.epoch_rows(mix, tokenizer, epoch=0)] == \
        [tuple(r["input_ids"].tolist()) for r in rows]                  # deterministic: exact resume works
    assert next(batches(mix, tokenizer, skip_batches=3))["input_ids"][0].tolist() == rows[3]["input_ids"].tolist()


@pytest.mark.parametrize("mixture, match", [
    ([], "non-empty list"),
    ([{"weight": 1}], "must be a mapping with a 'source'"),
    ([{"source": "builtin:prose", "weight": 0}], "weight must be a positive number"),
    ([{"source": "builtin:prose", "seq_len": 8}], "unknown field.*seq_len"),
])
def test_mixture_entries_are_validated(mixture, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(mixture=mixture)


def test_source_and_mixture_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        DataConfig(source="builtin:prose", mixture=[{"source": "builtin:prose"}])
    with pytest.raises(ValueError, match="source is empty"):
        DataConfig()


def test_documents_without_targets_are_skipped_with_a_warning(tokenizer, tmp_path):
    long_prompt = " ".join(SENTENCES * 4)
    rows = [{"prompt": "what is two plus two?", "completion": " four."},
            {"prompt": long_prompt, "completion": " the lazy dog"},     # the completion is cut off at seq_len
            {"prompt": "and the fox?", "completion": ""}]                # nothing to train on
    source = write_jsonl(tmp_path / "cut.jsonl", rows)
    with pytest.warns(UserWarning, match="2 of 3 documents have no target token"):
        built = build_dataset(cfg_for(source, tmp_path, seq_len=24, pack=False), tokenizer)
    assert len(built) == 1 and built[0]["loss_mask"].any()


def test_non_string_text_is_named(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "num.jsonl", [{"text": "fine"}, {"text": 42}])
    with pytest.raises(DataError, match=r"num.jsonl row 2: column 'text' must hold strings, got int"):
        build_dataset(cfg_for(source, tmp_path), tokenizer)


def test_hub_dataset_config_name_revision_and_split_reach_load_dataset(monkeypatch, tmp_path):
    import datasets

    seen = {}

    def fake_load_dataset(path, **kwargs):
        seen.update(path=path, **kwargs)
        return datasets.Dataset.from_dict({"text": SENTENCES})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="user/long-qa", config_name="en", revision="v1.0", split="validation", seq_len=8,
                     cache_dir=str(tmp_path))
    assert len(data.load_documents(cfg)) == len(SENTENCES)
    assert seen == {"path": "user/long-qa", "name": "en", "revision": "v1.0", "split": "validation",
                    "streaming": False}


def test_config_name_and_revision_are_for_hub_datasets_only(tmp_path):
    with pytest.raises(ValueError, match="config_name / revision apply to Hub datasets"):
        DataConfig(source="builtin:prose", config_name="en")
    with pytest.raises(ValueError, match="Hub datasets"):
        DataConfig(source=str(tmp_path / "a.jsonl"), revision="main")


def test_hub_dataset_ids_of_a_mixture_skip_local_and_builtin_sources(tmp_path):
    local = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    cfg = DataConfig(mixture=[{"source": "user/a", "config_name": "en"}, {"source": local},
                              {"source": "builtin:prose"}, {"source": "user/a"}, {"source": "org/b"}])
    assert data.hub_dataset_ids(cfg) == ["user/a", "org/b"]
    assert cfg.components()[0][0].config_name == "en"

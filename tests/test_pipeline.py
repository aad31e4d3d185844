"""The pipeline entry: a long context and several questions, the chat template applied, the bounded cache prefilled
once per context and copied for each question; ``trimkv generate`` over a prompt file."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from trimkv import attach_gates, make_cache, save_gates
from trimkv.cli import main as cli_main
from trimkv.compat import cache_kwargs
from trimkv.errors import CacheError
from trimkv.serve import generation, pipeline
from trimkv.serve.pipeline import answer, split_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = "The grass is green. The sky is blue. " * 6 + "The pass key is 71432. Remember it. " + \
          "The sun is yellow. Here we go. " * 5
QUESTIONS = ["What is the pass key?", "What color is the sky?", "Here we go?"]


@pytest.fixture
def gated(tokenizer):
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    handle = attach_gates(model, gate_hidden=8)
    with torch.no_grad():                                         # gates that really forget: bias 2 -> beta ~ 0.88
        for gate in handle.gates.layers:
            gate.bias.fill_(2.0)
    return model


def test_split_prompt_concatenates_to_the_chat_template(tokenizer):
    head, tails = split_prompt(tokenizer, CONTEXT, QUESTIONS)
    for q, tail in zip(QUESTIONS, tails):
        full = tokenizer.apply_chat_template([{"role": "user", "content": f"{CONTEXT}\n\n{q}"}],
                                             add_generation_prompt=True, tokenize=False)
        assert head + tail == full
    head, tails = split_prompt(tokenizer, CONTEXT, ["Q?"], chat=False, answer_prefix="A:")
    assert head == CONTEXT and tails == ["\nQ?\nA:"]


def test_unbounded_budget_equals_the_full_cache_and_plain_generate(gated, tokenizer):
    """With room for every token nothing is evicted: the bounded cache answers exactly as the full cache, which
    answers exactly as generate() over the whole prompt."""
    full = answer(gated, tokenizer, CONTEXT, QUESTIONS, budget=None, max_new_tokens=6)
    roomy = answer(gated, tokenizer, CONTEXT, QUESTIONS, budget=512, max_new_tokens=6, prefill_chunk=16)
    assert roomy.answers == full.answers
    head, tails = split_prompt(tokenizer, CONTEXT, QUESTIONS)
    ids = tokenizer(head + tails[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with gated.trimkv.disabled(), torch.no_grad():
        out = gated.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == full.answers[0]


def test_context_is_prefilled_once_and_questions_do_not_see_each_other(gated, tokenizer, monkeypatch):
    calls = []
    real = pipeline.prefill
    spy = lambda *a, **k: calls.append((a[2].get_seq_length(), a[1].shape[1])) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(pipeline, "prefill", spy)          # the context
    monkeypatch.setattr(generation, "prefill", spy)        # each question, continuing from a copy
    together = answer(gated, tokenizer, CONTEXT, QUESTIONS + QUESTIONS[:1], budget=24, max_new_tokens=6)
    from_scratch = [n for start, n in calls if start == 0]
    assert from_scratch == [together.context_tokens - 1] and len(calls) == 1 + 4   # the context once, then questions
    assert {start for start, _ in calls[1:]} == {together.context_tokens - 1}      # each from the context's state
    alone = [answer(gated, tokenizer, CONTEXT, q, budget=24, max_new_tokens=6).answers[0] for q in QUESTIONS]
    assert together.answers == alone + alone[:1]                 # same cache state for each; asking twice is equal


def test_kv_bytes_stay_at_the_budget(gated, tokenizer):
    full = answer(gated, tokenizer, CONTEXT, QUESTIONS[:1], budget=None, max_new_tokens=4)
    small = answer(gated, tokenizer, CONTEXT, QUESTIONS[:1], budget=32, max_new_tokens=4)
    per_token = 2 * 2 * 2 * 16 * 4 + 2 * 2 * (8 + 4)             # layers * (K+V) * heads * D * fp32 + pos/logb
    assert small.kv_bytes == 32 * per_token == small.answer_kv_bytes[0]
    assert full.kv_bytes > 2 * small.kv_bytes and small.context_tokens == full.context_tokens > 50


def test_only_the_trimkv_policy_needs_gates(tokenizer):
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(CacheError, match="no gates are attached"):
        answer(model, tokenizer, CONTEXT, "Q?", budget=32)
    assert len(answer(model, tokenizer, CONTEXT, "Q?", budget=32, policy="snapkv", max_new_tokens=2).answers) == 1
    assert len(answer(model, tokenizer, CONTEXT, "Q?", budget=None, max_new_tokens=2).answers) == 1


def test_heuristic_policy_runs_with_the_gates_off(gated, tokenizer):
    out = answer(gated, tokenizer, CONTEXT, QUESTIONS[:2], budget=32, policy="streaming", max_new_tokens=4)
    assert len(out.answers) == 2 and gated.trimkv.enabled


def test_cli_generate_answers_a_prompt_file(gated, tokenizer, tmp_path, monkeypatch, capsys):
    gates = save_gates(gated.trimkv.detach(), tmp_path / "gates")
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    monkeypatch.setattr("trimkv.base_model.load_model", lambda *a, **k: (model, tokenizer))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"context": CONTEXT, "questions": QUESTIONS[:2]}) + "\n"
                       + json.dumps({"prompt": "The sky is"}) + "\n")
    assert cli_main(["generate", str(prompts), "--model", "tiny", "--gates", str(gates), "--budget", "32",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["answers"]) for r in rows] == [2, 1] and rows[0]["kv_bytes"] > 0
    text = tmp_path / "prompt.txt"
    text.write_text("The grass is green. The sky")
    out = tmp_path / "out.jsonl"
    assert cli_main(["generate", str(text), "--model", "tiny", "--max-new-tokens", "2", "--no-chat",
                     "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["answers"]) == 1


def test_cache_clone_is_independent(gated, tokenizer):
    cache = make_cache(gated, "trimkv", 16, sink=2, window=4)
    ids = tokenizer(CONTEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pipeline.prefill(gated, ids, cache, chunk=16)
    copy = pipeline.clone_cache(cache)
    with torch.no_grad():
        gated(ids[:, :3], **cache_kwargs(gated, copy), position_ids=torch.arange(ids.shape[1], ids.shape[1] + 3)[None])
    assert copy.get_seq_length() == cache.get_seq_length() + 3
    assert not torch.equal(copy.layers[0].pos, cache.layers[0].pos)

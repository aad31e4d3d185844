"""Questions about a long context, the way kvpress users ask them: one call, the chat template applied, the bounded
cache prefilled once per context and reused for every question.

    from trimkv.pipeline import answer
    out = answer(model, tok, context=long_document, questions=["Who ...?", "When ...?"], budget=128)
    out.answers        # one string per question
    out.kv_bytes       # bytes the cache holds after the context (what every question starts from)

The context is prefilled in chunks of ``prefill_chunk`` tokens into a fresh cache (all but its last token, which
each question starts with), *without* the questions: TRIM-KV's retention is query-agnostic, so what the cache keeps
does not depend on what is asked. Each question then continues from a copy of that cache (:func:`clone_cache`): the
questions do not see each other and the context is prefilled once. The question is prefilled into its copy the
same way, and ``generate`` continues from the prompt's last token. As in kvpress's pipeline, the chat template is
split at the end of the user's context: the context ends the user turn's content, and each question is followed by
the rest of the template (end of turn, assistant header).

``budget=None`` answers with transformers' full DynamicCache (the frozen model), for comparison. A heuristic
``policy`` (``"streaming"``, ``"snapkv"``, ...) runs in the same bounded cache without the gates.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import Cache

from ..base_model import input_device
from ..errors import DataError
from .factory import kv_nbytes, make_cache
from .generation import generate, prefill
from .policies import EvictionPolicy

_SEPARATOR = "\uE000trimkv-context-end\uE000"   # private-use characters: never part of a real context


@dataclass
class Answers:
    answers: list[str]
    context_tokens: int
    question_tokens: list[int]
    kv_bytes: int                               # cache bytes after the context prefill
    answer_kv_bytes: list[int] = field(default_factory=list)   # cache bytes after each answer
    seconds: float = 0.0


def split_prompt(tokenizer, context: str, questions: list[str], *, chat: bool = True, answer_prefix: str = "",
                 **template_kwargs) -> tuple[str, list[str]]:
    """``(context_text, [question_text, ...])`` whose concatenations are the full prompts.

    With a chat template (and ``chat``): the user turn holds the context then the question; the context text stops
    where the user's content would go on. Without: the context, then each question on its own line."""
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": context + _SEPARATOR}],
                                                 add_generation_prompt=True, tokenize=False, **template_kwargs)
        head, suffix = rendered.split(_SEPARATOR)
        return head, [(f"\n\n{q}" if q else "") + suffix + answer_prefix for q in questions]
    return context, [(f"\n{q}\n" if q else "") + answer_prefix for q in questions]


def clone_cache(cache: Cache) -> Cache:
    """An independent copy of a cache's state (K/V slots, positions, retention, policy state)."""
    return copy.deepcopy(cache)


def answer(model, tokenizer, context: str, questions: str | list[str] | None = None, *, budget: int | None = None,
           sink: int = 4, window: int = 16, policy: str | EvictionPolicy | None = None, prefill_chunk: int = 256,
           max_new_tokens: int = 64, chat: bool = True, answer_prefix: str = "", template_kwargs: dict | None = None,
           head_budgets=None, **gen_kwargs) -> Answers:
    """Answer ``questions`` (one string, a list, or None for a plain continuation) about ``context``.

    ``budget`` tokens per KV head with ``policy`` (default: TRIM-KV retention, the attached gates); ``None`` = the
    full cache of the frozen model; ``head_budgets``: per-head budgets (an allocation of ``trimkv profile``, see
    :func:`~trimkv.serve.make_cache`). Greedy decoding unless ``gen_kwargs`` say otherwise (they go to ``generate``)."""
    questions = [questions] if isinstance(questions, str) else list(questions or [""])
    if not all(isinstance(q, str) for q in questions):
        raise DataError(f"questions must be a string or a list of strings, got {questions!r:.80}")
    if not isinstance(context, str):
        raise DataError(f"context must be a string, got {type(context).__name__}")
    context_text, question_texts = split_prompt(tokenizer, context, questions, chat=chat, answer_prefix=answer_prefix,
                                                **(template_kwargs or {}))
    device = input_device(model)
    encode = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # noqa: E731
    ctx = encode(context_text)
    t0 = time.perf_counter()
    cache = make_cache(model, policy or ("full" if budget is None else "trimkv"), budget, sink=sink, window=window,
                       **({} if head_budgets is None else {"head_budgets": head_budgets}))
    # all but the context's last token: each question starts with it, so generate always has a token to feed
    prefill(model, ctx[:, :-1], cache, chunk=prefill_chunk)
    out = Answers([], int(ctx.shape[1]), [], kv_nbytes(cache))
    for text in question_texts:
        q = encode(text)
        own = clone_cache(cache)
        gen = generate(model, tokenizer, torch.cat([ctx, q], dim=1), cache=own, resume=True,
                       prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, **gen_kwargs)
        out.answers.append(gen.text)
        out.question_tokens.append(int(q.shape[1]))
        out.answer_kv_bytes.append(gen.kv_bytes)
    out.seconds = time.perf_counter() - t0
    return out

"""Eager prefill and generation with any cache: the one chunked prefill, and ``generate`` around ``model.generate``.

    logits, pos = prefill(model, ids, cache, chunk=256)         # the prompt into the cache, chunk by chunk
    out = generate(model, tok, "a long prompt ...", budget=64)   # TRIM-KV at 64 tokens per KV head -> Generation

Both run the model the way the cache needs it (:func:`trimkv.serve.factory.gates_for`: gated for TRIM-KV, frozen
for the full cache and the heuristics). A prompt is prefilled ``chunk`` tokens per forward, so a bounded cache never
holds more than ``budget + chunk`` tokens per head. ``generate`` on a fresh cache lets ``model.generate`` prefill
with ``prefill_chunk_size`` (the same chunks as :func:`prefill`; a test checks the caches end equal); on a cache
that already holds the start of the prompt (``resume=True``) it prefills the rest with :func:`prefill` and
``model.generate`` feeds only the prompt's last token.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import Cache

from ..base_model import input_device
from ..compat import cache_kwargs
from ..errors import CacheError
from .factory import gates_for, kv_nbytes, make_cache
from .policies import EvictionPolicy


@dataclass
class Generation:
    text: str
    new_tokens: int
    prompt_tokens: int
    kv_bytes: int          # bytes held by the cache after generation
    seconds: float


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache: Cache, *, attention_mask: torch.Tensor | None = None,
            chunk: int = 256) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run ids [B, T] through ``model`` into ``cache``, ``chunk`` tokens per forward, continuing from what the cache
    holds -> (next-token logits [B, V] of the last position, or None for T = 0; positions [B, T]).

    Only the last position's logits are computed where the model allows it. Positions follow ``attention_mask`` like
    ``generate`` (the real tokens of a left-padded row count from 0; only for an empty cache); each chunk sees the
    mask up to its end, so padding enters a bounded cache as empty slots."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
    B, T = ids.shape
    start = cache.get_seq_length()
    if attention_mask is None:
        pos = torch.arange(start, start + T, device=ids.device).expand(B, T)
    elif start:
        raise ValueError("prefill with an attention_mask starts from an empty cache (call cache.reset() first)")
    else:
        attention_mask = attention_mask.to(ids.device)
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    kwargs = cache_kwargs(model, cache)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    logits = None
    with gates_for(model, cache):
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            mask = None if attention_mask is None else attention_mask[:, :e]
            logits = model(input_ids=ids[:, s:e], attention_mask=mask, position_ids=pos[:, s:e], use_cache=True,
                           **kwargs).logits[:, -1]
    return logits, pos


def generate(model, tokenizer, prompt: str | torch.Tensor, *, budget: int | None = None,
             policy: str | EvictionPolicy | None = None, sink: int = 4, window: int = 16, cache: Cache | None = None,
             resume: bool = False, prefill_chunk: int = 256, max_new_tokens: int = 32, **gen_kwargs) -> Generation:
    """Greedy generation (unless ``gen_kwargs`` say otherwise) with ``budget`` tokens per KV head and ``policy``
    (default TRIM-KV; ``budget=None``: the full cache), or with a ready ``cache``.

    A used cache is refused (it would continue an earlier sequence) unless ``resume=True``: then it must hold the
    start of this prompt, and generation continues from it (the question pipeline does that with a copy of a
    prefilled context)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"] if isinstance(prompt, str) \
        else prompt
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise CacheError(f"generate() answers one prompt: ids must be [1, T], got {list(ids.shape)}; loop over the "
                         "prompts, or use trimkv.fast_generate for a batch")
    ids = ids.to(input_device(model))
    if cache is None:
        cache = make_cache(model, policy or ("full" if budget is None else "trimkv"), budget, sink=sink,
                           window=window)
    seen = cache.get_seq_length()
    if seen and not resume:
        raise CacheError(f"this cache already holds {seen} tokens of an earlier sequence: generate() would continue "
                         "from them; pass a fresh cache, call cache.reset() first, or pass resume=True to continue")
    if seen >= ids.shape[1]:
        raise CacheError(f"resume=True: the cache holds {seen} tokens, the prompt has only {ids.shape[1]}; the cache "
                         "must hold the start of the prompt, not all of it")
    gen_kwargs.setdefault("do_sample", False)
    if seen:
        prefill(model, ids[:, seen:-1], cache, chunk=prefill_chunk)   # generate() then feeds the last token only
    else:
        gen_kwargs["prefill_chunk_size"] = prefill_chunk
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with gates_for(model, cache), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **gen_kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()),
                      int(ids.shape[1]), kv_nbytes(cache), seconds)

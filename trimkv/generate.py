"""Generation helpers: the same prompt with the full cache and with a memory-bounded one, with KV byte counts."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from .cache import BoundedCache, RetentionCache, dynamic_cache_nbytes
from .compat import cache_kwargs
from .errors import CacheError
from .base_model import input_device
from .policies import EvictionPolicy


@dataclass
class Generation:
    text: str
    new_tokens: int
    prompt_tokens: int
    kv_bytes: int          # bytes held by the cache after generation
    seconds: float


def new_cache(model, budget: int | None = None, *, sink: int = 4, window: int = 16,
              policy: EvictionPolicy | None = None) -> Cache:
    """``budget=None``: transformers' full DynamicCache; else a RetentionCache of ``budget`` tokens per KV head."""
    if budget is None:
        return DynamicCache(config=model.config)
    return RetentionCache.for_model(model, budget, sink=sink, window=window, policy=policy)


def kv_nbytes(cache: Cache) -> int:
    """Bytes of K/V (and slot metadata) a cache holds."""
    return cache.nbytes() if isinstance(cache, BoundedCache) else dynamic_cache_nbytes(cache)


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
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        mask = None if attention_mask is None else attention_mask[:, :e]
        logits = model(input_ids=ids[:, s:e], attention_mask=mask, position_ids=pos[:, s:e], use_cache=True,
                       **kwargs).logits[:, -1]
    return logits, pos


def generate(model, tokenizer, prompt: str | torch.Tensor, *, budget: int | None = None, sink: int = 4,
             window: int = 16, policy: EvictionPolicy | None = None, cache: Cache | None = None,
             prefill_chunk: int = 256, max_new_tokens: int = 32, **gen_kwargs) -> Generation:
    """Greedy generation with ``budget`` tokens per KV head (``None`` = transformers' full DynamicCache), or with a
    ready ``cache``.

    The prompt is prefilled in chunks of ``prefill_chunk`` tokens so the bounded cache never holds more than
    ``budget + prefill_chunk`` tokens per head.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        ids = prompt
    ids = ids.to(input_device(model))
    if cache is None:
        cache = new_cache(model, budget, sink=sink, window=window, policy=policy)
    elif cache.get_seq_length() > 0:
        raise CacheError(f"this cache already holds {cache.get_seq_length()} tokens of an earlier sequence: "
                         "generate() would continue from them; pass a fresh cache or call cache.reset() first")
    gen_kwargs.setdefault("do_sample", False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                             max_new_tokens=max_new_tokens, prefill_chunk_size=prefill_chunk,
                             pad_token_id=pad, **gen_kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()),
                      int(ids.shape[1]), kv_nbytes(cache), seconds)

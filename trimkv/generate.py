"""Generation helpers: the same prompt with the full cache and with a memory-bounded one, with KV byte counts."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from .cache import BoundedCache, RetentionCache, dynamic_cache_nbytes
from .compat import cache_kwargs
from .errors import CacheError
from .models import input_device
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

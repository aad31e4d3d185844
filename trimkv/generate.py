"""Generation helpers: the same prompt with the full cache and with a memory-bounded one, with KV byte counts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import RetentionCache, dynamic_cache_nbytes


@dataclass
class Generation:
    text: str
    new_tokens: int
    prompt_tokens: int
    kv_bytes: int          # bytes held by the cache after generation
    seconds: float


def generate(model, tokenizer, prompt: str | torch.Tensor, *, budget: int | None = None, sink: int = 4,
             window: int = 16, prefill_chunk: int = 256, max_new_tokens: int = 32, **gen_kwargs) -> Generation:
    """Greedy generation with ``budget`` tokens per KV head (``None`` = transformers' full DynamicCache).

    The prompt is prefilled in chunks of ``prefill_chunk`` tokens so the bounded cache never holds more than
    ``budget + prefill_chunk`` tokens per head.
    """
    import time

    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    else:
        ids = prompt
    ids = ids.to(next(model.parameters()).device)
    if budget is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = RetentionCache.for_model(model, budget, sink=sink, window=window)
    gen_kwargs.setdefault("do_sample", False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, prefill_chunk_size=prefill_chunk,
                             pad_token_id=pad, **gen_kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    nbytes = cache.nbytes() if isinstance(cache, RetentionCache) else dynamic_cache_nbytes(cache)
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()),
                      int(ids.shape[1]), nbytes, seconds)

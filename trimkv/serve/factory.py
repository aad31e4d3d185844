"""One way to make a cache for a model, and the one rule for which model a cache runs (gated or frozen).

    cache = make_cache(model, "trimkv", budget=64)                    # 64 tokens per (layer, KV head), TRIM-KV
    cache = make_cache(model, "snapkv", budget=64)                    # a heuristic: no gates needed
    cache = make_cache(model, "trimkv", budget=64, scope="global")    # one pool of 64 x layers x KV heads slots
    cache = make_cache(model, "snapkv", 64, head_budgets="checkpoints/smollm2-135m-lukv")   # LU-KV per-head budgets
    cache = make_cache(model, "full")                                 # transformers' DynamicCache, no eviction

``budget`` always means tokens per (layer, KV head), on average for the global pool, so caches with the same budget
hold the same KV memory whatever their scope. Making a bounded cache installs trimkv's hooks on the model (once; no
gates needed; ``model.trimkv.detach()`` removes them).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import Cache, DynamicCache

from ..attach import install_hooks
from ..errors import CacheError
from .budgets import resolve_head_budgets
from .cache import BoundedCache, RetentionCache, check_tokens
from .policies import SCOPES, EvictionPolicy, get_policy, parse_policy
from .pool import GlobalRetentionCache

FULL = "full"


def model_shape(model) -> tuple[int, int]:
    """(decoder layers, KV heads) of a transformers causal LM."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def make_cache(model, policy: str | EvictionPolicy | None = "trimkv", budget: int | None = None, *,
               scope: str = "head", sink: int = 4, window: int = 16, floor: int = 1, lookahead: int = 0,
               head_budgets=None) -> Cache:
    """A fresh cache for one batch of sequences of ``model``.

    ``policy``: a name (``trimkv``, ``streaming``, ``h2o``, ... of :data:`trimkv.serve.policies.POLICIES`;
    ``"<name>-global"`` = that policy with ``scope="global"``), a policy object, or ``"full"`` / None for
    transformers' DynamicCache (no eviction, no budget). ``budget``: tokens per (layer, KV head). ``scope``:
    ``"head"`` (every head keeps ``budget`` tokens) or ``"global"`` (one pool of ``budget * layers * KV heads``
    slots, every head keeping at least ``floor``). ``sink`` first and ``window`` most recent tokens are always kept
    and count toward the budget. ``lookahead``: DBTrimKV's look-ahead score for the TRIM-KV policy.
    ``head_budgets`` (scope ``"head"`` only): ``"uniform"`` / None, an allocation (``trimkv profile``'s folder or
    file, or a :class:`~trimkv.serve.budgets.HeadAllocation`: the policy's shares scaled to ``budget``, every head
    above ``sink + window``), or integer budgets [layers, KV heads] summing to ``budget * layers * KV heads``.
    """
    if policy is None or policy == FULL:
        if budget is not None:
            raise CacheError(f"the full cache keeps every token: budget={budget} does not apply (pick a policy)")
        return DynamicCache(config=model.config)
    if isinstance(policy, str):
        name, suffix_scope = parse_policy(policy)
        scope = suffix_scope if suffix_scope != "head" else scope
        if lookahead and name != "trimkv":
            raise CacheError(f"lookahead={lookahead} is an option of the TRIM-KV policy ('trimkv'), not of {name!r}")
        policy = get_policy(name, **({"lookahead": lookahead} if lookahead else {}))
    elif lookahead:
        raise CacheError(f"lookahead={lookahead} applies to a policy given by name; build "
                         f"RetentionPolicy(lookahead={lookahead}) instead of passing {policy!r} with it")
    if scope not in SCOPES:
        raise CacheError(f"scope must be one of {SCOPES}, got {scope!r}")
    if budget is None:
        raise CacheError(f"policy {policy!r} needs a budget (tokens per KV head); use policy='full' for no eviction")
    check_tokens("budget", budget, 1)
    num_layers, num_kv_heads = model_shape(model)
    if scope == "global" and head_budgets is not None and not (isinstance(head_budgets, str) and
                                                               head_budgets == "uniform"):
        raise CacheError("the global pool (scope='global') sizes each head at run time from the scores: it takes no "
                         "head_budgets; use scope='head' (a budget per head) or drop head_budgets")
    rows = resolve_head_budgets(head_budgets, num_layers=num_layers, num_kv_heads=num_kv_heads, budget=budget,
                                floor=sink + window + 1, policy=policy.name) if scope == "head" else None
    install_hooks(model)
    if scope == "global":
        return GlobalRetentionCache(budget * num_layers * num_kv_heads, num_layers, num_kv_heads, floor=floor,
                                    sink=sink, window=window, policy=policy)
    return RetentionCache(budget, num_layers, sink=sink, window=window, policy=policy, head_budgets=rows)


def budget_nbytes(cache: Cache) -> int:
    """Bytes of K/V (and slot metadata) a cache's budget pays for: per-head budgets without their padding slots
    (equal to the uniform cache of the same mean budget); every other cache as :func:`kv_nbytes`."""
    return cache.budget_nbytes() if isinstance(cache, BoundedCache) else kv_nbytes(cache)


def kv_nbytes(cache: Cache) -> int:
    """Bytes of K/V (and slot metadata) a cache holds: trimkv's caches count themselves, others by their layers."""
    if isinstance(cache, BoundedCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None), getattr(layer, "logb", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def gates_for(model, cache: Cache | None) -> Iterator[None]:
    """Run ``model`` as ``cache`` needs it: with its gates and LoRA adapters when the cache's policy reads the gates
    (TRIM-KV, the soft-gated full cache), else the frozen original model (the full cache and every heuristic)."""
    handle = getattr(model, "trimkv", None)
    if handle is None or getattr(cache, "uses_gates", False):
        yield
        return
    with handle.disabled():
        yield


__all__ = ["FULL", "make_cache", "kv_nbytes", "budget_nbytes", "gates_for", "model_shape"]

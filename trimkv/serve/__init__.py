"""Serving: memory-bounded KV caches, eviction policies, prefill and generation (read them in this order).

* :mod:`.factory`     - ``make_cache(model, policy, budget, scope=...)``: the one way to make a cache for a model;
  ``gates_for``: the one rule for whether a forward runs gated (TRIM-KV) or frozen (full cache, heuristics).
* :mod:`.cache`       - the per-head bounded cache: slot buffers, ``BoundedLayer.attend`` (insert -> attend ->
  compact), the decode-time eviction step.
* :mod:`.eviction`    - the mechanics every policy shares: protection (sink, window, empty), victim writes, top-k.
* :mod:`.policies`    - one scoring rule per file: TRIM-KV retention (and its fused Triton decode step), StreamingLLM,
  H2O, SnapKV, TOVA, K-norm, KeyDiff, random.
* :mod:`.pool`        - one pool of slots for all layers and heads (DBTrimKV's global budget).
* :mod:`.budgets`     - per-head budgets: LU-KV's allocation math (PAVA, greedy) and the allocation file.
* :mod:`.soft`        - the full cache with soft-gated attention (the training form at inference).
* :mod:`.generation`  - the one chunked ``prefill`` and ``generate`` (eager, around ``model.generate``).
* :mod:`.decode`      - the compiled fixed-memory decode step (CUDA graphs on GPU): ``CompiledDecoder``.
* :mod:`.pipeline`    - questions about a long context: prefill once, a cache copy per question.
* :mod:`.hf`          - the same in transformers' words: ``cache_implementation="trimkv"`` and a registered pipeline.

A decode step's route: the attention pre-hook (:mod:`trimkv.attach`) -> ``layer.stage`` -> ``cache.update``
(transformers) -> the ``"trimkv"`` attention (:mod:`trimkv.attention_impl`) -> ``layer.attend`` -> the policy.
"""
from .cache import BoundedCache, BoundedLayer, RetentionCache, RetentionLayer
from .decode import CompiledDecoder, fast_generate
from .factory import FULL, gates_for, kv_nbytes, make_cache
from .generation import Generation, generate, prefill
from .pipeline import Answers, answer
from .hf import TrimKVTextGenerationPipeline, register_with_transformers
from .policies import POLICIES, SCOPES, EvictionPolicy, RetentionPolicy, get_policy
from .pool import GlobalRetentionCache
from .soft import SoftRetentionCache

__all__ = ["make_cache", "gates_for", "kv_nbytes", "FULL", "BoundedCache", "BoundedLayer", "RetentionCache",
           "RetentionLayer", "GlobalRetentionCache", "SoftRetentionCache", "EvictionPolicy", "RetentionPolicy",
           "POLICIES", "SCOPES", "get_policy", "prefill", "generate", "Generation", "CompiledDecoder",
           "fast_generate", "answer", "Answers", "register_with_transformers", "TrimKVTextGenerationPipeline"]

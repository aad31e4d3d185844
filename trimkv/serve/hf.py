"""trimkv in transformers' own vocabulary: ``cache_implementation="trimkv"`` for ``generate``, ``GenerationConfig``
and pipelines, and a registered pipeline for questions about a long context.

    import trimkv
    trimkv.register_with_transformers()                    # once per process (explicit: importing has no effects)
    out = model.generate(ids, cache_implementation="trimkv", cache_config={"budget": 64}, max_new_tokens=32)
    pipe = transformers.pipeline("trimkv-text-generation", model=model, tokenizer=tok)
    pipe(document, question="Who ...?", budget=64)         # {"answer": ..., "kv_bytes": ..., ...}

transformers 5.x has no public registry of cache implementations: ``GenerationConfig.validate`` accepts a fixed
tuple of names and ``generate`` builds the cache for those names in ``_prepare_cache_for_generation``. The documented
way to use any other cache is to pass the object (``generate(..., cache=make_cache(...))``, which keeps working);
:func:`register_with_transformers` adds the name ``"trimkv"`` to that tuple and, for that name only, builds the cache
with :func:`trimkv.serve.make_cache` from ``cache_config`` (the keyword arguments of ``make_cache``: ``policy``,
``budget``, ``scope``, ``sink``, ``window``, ``floor``, ``lookahead``, ``head_budgets``; ``budget`` defaults to the attached gates'
training budget). Every other name goes to transformers unchanged. Checked on transformers 5.6 and 5.24.

The pipeline (``"trimkv-text-generation"``, a ``transformers.Pipeline``) wraps :func:`trimkv.serve.answer`: the chat
template applied, the context prefilled once into a bounded cache, each question answered from a copy of it.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import AutoModelForCausalLM, Pipeline

from ..compat import cache_from, cache_name
from ..errors import CacheError
from .factory import make_cache
from .pipeline import answer

CACHE_IMPLEMENTATION = "trimkv"
PIPELINE_TASK = "trimkv-text-generation"
CACHE_CONFIG_KEYS = tuple(p for p in inspect.signature(make_cache).parameters if p != "model")


def cache_for_generation(model, cache_config: dict | None):
    """The cache ``cache_implementation="trimkv"`` asks for: ``make_cache(model, **cache_config)``, ``budget``
    defaulting to the attached gates' training budget."""
    kwargs = dict(cache_config or {})
    unknown = sorted(set(kwargs) - set(CACHE_CONFIG_KEYS))
    if unknown:
        raise CacheError(f"cache_config has {unknown}, which make_cache does not take; use {list(CACHE_CONFIG_KEYS)}")
    handle = getattr(model, "trimkv", None)
    gates = getattr(handle, "gates", None)
    kwargs.setdefault("policy", "trimkv")
    if kwargs.get("budget") is None and kwargs["policy"] not in (None, "full"):
        kwargs["budget"] = getattr(getattr(gates, "config", None), "train_budget", None)
        if kwargs["budget"] is None:
            raise CacheError('cache_implementation="trimkv" needs a budget: cache_config={"budget": 64} (tokens per KV '
                             "head; gates loaded with load_gates supply their training budget)")
    cache = make_cache(model, **kwargs)
    if handle is not None and handle.adapters is not None and handle.enabled and not getattr(cache, "uses_gates", False):
        raise CacheError(f"policy {kwargs['policy']!r} runs the frozen model, but this model has LoRA adapters on: "
                         "call generate inside `with model.trimkv.disabled():`, or use trimkv.generate")
    return cache


def register_with_transformers() -> None:
    """Teach transformers ``cache_implementation="trimkv"`` and the ``"trimkv-text-generation"`` pipeline task.
    Idempotent; affects this process only."""
    from transformers.generation import configuration_utils
    from transformers.generation.utils import GenerationMixin
    from transformers.pipelines import PIPELINE_REGISTRY

    if CACHE_IMPLEMENTATION not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS:
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS = (*configuration_utils.ALL_CACHE_IMPLEMENTATIONS,
                                                         CACHE_IMPLEMENTATION)
    original = GenerationMixin._prepare_cache_for_generation
    if not getattr(original, "_trimkv", False):
        @functools.wraps(original)
        def prepare(self, generation_config, model_kwargs, *args, **kwargs):
            if (generation_config.cache_implementation == CACHE_IMPLEMENTATION and cache_from(model_kwargs) is None
                    and generation_config.use_cache is not False):
                model_kwargs[cache_name(self)] = cache_for_generation(self, generation_config.cache_config)
                return None
            return original(self, generation_config, model_kwargs, *args, **kwargs)

        prepare._trimkv = True
        GenerationMixin._prepare_cache_for_generation = prepare
    if PIPELINE_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=TrimKVTextGenerationPipeline,
                                            pt_model=AutoModelForCausalLM)


class TrimKVTextGenerationPipeline(Pipeline):
    """Questions about a long context with a memory-bounded KV cache (:func:`trimkv.serve.answer`).

    ``pipe(context, question="...")`` -> ``{"answer", "context_tokens", "kv_bytes", "seconds"}``;
    ``pipe(context, questions=[...])`` -> the same with ``"answers"``; no question: a plain continuation. Options
    (per call or at construction): ``budget`` (tokens per KV head; None = the full cache), ``policy``, ``sink``,
    ``window``, ``prefill_chunk``, ``max_new_tokens``, ``chat``, ``answer_prefix``, ``head_budgets`` (an allocation
    of ``trimkv profile``)."""

    _OPTIONS = ("budget", "policy", "sink", "window", "prefill_chunk", "max_new_tokens", "chat", "answer_prefix",
                "head_budgets")
    _load_processor = _load_image_processor = _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None, **kwargs):
        unknown = sorted(set(kwargs) - set(self._OPTIONS))
        if unknown:
            raise CacheError(f"{PIPELINE_TASK} does not take {unknown}; its options are {list(self._OPTIONS)}")
        if question is not None and questions is not None:
            raise CacheError("give question= or questions=, not both")
        pre = {}
        if question is not None or questions is not None:
            pre["questions"] = [question] if question is not None else list(questions)
            pre["single"] = question is not None
        return pre, kwargs, {}

    def preprocess(self, context: str, questions: list[str] | None = None, single: bool = True) -> dict[str, Any]:
        if not isinstance(context, str):
            raise CacheError(f"{PIPELINE_TASK} takes a context string, got {type(context).__name__}")
        return {"context": context, "questions": questions, "single": single}

    def _forward(self, inputs: dict[str, Any], **options) -> dict[str, Any]:
        out = answer(self.model, self.tokenizer, inputs["context"], inputs["questions"], **options)
        return {"result": out, "single": inputs["single"] or inputs["questions"] is None}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        out = outputs["result"]
        found = {"answer": out.answers[0]} if outputs["single"] else {"answers": list(out.answers)}
        return {**found, "context_tokens": out.context_tokens, "kv_bytes": out.kv_bytes, "seconds": out.seconds}

    def _ensure_tensor_on_device(self, inputs, device):
        return inputs                              # strings in, strings out: answer() places its own tensors


__all__ = ["register_with_transformers", "cache_for_generation", "TrimKVTextGenerationPipeline",
           "CACHE_IMPLEMENTATION", "PIPELINE_TASK"]

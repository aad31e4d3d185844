"""The one place that knows how the installed transformers names things that changed between 5.x releases.

transformers 5.24 renamed the cache keyword: models, attention modules and ``generate`` take ``cache=`` and warn on
``past_key_values=`` (removed in 6.0); releases up to 5.23 take ``past_key_values=`` only. trimkv reads the name
from the model's own ``forward`` signature (a public interface) instead of from a version number, so a model class
that has not been migrated yet keeps working too.

    model(ids, **cache_kwargs(model, cache))              # the right keyword for this model
    model.generate(ids, **cache_kwargs(model, cache))
    cache = cache_from(kwargs)                            # in a forward pre-hook: either name
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")   # newest first


@functools.lru_cache(maxsize=None)
def _cache_name_of(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_name(model: Any) -> str:
    """``"cache"`` when ``model.forward`` takes a ``cache`` argument (transformers >= 5.24), else
    ``"past_key_values"``."""
    forward = getattr(type(model), "forward", None)
    if forward is None:
        return "past_key_values"
    return _cache_name_of(forward)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the keyword this model's forward (and ``generate``) expects."""
    return {cache_name(model): cache}


def cache_from(kwargs: dict[str, Any]) -> Any:
    """The cache passed to a module call under either name (``None`` when there is none)."""
    for name in CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None

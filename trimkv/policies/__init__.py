"""Eviction policies for :class:`trimkv.cache.RetentionCache` (TRIM-KV and heuristic baselines)."""
from .base import EvictionPolicy, RetentionPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"trimkv": RetentionPolicy}


def get_policy(name: str, **kwargs) -> EvictionPolicy:
    """Build a policy by name (``trimkv``, or a baseline registered in ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; available: {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


__all__ = ["EvictionPolicy", "RetentionPolicy", "POLICIES", "get_policy"]

"""Eviction policies for :class:`trimkv.cache.RetentionCache` (TRIM-KV and heuristic baselines).

One policy per file, each a scoring rule (higher = keep) whose docstring cites its paper and lists deviations.
The full cache (no eviction) is not a policy: use transformers' ``DynamicCache`` (the eval harness calls it
``"full"``).
"""
from .base import EvictionPolicy, RetentionPolicy
from .h2o import H2OPolicy
from .keydiff import KeyDiffPolicy
from .knorm import KNormPolicy
from .random_policy import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "trimkv": RetentionPolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "snapkv": SnapKVPolicy,
    "tova": TOVAPolicy,
    "knorm": KNormPolicy,
    "keydiff": KeyDiffPolicy,
    "random": RandomPolicy,
}


def get_policy(name: str, **kwargs) -> EvictionPolicy:
    """Build a policy by name (``trimkv``, or a baseline registered in ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; available: {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


__all__ = ["EvictionPolicy", "RetentionPolicy", "H2OPolicy", "KeyDiffPolicy", "KNormPolicy", "RandomPolicy",
           "SnapKVPolicy", "StreamingPolicy", "TOVAPolicy", "POLICIES", "get_policy"]

"""Eviction policies of the bounded caches: TRIM-KV and the training-free baselines of the field.

One policy per file, each a small object whose docstring cites its paper and lists deviations; :mod:`.base` says what
a policy is (the moments a cache layer asks it). The full cache (no eviction) is not a policy: it is transformers'
``DynamicCache`` (``trimkv.make_cache(model, "full")``).
"""
from ...names import GLOBAL_SUFFIX, POLICY_NAMES, check_names
from .base import AttentionPolicy, EvictionPolicy, NewTokens
from .caote import CAOTEPolicy
from .h2o import H2OPolicy
from .keydiff import KeyDiffPolicy
from .knorm import KNormPolicy
from .kvp import KVPPolicy
from .laq import LAQPolicy
from .obcache import OBCachePolicy
from .random_policy import RandomPolicy
from .retention import RecencyPolicy, RetentionPolicy
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
    "caote": CAOTEPolicy,
    "obcache": OBCachePolicy,
    "laq": LAQPolicy,
    "kvp": KVPPolicy,
}
check_names("trimkv.serve.policies.POLICIES", POLICIES, POLICY_NAMES)
SCOPES = ("head", "global")   # a budget per (layer, KV head), or one pool for all of them


def get_policy(name: str, **kwargs) -> EvictionPolicy:
    """Build a policy by name (one of ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; available: {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)


def parse_policy(spec: str) -> tuple[str, str]:
    """``"trimkv"`` -> ``("trimkv", "head")``; ``"trimkv-global"`` -> ``("trimkv", "global")``."""
    if spec.endswith(GLOBAL_SUFFIX):
        return spec[: -len(GLOBAL_SUFFIX)], "global"
    return spec, "head"


__all__ = ["EvictionPolicy", "AttentionPolicy", "NewTokens", "RetentionPolicy", "RecencyPolicy", "H2OPolicy",
           "KeyDiffPolicy", "KNormPolicy", "KVPPolicy", "RandomPolicy", "SnapKVPolicy", "StreamingPolicy", "TOVAPolicy",
           "CAOTEPolicy", "OBCachePolicy", "LAQPolicy",
           "POLICIES", "SCOPES", "get_policy", "parse_policy"]

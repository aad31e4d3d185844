"""KVP: per-head eviction rankers learned from key/value traces (KV Policy, Moschella et al., arXiv 2602.10238).

Read in this order:

* :mod:`.ranker`     - :class:`KVPRankers`: one small MLP per (layer, KV head), score = f(k, v, position).
* :mod:`.objective`  - the paper's all-budget ranking reward; its closed-form expectation and the RLOO estimator.
* :mod:`.train`      - :func:`train_rankers`: layer by layer from a trace store's :class:`~trimkv.trace.LayerTrace` s.
* :mod:`.checkpoint` - save / load (checked) / push, a folder like a gate checkpoint.
* :mod:`.run`        - ``trimkv kvp train``: a store folder -> a checkpoint folder, resumable per layer.

Serving: the policy ``kvp`` (:class:`trimkv.serve.policies.KVPPolicy`) of the bounded cache.
"""
from .checkpoint import load_kvp_config, load_rankers, push_rankers, save_rankers
from .objective import OBJECTIVES, expected_cost, normalized_cost, ranking_cost
from .ranker import KVPConfig, KVPRankers
from .train import train_rankers

__all__ = ["KVPConfig", "KVPRankers", "train_rankers", "save_rankers", "load_rankers", "load_kvp_config",
           "push_rankers", "OBJECTIVES", "ranking_cost", "expected_cost", "normalized_cost"]

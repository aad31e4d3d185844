"""The names the command line offers before anything heavy loads (no torch here): eviction policies, evaluation
tasks, weight dtypes. Their implementations live in :mod:`trimkv.serve.policies`, :mod:`trimkv.eval.tasks` and
:mod:`trimkv.base_model`, which build their tables from these tuples and refuse, at import, to disagree with them."""
from __future__ import annotations

POLICY_NAMES = ("trimkv", "streaming", "h2o", "snapkv", "tova", "knorm", "keydiff", "random", "caote", "obcache", "laq",
                "kvp")
GLOBAL_SUFFIX = "-global"   # "<policy>-global": that policy in the global pool (scope "global")
EVAL_POLICY_NAMES = ("full", *POLICY_NAMES, "trimkv" + GLOBAL_SUFFIX, "oracle")   # the full cache and the needle oracle too
TASK_NAMES = ("passkey", "multikey_needle", "multivalue_needle", "kv_retrieval", "variable_tracking", "frequent_words")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")   # "auto": the dtype the checkpoint was saved in


def check_names(owner: str, table, names: tuple[str, ...]) -> None:
    """Raise if ``table``'s keys are not ``names`` (in order): one list of names, kept in one place."""
    if tuple(table) != tuple(names):
        raise RuntimeError(f"{owner} defines {tuple(table)} but trimkv.names lists {tuple(names)}: add the new name "
                           "to trimkv/names.py too")

# LU-KV profiling (trimkv.eval.profile, `trimkv profile --ratios`): the global keep ratios (mean budget / prompt
# length) whose greedy solutions are averaged into one allocation; M ~ 30 .. 330 tokens per head at 2k.
LUKV_GRID = (0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16)
# ... and what one budget of an allocation covers: one (layer, KV head), or all KV heads of a layer (`--per`).
LUKV_GRANULARITIES = ("head", "layer")
# trace store targets (trimkv.trace.targets); future@<h>, later@<h> per horizon
TRACE_TARGETS = ("future", "later", "mean", "answer", "recon")

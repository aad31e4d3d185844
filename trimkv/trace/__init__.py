"""The trace store: what the frozen model's own attention says about each token's future use (issue 21).

    store = write_traces(model, tokenizer, data_cfg, "runs/traces/qa", TraceSettings(rows=64))   # or `trimkv trace`
    store = TraceStore("runs/traces/qa")
    lt = store.layer(3)                   # LayerTrace: keys, values, pos, valid, utility targets [, hidden]
    lt.target("future")                   # [R, Hkv, T] fp32

:mod:`.layer` is the contract with the learners, :mod:`.targets` what the targets mean, :mod:`.capture` how they are
read out of the model (trimkv's hooks), :mod:`.store` the files, :mod:`.collect` the writer. The learners: :mod:`.fit`
(gates fitted on a store, layer by layer), :mod:`.pool` (their scores calibrated across heads for the global pool),
and the KVP rankers (:mod:`trimkv.kvp`).
"""
from .layer import DEFAULT_TARGET, LayerTrace
from .settings import TraceSettings
from .store import TraceStore

__all__ = ["LayerTrace", "DEFAULT_TARGET", "TraceSettings", "TraceStore", "write_traces"]


def __getattr__(name: str):
    if name == "write_traces":       # the writer imports transformers; readers need not
        from .collect import write_traces

        return write_traces
    raise AttributeError(f"module 'trimkv.trace' has no attribute {name!r}")

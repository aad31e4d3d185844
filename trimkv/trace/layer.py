"""What the trace store holds for one decoder layer: the learners' inputs and the future-utility targets.

The trace store (:mod:`trimkv.trace`) runs the frozen model once over a data source and keeps, per decoder layer,
one :class:`LayerTrace` over its R rows of T tokens. Learners read only this: the hidden-state gates read
``hidden``, key/value learners (KVP rankers) read ``keys``, ``values`` and ``pos``; every learner fits the
``utility`` targets.

Utility targets (``[R, Hkv, T]`` fp32, one value per token and KV head, aggregated over the query heads of the KV
group; 0 where ``valid`` is False):

==================  ================================================================================================
``future``          the attention token i receives from every later query j > i of its row (max over j and over
                    the group's query heads): the default target
``future@<h>``      the same over the next h queries only (i < j <= i + h), for a few horizons h
``mean``            the mean attention received from the later queries of its document (mean over the queries and
                    the group's query heads; H2O's accumulated attention per reader)
``answer``          the attention received from the answer tokens of a QA row only (0 for rows without an answer):
                    from the queries that produce them, j with ``loss_mask[j + 1]`` (:mod:`trimkv.trace.targets`)
``recon``           a KVzip-style score: attention received while the model reads the context a second time
                    (optional: a second forward, about 3.5x the cost of the first on the 2-core CPU)
==================  ================================================================================================

Which targets a store holds is in its manifest; ``future`` is always there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_TARGET = "future"


@dataclass
class LayerTrace:
    """One decoder layer of a trace store, over R rows of T tokens (rows padded to T; ``valid`` says which are real)."""

    layer: int
    keys: torch.Tensor                    # [R, Hkv, T, D] post-RoPE keys (16-bit on disk)
    values: torch.Tensor                  # [R, Hkv, T, D]
    pos: torch.Tensor                     # [R, T] int64 token positions
    valid: torch.Tensor                   # [R, T] bool, False = padding
    utility: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> [R, Hkv, T] fp32
    hidden: torch.Tensor | None = None    # [R, T, hidden] the attention input x_i (the gates' input), if stored

    def __post_init__(self) -> None:
        R, H, T, _ = self.keys.shape
        checks = {"values": (self.values.shape[:3], (R, H, T)), "pos": (tuple(self.pos.shape), (R, T)),
                  "valid": (tuple(self.valid.shape), (R, T))}
        checks.update({f"utility[{k!r}]": (tuple(u.shape), (R, H, T)) for k, u in self.utility.items()})
        if self.hidden is not None:
            checks["hidden"] = (tuple(self.hidden.shape[:2]), (R, T))
        for name, (got, want) in checks.items():
            if tuple(got) != tuple(want):
                raise ValueError(f"LayerTrace of layer {self.layer}: {name} has shape {tuple(got)}, expected {want} "
                                 f"(keys are {tuple(self.keys.shape)})")

    @property
    def num_rows(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    def target(self, name: str = DEFAULT_TARGET) -> torch.Tensor:
        """The utility target ``name`` [R, Hkv, T] fp32; KeyError naming the ones this trace holds."""
        if name not in self.utility:
            raise KeyError(f"this trace holds the targets {sorted(self.utility)}, not {name!r}")
        return self.utility[name].float()

"""Fast paths (dispatch targets) for the PyTorch references in :mod:`trimkv.attention` and :mod:`trimkv.serve.policies.retention`.

* :mod:`.triton_attention` - Triton retention attention (forward + backward) and capacity sums (GPU; CPU only
  under ``TRITON_INTERPRET=1``, for tests).
* :mod:`.flex` - the same attention through ``torch.nn.attention.flex_attention`` with an additive score_mod.
* :mod:`.triton_evict` - the fused decode-time append+evict as one Triton kernel.

Nothing here is imported by ``trimkv`` at import time: Triton is optional.
"""
from __future__ import annotations

import importlib.util

__all__ = ["has_triton"]


def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None

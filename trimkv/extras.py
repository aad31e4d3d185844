"""Optional dependencies, one owner: which extra of the ``trimkv-gates`` distribution brings which package, and
importing one where a feature needs it (never at ``import trimkv``).

    peft = require("peft", "LoRA co-training (lora.enabled: true)")

Without the package this raises :class:`~trimkv.errors.MissingDependencyError` naming the feature, the package and
the ``pip install`` that brings it. The extras themselves are declared in ``pyproject.toml``
(``tests/test_packaging.py`` checks that the two agree).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ._version import DISTRIBUTION
from .errors import MissingDependencyError

EXTRAS = {                      # top-level package -> the extra that installs it
    "gguf": "smollm2",
    "peft": "lora",
    "matplotlib": "plots",
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "accelerate": "accelerate",
    "deepspeed": "deepspeed",
    "triton": "triton",
}


def install_hint(package: str, extra: str | None = None) -> str:
    """``pip install 'trimkv-gates[EXTRA]'`` for a package of :data:`EXTRAS` (``extra``: another extra that brings
    it too)."""
    return f"pip install '{DISTRIBUTION}[{extra or EXTRAS[package]}]'"


def require(module: str, feature: str, *, extra: str | None = None) -> ModuleType:
    """Import ``module`` (a package of :data:`EXTRAS` or one of its submodules) for ``feature``, or raise
    MissingDependencyError saying what to install (``extra``: the extra of that feature, when it is not the
    package's own)."""
    package = module.split(".")[0]
    if package not in EXTRAS:
        raise KeyError(f"{package!r} is not an optional dependency of trimkv (known: {sorted(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{feature} needs the package {package!r}, which is not installed ({err}): {install_hint(package, extra)} "
            f"(or pip install {package})") from err

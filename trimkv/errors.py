"""Every error trimkv raises on purpose, one type per layer, all under :class:`TrimKVError`.

A message names what is wrong (the field, file or argument and its value) and what to do about it. Catch
``TrimKVError`` to handle any of them; each also derives from the built-in exception a caller would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files, ...).
"""
from __future__ import annotations


class TrimKVError(Exception):
    """Base class of every error trimkv raises on purpose."""


class RecipeError(TrimKVError, ValueError):
    """A recipe field is unknown, mistyped or out of range."""


class DataError(TrimKVError, ValueError):
    """Bad training data or data config; the message says what to change."""


class ModelLoadError(TrimKVError, OSError):
    """The base model (a local folder or a Hub id) cannot be loaded."""


class GateCheckpointError(TrimKVError):
    """Base class of every gate checkpoint error (save, load, Hub)."""


class CheckpointNotFoundError(GateCheckpointError, FileNotFoundError):
    """The folder, a file in it, or the Hub repo does not exist (or is not reachable)."""


class CorruptCheckpointError(GateCheckpointError, ValueError):
    """A checkpoint file exists but cannot be read, or its contents do not match its config."""


class GateMismatchError(GateCheckpointError, ValueError):
    """The gates were trained for a base model of a different shape than the one given."""


class CacheError(TrimKVError, ValueError):
    """A bounded cache built or used wrongly (bad budget, reused for another sequence, ...)."""


class NonFiniteError(TrimKVError, FloatingPointError):
    """NaN or inf where a finite number is needed (gate weights, a training loss or gradient)."""


class ResumeError(TrimKVError, RuntimeError):
    """No usable training checkpoint, or one that does not fit this run."""


class MissingDependencyError(TrimKVError, ImportError):
    """A feature needs an optional package (an extra of the ``trimkv-gates`` distribution) that is not installed."""

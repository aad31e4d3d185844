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


class TraceStoreError(DataError):
    """A trace store (:mod:`trimkv.trace`) is missing, corrupt, or not the one asked for; the message names the file."""


class MissingTraceError(TraceStoreError, FileNotFoundError):
    """No trace store at the path, or a shard its manifest lists is gone."""


class CorruptTraceError(TraceStoreError):
    """A manifest or shard exists but cannot be read, or its tensors do not have the shapes the manifest says."""


class TraceMismatchError(TraceStoreError):
    """The store was written for another model, data source or trace settings than the ones given (resume)."""


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


class UsageError(TrimKVError, ValueError):
    """A command-line argument is wrong or does not fit the others (checked before any model loads)."""


def write_failed(err: BaseException, path) -> OSError:
    """An ``OSError`` naming ``path`` for a write that failed with ``err``: torch.save reports a full disk as a
    ``RuntimeError`` ("basic_ios::clear: iostream error") and Python's own ENOSPC may name no file. Raise it
    ``from err``; the errno is ENOSPC when the disk holding ``path`` is (nearly) full."""
    import errno
    import os
    import shutil

    code = getattr(err, "errno", None)
    if code is None:
        folder = os.path.dirname(os.path.abspath(path))
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        try:
            code = errno.ENOSPC if shutil.disk_usage(folder).free < (1 << 20) else errno.EIO
        except OSError:
            code = errno.EIO
    reason = getattr(err, "strerror", None) or os.strerror(code)
    return OSError(code, f"{reason} (while writing; {type(err).__name__}: {err})" if code == errno.EIO else reason,
                   str(path))


class MissingDependencyError(TrimKVError, ImportError):
    """A feature needs an optional package (an extra of the ``trimkv-gates`` distribution) that is not installed."""


class AllocationError(DataError):
    """A per-head budget allocation file (``trimkv profile``'s output) is missing, unreadable, or made for another
    model or policy."""


def decode_utf8(raw: bytes, where, error: type[TrimKVError], fix: str) -> str:
    """``raw`` decoded as UTF-8, else ``error`` naming ``where``, the line and the byte, and ``fix``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise error(f"{where}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): {fix}") \
            from None

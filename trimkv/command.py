"""What every ``trimkv`` sub-command shares: the parser (one-line errors, help with defaults and choices), argument
types, and the boundary that turns an error into one or two lines and an exit code.

Nothing here imports torch: ``trimkv --help`` and ``trimkv --version`` answer at once. Lists of valid names (policies,
tasks, dtypes) stay with the modules that own them and are read through :class:`Names` only when a value is checked
or a sub-command's help lists them.

Exit codes (:data:`EXIT_CODES`; the most specific class wins):

====  ==========================================================================================
0     done
1     another trimkv error (``TrimKVError``)
2     a wrong command-line argument (``UsageError``, or argparse's own check)
3     a recipe field (``RecipeError``)
4     training data, a prompt file (``DataError``)
5     the base model (``ModelLoadError``)
6     a gate checkpoint: missing, corrupt, mismatched (``GateCheckpointError``)
7     a KV cache: budget, misuse (``CacheError``)
8     NaN or inf (``NonFiniteError``)
9     a training run: busy, resume, earlier run in the folder (``ResumeError``)
10    a file or the network (``OSError``: disk full, permissions, no connection to the Hub)
70    an internal error: a bug (rerun with ``--debug`` for the traceback and report it)
130   interrupted (Ctrl-C)
====  ==========================================================================================

``--debug`` (or ``TRIMKV_DEBUG=1``) lets the exception through with its traceback; the Python API always raises the
typed errors.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable, Iterable, Sequence

from .errors import (CacheError, DataError, GateCheckpointError, ModelLoadError, NonFiniteError, RecipeError,
                     ResumeError, TrimKVError, UsageError)

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (KeyboardInterrupt, 130),
    (UsageError, 2),
    (RecipeError, 3),
    (DataError, 4),
    (ModelLoadError, 5),
    (GateCheckpointError, 6),
    (CacheError, 7),
    (NonFiniteError, 8),
    (ResumeError, 9),
    (TrimKVError, 1),
    (OSError, 10),
)
INTERNAL_ERROR = 70
_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "aiohttp")
_NETWORK_CLASSES = {"HTTPError", "RequestError", "TransportError", "NetworkError", "ConnectionError", "TimeoutException"}
_MAX_MESSAGE = 600      # characters of a library's message shown (a chained HTTP error can be pages long)


# ------------------------------------------------------------------------------------------- the parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and choices (descriptions keep their line breaks)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            return text
        extra = []
        choices = action.choices if action.choices is not None else getattr(action, "names", None)
        if choices is not None and "choices" not in text:   # ``names``: the valid items of a comma-separated list
            extra.append("choices: " + ", ".join(map(str, choices)))
        default = action.default
        if (action.option_strings and action.nargs != 0 and default not in (None, argparse.SUPPRESS, [], ())
                and "default" not in text.lower()):
            extra.append(f"default: {_shown(default)}")
        if not extra:
            return text
        return (text + " " if text else "") + "(" + "; ".join(extra).replace("%", "%%") + ")"


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (the problem, then where the help is) with exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Names:
    """Valid names read from their owner on first use: as argparse ``choices`` they cost no import until a value is
    checked or the help lists them. ``load`` returns the names."""

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load, self._names = load, None

    def _get(self) -> tuple:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    def __contains__(self, name) -> bool:
        return name in self._get()

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return ", ".join(self._get())


def common_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--debug`` and ``--verbose``, accepted before or after the sub-command (a sub-command's copy leaves the
    value given before it alone)."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the full traceback instead of one line (also: TRIMKV_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show the libraries' progress bars and warnings (weight loading, datasets, DeepSpeed)")


def add_command(sub, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command ``name`` of ``sub`` (``parser.add_subparsers()``) running ``func(args)``, with the options every
    command takes (``--debug``, ``--verbose``)."""
    p = sub.add_parser(name, help=help, description=description or help)
    common_options(p)
    p.set_defaults(func=func)
    return p


# ------------------------------------------------------------------------------------- argument types


def integer(lo: int | None = None, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either end open when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        _check_range(value, lo, hi, what)
        return value
    parse.__name__ = "integer"
    return parse


def _float_where(text: str, ok: Callable[[float], bool], expected: str) -> float:
    """``float(text)`` if ``ok`` holds for it (NaN and non-numbers never do), else an ArgumentTypeError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number between 0 and 1 (NaN refused)."""
    return _float_where(text, lambda v: 0.0 <= v <= 1.0, "a fraction between 0 and 1")


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    return _float_where(text, lambda v: 0.0 < v < float("inf"), "a finite number above 0")


def integers(lo: int | None = None, hi: int | None = None, what: str = "") -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each in ``[lo, hi]``, at least one. Where no value can be negative
    (``lo >= 0``), ``a-b`` stands for a to b: ``0,3,15-29``."""
    ranges = lo is not None and lo >= 0

    def one(item: str) -> list[int]:
        first, dash, last = item.partition("-") if ranges else (item, "", "")
        return list(range(int(first), int(last) + 1)) if dash else [int(first)]

    def parse(text: str) -> list[int]:
        try:
            values = [v for t in csv(text) for v in one(t)]
        except ValueError:
            shape = "integers or ranges (e.g. 0,3 or 15-29)" if ranges else "integers"
            raise argparse.ArgumentTypeError(f"expected comma-separated {shape}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one integer")
        for v in values:
            _check_range(v, lo, hi, what)
        return values
    parse.__name__ = "integers"
    return parse


def _check_range(value: int, lo: int | None, hi: int | None, what: str) -> None:
    if lo is not None and value < lo:
        raise argparse.ArgumentTypeError(f"{value} is below {lo}{f' ({what})' if what else ''}")
    if hi is not None and value > hi:
        raise argparse.ArgumentTypeError(f"{value} is above the limit {hi:,}{f' ({what})' if what else ''}")


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def names(valid: Names, noun: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``valid`` (e.g. ``--policies full,trimkv``)."""
    def parse(text: str) -> list[str]:
        values = csv(text)
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {noun}")
        bad = [v for v in values if v not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {noun}(s) {', '.join(map(repr, bad))}; choose from {valid!r}")
        return values
    parse.__name__ = f"{noun}s"
    return parse


# ----------------------------------------------------------------------------------------- the boundary


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command's ``func(args)``; an error ends in one or two lines on stderr and
    its exit code (:data:`EXIT_CODES`), or - with ``--debug`` - in its traceback."""
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("TRIMKV_DEBUG", "") not in ("", "0")
    quiet_libraries(verbose=bool(getattr(args, "verbose", False)))
    prog = " ".join(p for p in (parser.prog, getattr(args, "command", None)) if p)
    try:
        return int(args.func(args) or 0)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - the one place every error is turned into a short message
        if debug:
            raise
        code, message = explain(err, getattr(args, "command", None))
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: {message}\n")
        return code


def exit_code(err: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return 10 if _is_network_error(err) else INTERNAL_ERROR


def explain(err: BaseException, command: str | None = None) -> tuple[int, str]:
    """``(exit code, one or two lines)`` for an error that reached the command line (``command``: the sub-command)."""
    code = exit_code(err)
    if isinstance(err, KeyboardInterrupt):
        more = "; the training checkpoints written so far are intact: continue with --resume" if command == "train" else ""
        return code, f"interrupted (Ctrl-C){more}"
    if isinstance(err, TrimKVError):
        return code, "error: " + _one_line(str(err))
    if isinstance(err, OSError) and getattr(err, "filename", None):
        return code, f"error: {_os_error(err)}"
    text = _one_line(str(err), limit=_MAX_MESSAGE) or type(err).__name__
    if code == 10:
        return code, (f"error: {type(err).__name__}: {text}\n  a file or network problem: check the path, the "
                      "disk, or the connection to the Hugging Face Hub (HF_HUB_OFFLINE=1 to use only the local cache)")
    return code, (f"internal error: {type(err).__name__}: {text}\n  this is a bug in trimkv or a library it calls: "
                  "rerun with --debug for the traceback and report it")


def _os_error(err: OSError) -> str:
    where = err.filename if not err.filename2 else f"{err.filename} -> {err.filename2}"
    fix = {errno.ENOSPC: "the disk is full: free space or write somewhere else",
           errno.EDQUOT: "the disk quota is used up: free space or write somewhere else",
           errno.EACCES: "no permission: choose a folder you can write, or fix its permissions",
           errno.EPERM: "not permitted: choose a folder you can write, or fix its permissions",
           errno.EROFS: "the file system is read-only: write somewhere else",
           errno.ENOENT: "it does not exist: check the path",
           errno.EISDIR: "it is a folder: give a file path",
           errno.ENOTDIR: "a part of the path is a file, not a folder: check the path"}.get(err.errno)
    reason = err.strerror or _one_line(str(err), limit=_MAX_MESSAGE)
    return f"{where}: {reason}" + (f" ({fix})" if fix else "")


def _is_network_error(err: BaseException) -> bool:
    """An error of an HTTP client or the Hub library (``httpx2`` is huggingface_hub 2's), anywhere in the chain."""
    return any(type(e).__module__.startswith(_NETWORK_MODULES)
               or any(c.__name__ in _NETWORK_CLASSES for c in type(e).__mro__) for e in _chain(err))


def _chain(err: BaseException | None) -> Iterable[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _one_line(text: str, limit: int | None = None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------ quiet libraries


class _DeepSpeedProbe(logging.Filter):
    """Drops DeepSpeed's accelerator probe ("Setting accelerator to CPU ...", printed on stdout whenever something
    imports deepspeed) unless DeepSpeed is the engine or ``--verbose`` asked for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not record.pathname.endswith("real_accelerator.py")


_PROBE = _DeepSpeedProbe()


def quiet_libraries(*, verbose: bool = False) -> None:
    """Before anything is imported: no DeepSpeed accelerator probe and no datasets progress bars unless ``verbose``.
    (The weight-loading bar is :func:`quiet_loading`'s: it needs transformers imported.)"""
    ds = logging.getLogger("DeepSpeed")
    if verbose:
        ds.removeFilter(_PROBE)
        return
    ds.addFilter(_PROBE)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def deepspeed_in_use() -> None:
    """A run that trains with DeepSpeed shows all of DeepSpeed's messages."""
    logging.getLogger("DeepSpeed").removeFilter(_PROBE)


def quiet_loading(verbose: bool = False) -> None:
    """No transformers "Loading weights" bar unless ``verbose`` (called just before a model loads; Hub download bars
    stay on)."""
    if verbose:
        return
    try:
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hub_bars = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()     # also switches the Hub's bars off: put those back
    if hub_bars:
        hub_utils.enable_progress_bars()

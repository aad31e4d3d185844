"""An offline corpus of real English prose that ships with every Python: the standard library's own docs.

Gates are trained on real text and evaluated on real text (long-text fidelity, "prose" haystacks), and the
two must never share a document. With no internet at run time, the one body of human-written English
that is always present is the documentation inside the interpreter:

  * ``"train"`` - the docstrings (module, class, function, method) of a fixed list of pure-Python
    standard-library modules, ``_TRAIN_MODULES``: library prose ("Return the median of ...").
  * ``"eval"``  - the Python Language Reference topics stored in ``pydoc_data.topics`` (the text
    ``help("assert")`` shows), plus the docstrings of the modules in ``_EVAL_MODULES``.

The split is by module, and a paragraph that occurs in both (two modules can share a docstring or part
of one word for word) is dropped from train, so no paragraph, let alone a document, is in both splits.

One document is one docstring (or one reference topic), cleaned paragraph by paragraph: doctest
sessions, grammar rules, indented code and other symbol-heavy paragraphs are dropped, whitespace inside
a paragraph is collapsed to single spaces, and paragraphs are kept apart by a blank line. Documents that
are still shorter than ``min_chars`` (or that lost more than half their text to the filter) are skipped.

The order is deterministic for a given Python version; different Python versions ship different
docstrings, so the text itself differs between interpreters (``corpus_stats()`` reports the sizes).
Modules that do not import on this platform (``curses`` without ncurses, ...) are skipped silently.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import random
import re
import warnings

SPLITS = ("train", "eval")

# Language-reference topics and the docstrings of these modules form the eval split (kept small on
# purpose: train is what needs the volume).
_EVAL_MODULES = (
    "difflib",
    "email.message",
    "email.policy",
    "http.cookiejar",
    "pydoc_data.topics",
    "statistics",
)

# Importable without side effects (no prints, no network, no GUI, no global state a user would notice),
# pure Python, and not on the PEP 594 removal list, so the list keeps working on newer interpreters.
_TRAIN_MODULES = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.exceptions",
    "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.runners", "asyncio.streams",
    "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.timeouts", "asyncio.transports",
    "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures._base", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv",
    "ctypes", "dataclasses", "datetime", "dbm", "decimal", "dis", "doctest", "email", "email.charset",
    "email.contentmanager", "email.errors", "email.feedparser", "email.generator", "email.header",
    "email.headerregistry", "email.iterators", "email.mime.base", "email.mime.multipart", "email.mime.text",
    "email.parser", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http", "http.client", "http.cookies", "http.server", "imaplib",
    "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources",
    "importlib.util", "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma", "mailbox",
    "mimetypes", "modulefinder", "multiprocessing", "multiprocessing.connection", "multiprocessing.context",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process", "multiprocessing.queues",
    "multiprocessing.shared_memory", "multiprocessing.synchronize", "netrc", "numbers", "opcode",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "string", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "types",
    "typing", "unittest", "unittest.case", "unittest.loader", "unittest.main", "unittest.mock",
    "unittest.result", "unittest.runner", "unittest.suite", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "warnings", "wave", "weakref",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile",
    "zipimport", "zoneinfo",
    # Modules written in C: their docstrings are prose too ("Return the number of items in a container.").
    "_asyncio", "_csv", "_decimal", "_functools", "_io", "_pickle", "_socket", "_ssl", "_thread",
    "array", "binascii", "builtins", "cmath", "errno", "faulthandler", "gc", "itertools", "marshal", "math",
    "mmap", "posix", "pyexpat", "resource", "select", "sys", "termios", "time", "unicodedata", "zlib",
    # Pure-Python twins of C modules and private helpers with long docstrings of their own.
    "_collections_abc", "_pydecimal", "_pyio", "email._header_value_parser", "email._policybase",
)

_CODE_CHARS = set("()[]{}=<>_%*#/\\|@$`~^+")  # more than 6% of these in a paragraph: code, not prose
_UNDERLINE = re.compile(r"^\s*([-=*~^#+])\1{2,}\s*$")  # reST heading underlines: "*****", "====="


def prose_documents(split: str = "train", min_chars: int = 200) -> list[str]:
    """The cleaned documents of ``split``, in a fixed order; each is at least ``min_chars`` characters.

    Sizes on CPython 3.11 with the default ``min_chars``: train ~0.7 MB, eval ~0.2 MB (``corpus_stats()``).
    """
    return [d for d in _documents(_check_split(split)) if len(d) >= min_chars]


def prose_text(split: str, n_chars: int, seed: int = 0) -> str:
    """``n_chars`` characters of prose: the split's documents in a seeded random order, joined by blank lines.

    The text is cut at the last whitespace at or before ``n_chars`` (so it never ends mid-word unless one
    word is longer than the whole request). If the split holds fewer characters than asked, the documents
    are reshuffled and repeated, each pass in a new order.
    """
    docs = prose_documents(split)
    if n_chars <= 0:
        return ""
    rng = random.Random(f"trimkv.corpus:{split}:{seed}")   # the module's old name: the seed string stays, so texts do
    parts: list[str] = []
    total = 0
    while total < n_chars + 2:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            parts.append(docs[i])
            total += len(docs[i]) + 2
            if total >= n_chars + 2:
                break
    text = "\n\n".join(parts)[: n_chars + 1]
    cut = max(text.rfind(" "), text.rfind("\n"))
    return (text[:cut] if cut > 0 else text[:n_chars]).rstrip()


def corpus_stats() -> dict[str, dict[str, int]]:
    """Documents and characters per split: ``{"train": {"documents": ..., "chars": ...}, "eval": {...}}``."""
    out = {}
    for split in SPLITS:
        docs = prose_documents(split)
        out[split] = {"documents": len(docs), "chars": sum(len(d) for d in docs)}
    return out


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


@functools.lru_cache(maxsize=None)
def _documents(split: str) -> tuple[str, ...]:
    """All cleaned documents of ``split`` (no length floor), deduplicated, first occurrence kept.

    Train documents lose every paragraph that also occurs in eval (a class and its pure-Python twin, or a
    method and its override, often share a paragraph), so no paragraph is in both splits.
    """
    eval_docs = _dedup(d for m in _EVAL_MODULES for d in _module_documents(m))
    if split == "eval":
        return eval_docs
    held_out = {p for d in eval_docs for p in d.split("\n\n")}
    train = (d for m in _TRAIN_MODULES for d in _module_documents(m))
    return _dedup("\n\n".join(p for p in d.split("\n\n") if p not in held_out) for d in train)


def _dedup(docs) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for d in docs if d))


def _module_documents(name: str) -> list[str]:
    """Cleaned texts of the docstrings defined in module ``name`` (or of its reference topics)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecated modules and attributes warn when touched
        try:
            module = importlib.import_module(name)
        except Exception:  # absent on this platform or build (ImportError, OSError, ...)
            return []
        if name == "pydoc_data.topics":
            raw = [module.topics[key] for key in sorted(module.topics)]
        else:
            raw = _raw_docstrings(module)
    return [_clean(doc) for doc in raw]


def _raw_docstrings(module) -> list[str]:
    """The module's docstring, then those of the classes, functions and methods it defines, by name.

    Only objects whose ``__module__`` is this module count (re-exports belong to their home module), and
    only an object's own ``__doc__`` is read: ``inspect.getdoc`` would copy a base class's docstring onto
    every override and fill the corpus with duplicates.
    """
    docs = [module.__doc__]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__)
            for _, member in sorted(vars(obj).items()):
                member = getattr(member, "__func__", getattr(member, "fget", member))
                if inspect.isroutine(member):
                    docs.append(member.__doc__)
        elif inspect.isroutine(obj):
            docs.append(obj.__doc__)
    return [d for d in docs if isinstance(d, str) and d.strip()]


def _clean(doc: str) -> str:
    """Keep the prose paragraphs of one docstring, each on one line; "" if it is mostly code."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    kept = [_one_line(p) for p in paragraphs if _is_prose(p)]
    text = "\n\n".join(p for p in kept if p)
    raw = sum(len(_one_line(p)) for p in paragraphs)
    return text if len(text) * 2 >= raw else ""


def _is_prose(paragraph: str) -> bool:
    lines = [ln for ln in paragraph.splitlines() if ln.strip() and not _UNDERLINE.match(ln)]
    if not lines:
        return False
    if any(ln.lstrip().startswith((">>>", "...", "$ ")) or "::=" in ln for ln in lines):
        return False
    if all(ln[:1].isspace() for ln in lines):  # an indented block: code or a literal example
        return False
    flat = "".join(lines)
    letters = sum(c.isalpha() for c in flat)
    code = sum(c in _CODE_CHARS for c in flat)
    return letters >= 0.6 * len(flat.replace(" ", "")) and code <= 0.06 * len(flat) and " " in flat


def _one_line(paragraph: str) -> str:
    lines = [ln for ln in paragraph.splitlines() if not _UNDERLINE.match(ln)]
    return " ".join(" ".join(lines).split())

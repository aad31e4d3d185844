"""What a gate checkpoint folder holds, and reading it back with checks: the file names, ``config.json`` into a
:class:`GateConfig` and the weights into :class:`RetentionGates`, in trimkv's layout or the authors'
(:mod:`trimkv.share.authors`).

Both :mod:`trimkv.share.folder` (save and load) and :mod:`trimkv.share.hub` (download and push) read folders through
this module, so neither imports the other's private helpers.
"""
from __future__ import annotations

import json
import pathlib
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._version import __version__
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..gate import GateConfig, RetentionGates, nonfinite_keys
from ..limits import MAX_GATE_HIDDEN, MAX_HEADS, MAX_LAYERS, MAX_WIDTH, load_json
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_DIR
from .authors import OFFICIAL_WEIGHTS, is_official, official_gate_config, official_state_dict

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME,
                    f"{LORA_DIR}/{ADAPTER_CONFIG}", f"{LORA_DIR}/{ADAPTER_WEIGHTS}")   # lora/: only with LoRA
META_KEYS = ("trimkv_version", "format_version")


def trimkv_version() -> str:
    """This trimkv's version (the installed distribution's, ``trimkv-gates``; the same in a source tree)."""
    return __version__


def check_folder(path: pathlib.Path) -> pathlib.Path:
    """``path`` when it is a folder with a config and weights in either layout; CheckpointNotFoundError otherwise."""
    expected = (f"a folder with {CONFIG_NAME} and {WEIGHTS_NAME} (as written by trimkv.save_gates), "
                f"or the authors' {CONFIG_NAME} and {OFFICIAL_WEIGHTS}")
    if not path.exists():
        hint = "; for a Hub repo write 'user/name'" if "/" not in str(path) else ""
        raise CheckpointNotFoundError(f"no gate checkpoint at {path}: expected {expected}{hint}")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a file, not a checkpoint folder: expected {expected}")
    weights = OFFICIAL_WEIGHTS if is_official(path) and not (path / WEIGHTS_NAME).is_file() else WEIGHTS_NAME
    for name in (CONFIG_NAME, weights):
        if not (path / name).is_file():
            raise CheckpointNotFoundError(f"{path} has no {name}: expected {expected}")
    return path


def read_config(folder: pathlib.Path, source: str) -> GateConfig:
    """The :class:`GateConfig` of a checked folder (``source``: how the user named it, kept by the authors' layout)."""
    file = folder / CONFIG_NAME
    try:
        data = load_json(file.read_text(encoding="utf-8"), where=str(file))
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"{file}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); re-save the gates "
                                     "with save_gates") from None
    except UnicodeDecodeError as err:
        raise CorruptCheckpointError(f"{file}: not UTF-8 text (byte offset {err.start}); re-save the gates with "
                                     "save_gates") from None
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{err}; it is not a gate config: re-save the gates with save_gates") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    if _is_official_layout(folder, data):
        config = official_gate_config(folder, data, source)
        check_sizes(config, file)
        check_provenance(config, file)
        return config
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{file} has format_version {version!r}; this trimkv ({trimkv_version()}) reads up to "
            f"{FORMAT_VERSION}: upgrade trimkv"
        )
    fields = {k: v for k, v in data.items() if k not in META_KEYS}
    try:
        config = GateConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} does not describe a GateConfig: {err}") from err
    check_sizes(config, file)
    check_provenance(config, file)
    return config


_SIZE_LIMITS = {"num_layers": MAX_LAYERS, "num_kv_heads": MAX_HEADS, "hidden_size": MAX_WIDTH, "head_dim": MAX_WIDTH,
                "gate_hidden": MAX_GATE_HIDDEN}


def check_sizes(config: GateConfig, file) -> None:
    """CorruptCheckpointError when a size in a gate config is beyond any real model (checked before gates are built:
    building a million layers would take minutes before any other check)."""
    for name, limit in _SIZE_LIMITS.items():
        value = getattr(config, name)
        if value > limit:
            raise CorruptCheckpointError(f"{file}: {name} = {value:,} is above the limit {limit:,}; no real model has "
                                         "that many: the file is corrupt or not a gate config")


def _is_official_layout(folder: pathlib.Path, data: dict) -> bool:
    return "format_version" not in data and "retention_gate" in data and is_official(folder)


def read_gates(folder: pathlib.Path, config: GateConfig, cls: type[RetentionGates] = RetentionGates) -> RetentionGates:
    """fp32 gates (a ``cls``) on the CPU from a checked folder's weights, every key and shape checked against
    ``config``."""
    if config.extra.get("official") is not None and not (folder / WEIGHTS_NAME).is_file():
        file, tensors = folder / OFFICIAL_WEIGHTS, official_state_dict(folder, config)
    else:
        file = folder / WEIGHTS_NAME
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpointError(
                f"{file} is not a readable safetensors file ({err}); it may be truncated: re-download or re-save it"
            ) from err
    with torch.device("meta"):
        gates = cls(config)
    _check_tensors(file, tensors, gates.state_dict())
    bad = nonfinite_keys(tensors)
    if bad:
        raise CorruptCheckpointError(f"{file} holds NaN or inf in {bad[:4]}{' ...' if len(bad) > 4 else ''}: the gates "
                                     "were saved from a diverged run; use an earlier checkpoint")
    gates.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, assign=True)
    return gates


def _check_tensors(file: pathlib.Path, tensors: dict, expected: dict) -> None:
    """Raise CorruptCheckpointError listing every missing, unexpected or mis-shaped key."""
    problems = [f"missing key {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in expected]
    problems += [
        f"key {k!r} has shape {tuple(tensors[k].shape)}, config.json implies {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        raise CorruptCheckpointError(
            f"{file} does not match its {CONFIG_NAME}: " + "; ".join(problems)
            + ". The two files come from different saves; re-save the gates with save_gates"
        )


_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f`]*")   # names shown in model cards: no control characters, no backticks


def check_provenance(config: GateConfig, file) -> None:
    """CorruptCheckpointError unless the provenance fields have their types (names are printable strings, the
    budget a positive integer, ``base_load_kwargs`` a mapping of names to strings): model cards and ``--gates``
    defaults are built from them."""
    for name in ("base_model", "base_revision"):
        value = getattr(config, name)
        if value is not None and not (isinstance(value, str) and _PRINTABLE.fullmatch(value)):
            raise CorruptCheckpointError(f"{file}: {name} must be a printable string (a Hub id or a folder name), "
                                         f"got {value!r:.80}")
    budget = config.train_budget
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise CorruptCheckpointError(f"{file}: train_budget must be a positive integer (tokens per KV head), got "
                                     f"{budget!r:.80}")
    load = config.base_load_kwargs
    if not isinstance(load, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (str, bool)))
                                             for k, v in load.items()):
        raise CorruptCheckpointError(f"{file}: base_load_kwargs must map argument names to strings, got {load!r:.120}")
    if isinstance(load.get("name"), str) and not _PRINTABLE.fullmatch(load["name"]):
        raise CorruptCheckpointError(f"{file}: base_load_kwargs.name must be a printable string, got {load['name']!r:.80}")

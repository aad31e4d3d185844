"""Gate checkpoints: a folder a person can open, saved atomically, loaded safely, shared on the Hub.

A checkpoint folder holds three files (and, with LoRA co-training, a peft adapter folder)::

    config.json        GateConfig fields + "trimkv_version" + "format_version"
    model.safetensors  gates.state_dict(): layers.{l}.w1.weight, layers.{l}.w1.bias, layers.{l}.w2.weight,
                       layers.{l}.bias (rg10: layers.{l}.w2.bias, and shared.proj.weight + shared.bias once for all
                       layers) (fp32; independent of the base model's module tree)
    README.md          generated model card with Hub front matter (library_name: trimkv)
    lora/              optional: LoRA adapters trained with the gates (adapter_config.json + adapter_model.safetensors,
                       what peft's PeftModel.save_pretrained writes); :func:`load_gates` injects them too

Weights are read from safetensors; the one exception is the authors' released layout (``config.json`` +
``trimkv_weights.pth``, :mod:`trimkv.official`), read with ``torch.load(weights_only=True)`` and accepted wherever a
checkpoint is (``load_gates``, ``trimkv convert``). Every failure raises a :class:`GateCheckpointError` subclass
whose message names the file / key and says what to do (the classes live in :mod:`trimkv.errors` and are
importable from here). The model card is written by :mod:`trimkv.card`.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import huggingface_hub
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .attach import attach_gates
from .card import public_config, public_name, public_value, refresh_model_card, write_model_card
from .errors import (CheckpointNotFoundError, CorruptCheckpointError, GateCheckpointError, GateMismatchError,
                     NonFiniteError)
from .gate import GateConfig, RetentionGates, check_compatible, nonfinite_keys
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_DIR, has_lora, load_lora, save_lora
from .base_model import DEFAULT_MODEL, DEFAULT_MODEL_ID
from .official import OFFICIAL_WEIGHTS, is_official, official_gate_config, official_state_dict

__all__ = ["save_gates", "load_gate_checkpoint", "load_gate_config", "load_gates", "convert_checkpoint",
           "push_to_hub", "write_model_card", "GateCheckpointError", "CheckpointNotFoundError",
           "CorruptCheckpointError", "GateMismatchError"]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME,
                    f"{LORA_DIR}/{ADAPTER_CONFIG}", f"{LORA_DIR}/{ADAPTER_WEIGHTS}")   # lora/: only with LoRA
DOWNLOAD_FILES = (*CHECKPOINT_FILES, OFFICIAL_WEIGHTS)   # a Hub repo in either layout
_META_KEYS = ("trimkv_version", "format_version")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# --------------------------------------------------------------------------------------------- save


def trimkv_version() -> str:
    """Installed trimkv version, or ``"0+unknown"`` when running from an uninstalled tree."""
    try:
        return importlib.metadata.version("trimkv")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def save_gates(gates: RetentionGates, path: str | os.PathLike, *, metadata: dict | None = None,
               adapters: Any = None, adapter_state: dict | None = None) -> pathlib.Path:
    """Write ``gates`` as a checkpoint folder at ``path`` and return its path.

    The folder is built in a temp dir beside ``path`` and renamed into place, so a crash leaves either
    the old checkpoint or the new one, never a mix. ``metadata`` (data, steps, ...; ``license``, ``datasets`` and
    ``eval_records`` go into the card's front matter, see :mod:`trimkv.card`) goes into the model card.
    ``adapters`` (a ``peft.PeftModel`` of LoRA adapters trained with the gates) are written to ``lora/``: their
    current weights, or ``adapter_state`` when given (e.g. gathered under ZeRO-3).
    """
    path = pathlib.Path(path)
    state = gates.fp32_state_dict()
    bad = nonfinite_keys(state)
    if bad:
        raise NonFiniteError(f"refusing to save gates with NaN or inf in {bad[:4]}{' ...' if len(bad) > 4 else ''} "
                             f"to {path}: the run diverged (lower train.lr, check the data)")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path)
    config = public_config(gates.config)       # Hub ids or folder names, never local paths
    metadata = public_value(metadata)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_config(tmp / CONFIG_NAME, config)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if adapters is not None:
            save_lora(adapters, tmp / LORA_DIR, adapter_state)
        write_model_card(tmp / CARD_NAME, config, metadata, source=public_name(str(path)), version=trimkv_version())
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_config(file: pathlib.Path, config: GateConfig) -> None:
    data = config.to_dict()
    data.update(trimkv_version=trimkv_version(), format_version=FORMAT_VERSION)
    try:
        text = json.dumps(data, indent=2, sort_keys=False)
    except TypeError as err:
        raise GateCheckpointError(
            f"cannot write {CONFIG_NAME}: a GateConfig field is not JSON-serializable ({err}); "
            "keep GateConfig.extra / loss_weights to plain numbers, strings, lists and dicts"
        ) from err
    file.write_text(text + "\n", encoding="utf-8")


def check_writable(path: str | os.PathLike) -> None:
    """Raise GateCheckpointError unless ``path`` is free, an empty folder or an earlier trimkv checkpoint (what
    :func:`save_gates` may replace); training calls it before its first step."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise GateCheckpointError(f"cannot save gates to {path}: it is a file; pick a folder path")
    if any(path.iterdir()) and not _is_trimkv_checkpoint(path):
        raise GateCheckpointError(
            f"cannot save gates to {path}: the folder exists and is not a trimkv checkpoint "
            "(no config.json with a 'format_version'); pick another path or empty it first"
        )


def _is_trimkv_checkpoint(path: pathlib.Path) -> bool:
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data


def _swap_into_place(new: pathlib.Path, path: pathlib.Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is moved aside first and deleted last."""
    if not path.exists():
        os.replace(new, path)
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "ckpt")
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old / "ckpt", path)  # put the previous checkpoint back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load


def parse_source(source: str) -> tuple[str, str | None]:
    """Split ``"user/name@rev"`` into ``("user/name", "rev")``; no ``@`` gives ``(source, None)``."""
    repo_id, sep, revision = str(source).partition("@")
    if sep and not revision:
        raise ValueError(f"{source!r} ends with '@' but names no revision; write 'user/name@main' or drop the '@'")
    if not repo_id:
        raise ValueError(f"{source!r} names no repo; write 'user/name' or 'user/name@revision'")
    return repo_id, (revision or None)


def load_gate_checkpoint(
    source: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None
) -> RetentionGates:
    """Load gates from a checkpoint folder or a Hub repo (``"user/name"`` / ``"user/name@revision"``), in trimkv's
    layout or the authors' (``config.json`` + ``trimkv_weights.pth``, :mod:`trimkv.official`).

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Returns fp32 gates on the CPU (LoRA adapters a checkpoint
    may carry are not read here; :func:`load_gates` injects them into a model).
    """
    folder = _resolve_folder(source, revision, local_files_only)
    config = _read_config(folder, str(source))
    return _read_gates(folder, config)


def load_gate_config(
    source: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None
) -> GateConfig:
    """Only the :class:`GateConfig` of a checkpoint (either layout): its shape and base model, no weights read."""
    return _read_config(_resolve_folder(source, revision, local_files_only), str(source))


def base_model_for(config: GateConfig) -> str:
    """The ``trimkv.base_model.load_model`` name of the base model the gates were trained for (``"smollm2"`` for the
    embedded default)."""
    load = config.base_load_kwargs.get("name") or config.base_model
    if not load:
        raise GateCheckpointError("the gate checkpoint does not record its base model: pass the model explicitly")
    return DEFAULT_MODEL if load == DEFAULT_MODEL_ID else load


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, revision: str | None = None,
                       local_files_only: bool | None = None) -> pathlib.Path:
    """Read a checkpoint in either layout (the authors' release, typically) and save it as a trimkv checkpoint."""
    gates = load_gate_checkpoint(source, revision=revision, local_files_only=local_files_only)
    official = gates.config.extra.get("official", {})
    metadata = {"converted from": f"{public_name(str(source))} (the authors' release)" if official else
                public_name(str(source))}
    metadata.update({f"authors' {k}": official[k] for k in ("memory_size", "buffer_size") if k in official})
    return save_gates(gates, out, metadata=metadata)


def _resolve_folder(source: str | os.PathLike, revision: str | None, local_files_only: bool | None) -> pathlib.Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache)."""
    path = pathlib.Path(source).expanduser()
    if path.exists() or isinstance(source, os.PathLike) or not _looks_like_repo_id(str(source)):
        if revision is not None and path.exists():
            raise ValueError(f"revision={revision!r} only applies to Hub repos, but {path} is a local folder")
        return _check_folder(path)
    repo_id, at_revision = parse_source(str(source))
    if revision is not None and at_revision is not None and revision != at_revision:
        raise ValueError(f"{source!r} names revision {at_revision!r} but revision={revision!r} was passed; give one")
    return _download(repo_id, revision or at_revision, local_files_only)


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text.partition("@")[0]))


def _check_folder(path: pathlib.Path) -> pathlib.Path:
    expected = (f"a folder with {CONFIG_NAME} and {WEIGHTS_NAME} (as written by trimkv.checkpoint.save_gates), "
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


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: str | None, local_files_only: bool | None) -> pathlib.Path:
    offline = _offline() if local_files_only is None else local_files_only
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(DOWNLOAD_FILES), local_files_only=offline
        )
    except (OSError, ValueError) as err:  # hub errors: not found, gated, offline, invalid id, incomplete cache
        where = f"{repo_id}@{revision}" if revision else repo_id
        how = "offline (HF_HUB_OFFLINE=1 or local_files_only=True) and not in the local Hub cache" if offline \
            else "could not be fetched from the Hub"
        raise CheckpointNotFoundError(
            f"{where!r} is neither a local folder nor a cached/reachable Hub repo: it is {how} "
            f"({type(err).__name__}: {err}). Check the path or repo id, log in for private repos, "
            "or download it once while online."
        ) from err
    return _check_folder(pathlib.Path(folder))


def _read_config(folder: pathlib.Path, source: str) -> GateConfig:
    file = folder / CONFIG_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{file} is not valid JSON ({err}); re-save the gates with save_gates") from err
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    if _is_official_layout(folder, data):
        return official_gate_config(folder, data, source)
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{file} has format_version {version!r}; this trimkv ({trimkv_version()}) reads up to "
            f"{FORMAT_VERSION}: upgrade trimkv"
        )
    fields = {k: v for k, v in data.items() if k not in _META_KEYS}
    try:
        return GateConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} does not describe a GateConfig: {err}") from err


def _is_official_layout(folder: pathlib.Path, data: dict) -> bool:
    return "format_version" not in data and "retention_gate" in data and is_official(folder)


def _read_gates(folder: pathlib.Path, config: GateConfig) -> RetentionGates:
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
        gates = RetentionGates(config)
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


# ------------------------------------------------------------------------------------- model binding


def load_gates(
    model: Any, source: str | os.PathLike, *, revision: str | None = None,
    local_files_only: bool | None = None, **attach_kwargs: Any,
):
    """Load a gate checkpoint (either layout), check it fits ``model``, and attach it; returns the attach handle.
    Each layer's gate goes to the device of that layer (``device_map="auto"`` models included).

    A checkpoint with ``lora/`` (LoRA co-training) also injects those adapters into ``model`` (frozen); the handle's
    ``disabled()`` then turns gates and adapters off together, and ``detach()`` removes both."""
    folder = _resolve_folder(source, revision, local_files_only)
    gates = _read_gates(folder, _read_config(folder, str(source)))
    try:
        check_compatible(gates.config, model)      # before anything is attached (attach_gates checks again)
    except GateMismatchError as err:
        raise GateMismatchError(f"gate checkpoint {source}: {err}") from None
    if getattr(model, "trimkv", None) is not None:
        raise RuntimeError("gates are already attached to this model; call model.trimkv.detach() first")
    adapters = load_lora(model, folder / LORA_DIR) if has_lora(folder) else None
    try:
        return attach_gates(model, gates, adapters=adapters, **attach_kwargs)
    except BaseException:
        if adapters is not None:
            adapters.unload()
        raise


# ----------------------------------------------------------------------------------------------- Hub


def push_to_hub(
    checkpoint_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
    revision: str | None = None, commit_message: str = "Upload trimkv gates", eval_records: list[dict] | None = None,
) -> str:
    """Validate ``checkpoint_dir``, create ``repo_id`` if needed, upload the checkpoint; return the commit url.

    The uploaded model card's usage snippet names ``repo_id``; ``eval_records`` (rows of ``trimkv eval``'s
    ``metrics.json`` / ``fidelity.json``, see :func:`trimkv.card.eval_results`) add Hub ``model-index`` results.
    The local folder is not changed."""
    folder = pathlib.Path(checkpoint_dir)
    gates = load_gate_checkpoint(folder)  # never publish a checkpoint that would not load (or holds NaN / inf)
    if not (folder / WEIGHTS_NAME).is_file():
        raise GateCheckpointError(f"{folder} is in the authors' layout; convert it first (trimkv convert {folder} OUT) "
                                  "and push the converted folder")
    card = (folder / CARD_NAME).read_text(encoding="utf-8") if (folder / CARD_NAME).is_file() else ""
    base = gates.config.base_model
    if public_name(base) != base or public_name(card) != card:
        raise GateCheckpointError(f"{folder}: config.json or README.md names a local path ({base!r}): re-save the gates "
                                  "(save_gates publishes folder names only) before pushing them to the Hub")
    if eval_records is not None:
        mine = gates.fingerprint()
        eval_records = [r for r in eval_records if r.get("policy") != "trimkv" or r.get("gates") == mine]
    api = huggingface_hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="trimkv-push-") as tmp:
        staged = pathlib.Path(tmp) / folder.name
        shutil.copytree(folder, staged)
        source = f"{repo_id}@{revision}" if revision else repo_id
        refresh_model_card(staged / CARD_NAME, _read_config(staged, str(folder)), source=source,
                           eval_records=eval_records)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(staged), commit_message=commit_message, revision=revision,
            repo_type="model", allow_patterns=list(CHECKPOINT_FILES),
        )
    return str(getattr(info, "commit_url", info))

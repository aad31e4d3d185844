"""Gate checkpoints: a folder a person can open, saved atomically, loaded safely (from a folder or the Hub).

A checkpoint folder holds three files (and, with LoRA co-training, a peft adapter folder)::

    config.json        GateConfig fields + "trimkv_version" + "format_version"
    model.safetensors  gates.state_dict(): layers.{l}.w1.weight, layers.{l}.w1.bias, layers.{l}.w2.weight,
                       layers.{l}.bias (rg10: layers.{l}.w2.bias, and shared.proj.weight + shared.bias once for all
                       layers) (fp32; independent of the base model's module tree)
    README.md          generated model card with Hub front matter (library_name: trimkv)
    lora/              optional: LoRA adapters trained with the gates (adapter_config.json + adapter_model.safetensors,
                       what peft's PeftModel.save_pretrained writes); :func:`load_gates` injects them too

Weights are read from safetensors; the one exception is the authors' released layout (``config.json`` +
``trimkv_weights.pth``, :mod:`trimkv.share.authors`), read with ``torch.load(weights_only=True)`` and accepted
wherever a checkpoint is (``load_gates``, ``trimkv convert``). Every failure raises a :class:`GateCheckpointError`
subclass whose message names the file / key and says what to do (the classes live in :mod:`trimkv.errors`). The
file names and the checked reading are in :mod:`trimkv.share.layout`, Hub ids in :mod:`trimkv.share.hub`, the model
card in :mod:`trimkv.share.card`.
"""
from __future__ import annotations

import json
import os
import pathlib
import contextlib
import shutil
import tempfile
from typing import Any, Iterator

from safetensors.torch import save_file

from ..attach import attach_gates
import torch

from ..base_model import DEFAULT_MODEL, is_default_model, load_config
from ..errors import GateCheckpointError, GateMismatchError, NonFiniteError
from ..gate import GateConfig, RetentionGates, check_compatible, nonfinite_keys
from ..lora import LORA_DIR, has_lora, load_lora, save_lora
from .authors import OFFICIAL_WEIGHTS, official_config, official_weights
from .card import public_config, public_name, public_value, write_model_card
from .hub import push_to_hub as _push, resolve_folder
from .layout import CARD_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_config, read_gates, trimkv_version


# --------------------------------------------------------------------------------------------- save


def save_gates(gates: RetentionGates, path: str | os.PathLike, *, metadata: dict | None = None,
               adapters: Any = None, adapter_state: dict | None = None) -> pathlib.Path:
    """Write ``gates`` as a checkpoint folder at ``path`` and return its path.

    The folder is built in a temp dir beside ``path`` and renamed into place, so a crash leaves either
    the old checkpoint or the new one, never a mix. ``metadata`` (data, steps, ...; ``license``, ``datasets`` and
    ``eval_records`` go into the card's front matter, see :mod:`trimkv.share.card`) goes into the model card.
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
    with staged_folder(path) as tmp:
        _write_config(tmp / CONFIG_NAME, config)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if adapters is not None:
            save_lora(adapters, tmp / LORA_DIR, adapter_state)
        write_model_card(tmp / CARD_NAME, config, metadata, source=public_name(str(path)), version=trimkv_version())
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temp folder beside ``path`` to write a checkpoint into: renamed into place when the block ends, deleted if
    it raises, so a crash leaves the old folder or the new one, never a mix. It gets normal permissions (the umask;
    ``mkdtemp`` makes 0700)."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def check_writable(path: str | os.PathLike, *, layouts: tuple[str, ...] | None = None) -> None:
    """Raise GateCheckpointError unless ``path`` is free, an empty folder or an earlier trimkv checkpoint (what
    :func:`save_gates` may replace); training calls it before its first step. ``layouts``: the files of an earlier
    export (e.g. the authors' layout) that make a folder replaceable too."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise GateCheckpointError(f"cannot save gates to {path}: it is a file; pick a folder path")
    if layouts and all((path / name).is_file() for name in layouts):
        return
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


# ------------------------------------------------------------------------------ the Hugging Face methods


class PretrainedGates(RetentionGates):
    """:class:`~trimkv.gate.RetentionGates` with the checkpoint methods of the Hugging Face ecosystem (PEFT /
    ``huggingface_hub`` mixins), the same gates and the same folder as the free functions write::

        gates = PretrainedGates.from_pretrained("user/gates")       # = load_gate_checkpoint
        handle = gates.attach(model)                                # = attach_gates(model, gates), checked first
        model.trimkv.gates.save_pretrained("my-gates")              # = save_gates
        model.trimkv.gates.push_to_hub("user/my-gates")             # = save_gates + push_to_hub

    Gates loaded by trimkv (``load_gates``, ``load_gate_checkpoint``) and trained by ``trimkv train`` are of this
    class; ``PretrainedGates(config)`` builds fresh ones like ``RetentionGates(config)``."""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None,
                        local_files_only: bool | None = None) -> "PretrainedGates":
        """Gates from a checkpoint folder or Hub repo (``"user/name[@revision]"``), in trimkv's layout or the
        authors'; fp32 on the CPU."""
        return load_gate_checkpoint(source, revision=revision, local_files_only=local_files_only)

    def save_pretrained(self, save_directory: str | os.PathLike, *, metadata: dict | None = None,
                        push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs: Any) -> pathlib.Path:
        """Write the checkpoint folder (atomically, with its model card); ``push_to_hub=True`` uploads it to
        ``repo_id`` (default: the folder's name) too."""
        path = save_gates(self, save_directory, metadata=metadata)
        if push_to_hub:
            _push(path, repo_id or path.name, **push_kwargs)
        return path

    def push_to_hub(self, repo_id: str, *, metadata: dict | None = None, private: bool = False,
                    token: str | None = None, revision: str | None = None,
                    commit_message: str = "Upload trimkv gates") -> str:
        """Save to a temporary folder and upload it to the Hub repo ``repo_id`` (created if needed); returns the
        commit url."""
        with tempfile.TemporaryDirectory(prefix="trimkv-gates-") as tmp:
            path = save_gates(self, pathlib.Path(tmp) / repo_id.split("/")[-1], metadata=metadata)
            return _push(path, repo_id, private=private, token=token, revision=revision,
                         commit_message=commit_message)

    def attach(self, model: Any, **attach_kwargs: Any):
        """Attach these gates to ``model`` (checked against its shape first); returns the handle (``model.trimkv``)."""
        try:
            check_compatible(self.config, model)
        except GateMismatchError as err:
            raise GateMismatchError(f"gates {self.config.base_model or ''}: {err}") from None
        return attach_gates(model, self, **attach_kwargs)


# ---------------------------------------------------------------------------------------------- load


def load_gate_checkpoint(
    source: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None
) -> "PretrainedGates":
    """Load gates from a checkpoint folder or a Hub repo (``"user/name"`` / ``"user/name@revision"``), in trimkv's
    layout or the authors' (``config.json`` + ``trimkv_weights.pth``, :mod:`trimkv.share.authors`).

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Returns fp32 gates on the CPU (LoRA adapters a checkpoint
    may carry are not read here; :func:`load_gates` injects them into a model).
    """
    folder = resolve_folder(source, revision, local_files_only)
    config = read_config(folder, str(source))
    return read_gates(folder, config, PretrainedGates)


def load_gate_config(
    source: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None
) -> GateConfig:
    """Only the :class:`GateConfig` of a checkpoint (either layout): its shape and base model, no weights read."""
    return read_config(resolve_folder(source, revision, local_files_only), str(source))


def base_model_for(config: GateConfig) -> str:
    """The ``trimkv.base_model.load_model`` name of the base model the gates were trained for (``"smollm2"`` for the
    embedded default)."""
    load = config.base_load_kwargs.get("name") or config.base_model
    if not load:
        raise GateCheckpointError("the gate checkpoint does not record its base model: pass the model explicitly")
    return DEFAULT_MODEL if is_default_model(load) else load


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, revision: str | None = None,
                       local_files_only: bool | None = None) -> pathlib.Path:
    """Read a checkpoint in either layout (the authors' release, typically) and save it as a trimkv checkpoint."""
    gates = load_gate_checkpoint(source, revision=revision, local_files_only=local_files_only)
    official = gates.config.extra.get("official", {})
    metadata = {"converted from": f"{public_name(str(source))} (the authors' release)" if official else
                public_name(str(source))}
    metadata.update({f"authors' {k}": official[k] for k in ("memory_size", "buffer_size") if k in official})
    return save_gates(gates, out, metadata=metadata)


EXPORT_FORMATS = ("authors",)      # trimkv export --format: the authors' released layout (their inference package)


def export_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, format: str = "authors",
                      base_config: Any = None, revision: str | None = None,
                      local_files_only: bool | None = None) -> pathlib.Path:
    """Write the gates of ``source`` (a checkpoint in either layout, folder or Hub id) at ``out`` in another layout.

    ``format="authors"``: the layout of the authors' package (``config.json`` = the base model's config plus their
    TRIM-KV fields, ``trimkv_weights.pth``; :mod:`trimkv.share.authors`), which their
    ``TrimKV*ForCausalLM.from_pretrained(out)`` serves, with a model card beside them. ``base_config``: the base
    model's transformers config (default: read for the gates' recorded base model, see
    :func:`trimkv.base_model.load_config`). The folder is written atomically, like :func:`save_gates`."""
    if format not in EXPORT_FORMATS:
        raise GateCheckpointError(f"export format {format!r} is unknown; choose one of {EXPORT_FORMATS}")
    gates = load_gate_checkpoint(source, revision=revision, local_files_only=local_files_only)
    config = public_config(gates.config)
    if base_config is None:
        base_config = load_config(base_model_for(config), revision=config.base_revision
                                  if not is_default_model(config.base_model) else None)
    data = official_config(config, base_config)
    weights = official_weights(gates)
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path, layouts=(CONFIG_NAME, OFFICIAL_WEIGHTS))
    with staged_folder(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        torch.save(weights, tmp / OFFICIAL_WEIGHTS)
        metadata = {"layout": "the TRIM-KV authors' (config.json + trimkv_weights.pth), written by trimkv export",
                    "exported from": public_name(str(source))}
        if config.extra.get("base_gguf_file"):     # their loader reads base_model with transformers: a GGUF needs this
            metadata["their loader"] = (f"TrimKV*ForCausalLM.from_pretrained(folder, gguf_file="
                                        f"{config.extra['base_gguf_file']!r}): the base model is a GGUF")
        write_model_card(tmp / CARD_NAME, config, metadata, source=public_name(str(path)), version=trimkv_version())
    return path


# ------------------------------------------------------------------------------------- model binding


def load_gates(
    model: Any, source: str | os.PathLike, *, revision: str | None = None,
    local_files_only: bool | None = None, **attach_kwargs: Any,
):
    """Load a gate checkpoint (either layout), check it fits ``model``, and attach it; returns the attach handle.
    Each layer's gate goes to the device of that layer (``device_map="auto"`` models included).

    A checkpoint with ``lora/`` (LoRA co-training) also injects those adapters into ``model`` (frozen); the handle's
    ``disabled()`` then turns gates and adapters off together, and ``detach()`` removes both."""
    folder = resolve_folder(source, revision, local_files_only)
    gates = read_gates(folder, read_config(folder, str(source)), PretrainedGates)
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

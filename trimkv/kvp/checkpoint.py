"""KVP ranker checkpoints: a folder like a gate checkpoint (:mod:`trimkv.share`), saved atomically, checked on load.

    config.json        KVPConfig fields + "kind": "trimkv-kvp" + "trimkv_version" + "format_version"
    model.safetensors  w1 [L, H, 2D + 1, E], b1 [L, H, E], w2 [L, H, E], b2 [L, H] (fp32)
    README.md          a model card (base model, shape, training record, how to use it)

Loading checks everything before a weight is used: a missing folder or file is a
:class:`~trimkv.errors.CheckpointNotFoundError`, a config that is not a KVP one, a tensor missing or of the wrong
shape, or NaN / inf weights a :class:`~trimkv.errors.CorruptCheckpointError`, rankers built for another model (layers,
KV heads, head dim) a :class:`~trimkv.errors.GateMismatchError`. The folder naming and swapping, Hub resolution and
``public_name`` are the gate checkpoints' (:mod:`trimkv.share`).
"""
from __future__ import annotations

import json
import os
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CorruptCheckpointError, GateCheckpointError, GateMismatchError, NonFiniteError
from ..limits import MAX_GATE_HIDDEN, MAX_HEADS, MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, load_json
from ..share.card import public_name, public_value
from ..share.folder import check_writable, staged_folder
from ..share.hub import resolve_folder
from ..share.layout import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, trimkv_version
from .ranker import FORMAT_KIND, KVPConfig, KVPRankers

FORMAT_VERSION = 1
FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
_SIZES = {"num_layers": MAX_LAYERS, "num_kv_heads": MAX_HEADS, "head_dim": MAX_WIDTH, "hidden": MAX_GATE_HIDDEN,
          "pos_scale": MAX_TOKENS}


def save_rankers(rankers: KVPRankers, path: str | os.PathLike, *, metadata: dict | None = None) -> pathlib.Path:
    """Write ``rankers`` as a checkpoint folder at ``path`` (built beside it, renamed into place) and return it."""
    path = pathlib.Path(path)
    state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in rankers.state_dict().items()}
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"refusing to save KVP rankers with NaN or inf in {bad} to {path}: training diverged "
                             "(lower --lr)")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path)
    config = rankers.config.to_dict()
    config.update(base_model=public_name(config["base_model"]), extra=public_value(config["extra"]))
    with staged_folder(path) as tmp:
        data = dict(kind=FORMAT_KIND, **config, trimkv_version=trimkv_version(), format_version=FORMAT_VERSION)
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CARD_NAME).write_text(model_card(KVPConfig.from_dict(config), public_value(metadata or {}),
                                                name=public_name(str(path))), encoding="utf-8")
    return path


def load_kvp_config(source: str | os.PathLike, *, revision: str | None = None,
                    local_files_only: bool | None = None) -> KVPConfig:
    """The config of a KVP checkpoint (a folder or ``user/name[@rev]``), checked; no weights read."""
    return _read_config(resolve_folder(source, revision, local_files_only))


def load_rankers(source: str | os.PathLike, model=None, *, revision: str | None = None,
                 local_files_only: bool | None = None, device=None) -> KVPRankers:
    """fp32 rankers from a checkpoint, every tensor checked against its config (and against ``model`` when given:
    its layers, KV heads and head dim), on ``device`` (default: the CPU)."""
    folder = resolve_folder(source, revision, local_files_only)
    config = _read_config(folder)
    if model is not None:
        check_model(config, model, source=str(source))
    file = folder / WEIGHTS_NAME
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} is not a readable safetensors file ({err}): re-save the rankers") from err
    with torch.device("meta"):
        expected = KVPRankers(config).state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in expected]
    problems += [f"key {k!r} has shape {tuple(tensors[k].shape)}, config.json implies {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CorruptCheckpointError(f"{file} does not match its {CONFIG_NAME}: " + "; ".join(problems)
                                     + ". The two files come from different saves; re-save the rankers")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CorruptCheckpointError(f"{file} holds NaN or inf in {bad}: the rankers were saved from a diverged run")
    rankers = KVPRankers(config)
    rankers.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return rankers.to(device) if device is not None else rankers


def check_model(config: KVPConfig, model, *, source: str = "the rankers") -> None:
    """GateMismatchError unless ``model`` has the layers, KV heads and head dim the rankers were trained for."""
    m = KVPConfig.for_model(model.config)
    have = (m.num_layers, m.num_kv_heads, m.head_dim)
    want = (config.num_layers, config.num_kv_heads, config.head_dim)
    if have != want:
        raise GateMismatchError(f"KVP rankers {source} were trained for {want[0]} layers x {want[1]} KV heads of dim "
                                f"{want[2]} (base model {config.base_model}), this model has {have[0]} x {have[1]} of "
                                f"dim {have[2]}: wrong base model?")


def _read_config(folder: pathlib.Path) -> KVPConfig:
    file = folder / CONFIG_NAME
    try:
        data = load_json(file.read_text(encoding="utf-8"), where=str(file))
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} is not readable JSON ({err}): re-save the rankers") from err
    if not isinstance(data, dict) or data.get("kind") != FORMAT_KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise CorruptCheckpointError(f"{file} is not a KVP ranker checkpoint (kind {kind!r}, expected "
                                     f"{FORMAT_KIND!r}): for TRIM-KV gates use --gates, not --kvp")
    if data.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{file}: format_version {data.get('format_version')!r}, this trimkv reads "
                                     f"{FORMAT_VERSION}: upgrade trimkv or re-save the rankers")
    for name, top in _SIZES.items():
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise CorruptCheckpointError(f"{file}: {name} must be an integer in [1, {top}], got {value!r:.80}")
    for name in ("base_model", "base_revision"):
        value = data.get(name)
        if value is not None and not (isinstance(value, str) and value.isprintable() and "`" not in value):
            raise CorruptCheckpointError(f"{file}: {name} must be a printable string (a Hub id or a folder name), "
                                         f"got {value!r:.80}")
    if not isinstance(data.get("target", ""), str) or not isinstance(data.get("extra", {}), dict):
        raise CorruptCheckpointError(f"{file}: target must be a string and extra a mapping: re-save the rankers")
    return KVPConfig.from_dict(data)


def model_card(config: KVPConfig, metadata: dict, *, name: str | None) -> str:
    """A short model card: what the rankers are, their shape, their training record, how to use them."""
    params = config.num_layers * config.num_kv_heads * (config.in_features * config.hidden + 2 * config.hidden + 1)
    lines = ["---", "library_name: trimkv", "tags: [kv-cache, eviction, kvp]"]
    if config.base_model:
        lines.append(f"base_model: {config.base_model}")
    lines += ["---", "", f"# KVP rankers{f' ({name})' if name else ''}", "",
              "Per-head KV-cache eviction rankers (KV Policy, Moschella et al., arXiv 2602.10238) for the bounded "
              "caches of trimkv: one 2-layer MLP per (layer, KV head) scores each token from "
              "its key, value and position when it enters the cache; the lowest-scoring token is evicted.", "",
              f"- base model: `{config.base_model}`" + (f" @ `{config.base_revision}`" if config.base_revision else ""),
              f"- shape: {config.num_layers} layers x {config.num_kv_heads} KV heads, head dim {config.head_dim}, "
              f"hidden {config.hidden} ({params:,} parameters)",
              f"- trained on the trace target `{config.target}` with the `{config.objective}` objective", ""]
    record = {**config.extra, **metadata}
    tables = {k: v for k, v in record.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    if record:
        lines += ["## Training", ""] + [f"- {k}: {v}" for k, v in record.items() if k not in tables] + [""]
    for name, rows in tables.items():      # e.g. per_layer: held-out all-budget cost, 1 = the best order
        cols = list(rows[0])
        lines += [f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows] + [""]
    lines += ["## Usage", "", "```bash",
              f"trimkv eval --tasks passkey --lengths 2048 --budgets 64 --policies kvp --kvp {name or 'PATH'}",
              f"trimkv generate prompts.jsonl --policy kvp --budget 64 --kvp {name or 'PATH'}", "```", ""]
    return "\n".join(lines)


def push_rankers(checkpoint_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                 revision: str | None = None, commit_message: str = "Upload trimkv KVP rankers", api=None) -> str:
    """Validate ``checkpoint_dir`` (it must load), then upload its files to the Hub repo ``repo_id``; the commit url.
    ``api``: a ``huggingface_hub.HfApi``-like object (tests pass one that writes to a local folder)."""
    folder = pathlib.Path(checkpoint_dir)
    rankers = load_rankers(folder)
    if public_name(rankers.config.base_model) != rankers.config.base_model:
        raise GateCheckpointError(f"{folder}: config.json names a local path; re-save the rankers before pushing")
    if api is None:
        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision, repo_type="model", allow_patterns=list(FILES))
    return str(getattr(info, "commit_url", info))

"""Gate checkpoints on the Hugging Face Hub: a source (a local folder or ``"user/name[@revision]"``) resolved to a
checked local folder, downloading it (or finding it in the Hub cache) when needed, and :func:`push_to_hub`.

``local_files_only=None`` follows ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``). Only the files of a checkpoint
are downloaded and uploaded (:data:`DOWNLOAD_FILES`, :data:`~trimkv.share.layout.CHECKPOINT_FILES`).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile

import huggingface_hub

from ..errors import CheckpointNotFoundError, GateCheckpointError
from .authors import OFFICIAL_WEIGHTS
from .card import public_name, refresh_model_card
from .layout import CARD_NAME, CHECKPOINT_FILES, WEIGHTS_NAME, check_folder, read_config, read_gates

DOWNLOAD_FILES = (*CHECKPOINT_FILES, OFFICIAL_WEIGHTS)   # a Hub repo in either layout
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def parse_source(source: str) -> tuple[str, str | None]:
    """Split ``"user/name@rev"`` into ``("user/name", "rev")``; no ``@`` gives ``(source, None)``."""
    repo_id, sep, revision = str(source).partition("@")
    if sep and not revision:
        raise ValueError(f"{source!r} ends with '@' but names no revision; write 'user/name@main' or drop the '@'")
    if not repo_id:
        raise ValueError(f"{source!r} names no repo; write 'user/name' or 'user/name@revision'")
    return repo_id, (revision or None)


def resolve_folder(source: str | os.PathLike, revision: str | None, local_files_only: bool | None) -> pathlib.Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache). Checked either way."""
    path = pathlib.Path(source).expanduser()
    if path.exists() or isinstance(source, os.PathLike) or not _looks_like_repo_id(str(source)):
        if revision is not None and path.exists():
            raise ValueError(f"revision={revision!r} only applies to Hub repos, but {path} is a local folder")
        return check_folder(path)
    repo_id, at_revision = parse_source(str(source))
    if revision is not None and at_revision is not None and revision != at_revision:
        raise ValueError(f"{source!r} names revision {at_revision!r} but revision={revision!r} was passed; give one")
    return _download(repo_id, revision or at_revision, local_files_only)


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text.partition("@")[0]))


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
            else "not reachable on the Hub"
        raise CheckpointNotFoundError(
            f"{where!r} is neither a local folder nor a cached/reachable Hub repo: it is {how} "
            f"({type(err).__name__}: {err}). Check the path or repo id, log in for private repos, "
            "or download it once while online."
        ) from err
    return check_folder(pathlib.Path(folder))


def push_to_hub(
    checkpoint_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
    revision: str | None = None, commit_message: str = "Upload trimkv gates", eval_records: list[dict] | None = None,
) -> str:
    """Validate ``checkpoint_dir``, create ``repo_id`` if needed, upload the checkpoint; return the commit url.

    The uploaded model card's usage snippet names ``repo_id``; ``eval_records`` (rows of ``trimkv eval``'s
    ``metrics.json`` / ``fidelity.json``, see :func:`trimkv.share.card.eval_results`) add Hub ``model-index``
    results. The local folder is not changed."""
    folder = pathlib.Path(checkpoint_dir)
    checked = resolve_folder(folder, None, None)   # never publish a checkpoint that would not load (or holds NaN / inf)
    gates = read_gates(checked, read_config(checked, str(folder)))
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
        refresh_model_card(staged / CARD_NAME, read_config(staged, str(folder)), source=source,
                           eval_records=eval_records)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(staged), commit_message=commit_message, revision=revision,
            repo_type="model", allow_patterns=list(CHECKPOINT_FILES),
        )
    return str(getattr(info, "commit_url", info))

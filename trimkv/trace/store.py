"""The trace store on disk: a folder a person can open, and :class:`TraceStore`, its validated reader.

::

    <folder>/manifest.json                  what the store holds (model, data, settings, shapes, shards, cost)
    <folder>/shard-00000.safetensors        rows [0, shard_rows)
    <folder>/shard-00001.safetensors        rows [shard_rows, 2 shard_rows) ...

A shard holds every stored layer of its n rows (T = ``seq_len``, rows right-padded; 16-bit floats):

==============================  =================  =========================================================
``input_ids``                   [n, T] int32       the row's tokens (0 on padding)
``pos``                         [n, T] int32       positions within each document (-1 on padding)
``valid``                       [n, T] bool        False on padding
``loss_mask``                   [n, T] bool        the data's targets (answer tokens of QA rows)
``layer.<l>.keys`` / ``values``  [n, Hkv, T, D]     post-RoPE keys and values
``layer.<l>.target.<name>``     [n, Hkv, T]        the utility targets (:mod:`trimkv.trace.targets`)
``layer.<l>.hidden``            [n, T, d]          the attention input x (only layers in ``hidden_layers``)
==============================  =================  =========================================================

Writes are atomic (a temporary file renamed into place): a shard is either whole or absent, and the manifest lists
only whole shards, so a killed run resumes from the last shard the manifest names. Opening a store checks the
manifest and every shard's header (names, dtypes, shapes) and size; :meth:`TraceStore.verify` also checks the
shards' SHA-256. Every problem is a :class:`~trimkv.errors.TraceStoreError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import CorruptTraceError, MissingTraceError, write_failed
from .layer import LayerTrace

FORMAT = "trimkv-trace"
VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
ROW_TENSORS = {"input_ids": ("I32", torch.int32), "pos": ("I32", torch.int32), "valid": ("BOOL", torch.bool),
               "loss_mask": ("BOOL", torch.bool)}
REQUIRED = ("format", "version", "model", "data", "fingerprint", "seq_len", "rows", "rows_done", "layers",
            "hidden_layers", "targets", "horizons", "dtype", "shard_rows", "shapes", "shards")
MAX_MANIFEST_BYTES = 64 << 20


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tensor_name(layer: int, what: str) -> str:
    """``layer.<l>.<what>``: ``keys``, ``values``, ``hidden`` or ``target.<name>``."""
    return f"layer.{layer}.{what}"


def expected_tensors(manifest: dict, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor a shard of ``n`` rows holds."""
    T, s = manifest["seq_len"], manifest["shapes"]
    H, D, d = s["num_kv_heads"], s["head_dim"], s["hidden_size"]
    f16 = _SAFETENSORS_DTYPES[manifest["dtype"]]
    out = {name: (code, (n, T)) for name, (code, _) in ROW_TENSORS.items()}
    for layer in manifest["layers"]:
        out[tensor_name(layer, "keys")] = (f16, (n, H, T, D))
        out[tensor_name(layer, "values")] = (f16, (n, H, T, D))
        for target in manifest["targets"]:
            out[tensor_name(layer, f"target.{target}")] = (f16, (n, H, T))
    for layer in manifest["hidden_layers"]:
        out[tensor_name(layer, "hidden")] = (f16, (n, T, d))
    return out


def row_bytes(manifest: dict) -> dict[str, int]:
    """Bytes one row takes on disk, by part (``kv``, ``targets``, ``hidden``, ``rows``)."""
    T, s = manifest["seq_len"], manifest["shapes"]
    H, D, d = s["num_kv_heads"], s["head_dim"], s["hidden_size"]
    layers = len(manifest["layers"])
    return {"kv": layers * 2 * H * T * D * 2, "targets": layers * len(manifest["targets"]) * H * T * 2,
            "hidden": len(manifest["hidden_layers"]) * T * d * 2, "rows": T * 10}


# ----------------------------------------------------------------------------------------------- writing


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)          # a normal file (safetensors writes 0600)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(err, path) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], rows: tuple[int, int]) -> dict:
    """Write one shard atomically; returns its manifest entry (file, rows, bytes, sha256)."""
    from safetensors.torch import save_file

    path = folder / shard_name(index)
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    return {"file": path.name, "rows": list(rows), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, manifest: dict) -> None:
    _atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))


def stale_files(folder: Path) -> list[Path]:
    """What a killed run may leave: temporary files, and shards the manifest does not list."""
    if not folder.is_dir():
        return []
    listed = set()
    if (folder / MANIFEST).is_file():
        try:
            listed = {s["file"] for s in json.loads((folder / MANIFEST).read_text()).get("shards", [])}
        except (ValueError, AttributeError, TypeError):
            listed = set()
    return [p for p in folder.iterdir() if ".tmp" in p.name or
            (p.name.startswith("shard-") and p.suffix == ".safetensors" and p.name not in listed)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the store at ``folder``, checked for its fields; MissingTraceError / CorruptTraceError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "does not exist" if not folder.exists() else ("is a file" if not folder.is_dir() else
                                                              f"holds no {MANIFEST}")
        raise MissingTraceError(f"no trace store at {folder}: the folder {what} (write one with `trimkv trace "
                                f"--out {folder}`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CorruptTraceError(f"{path} is {path.stat().st_size:,} bytes: not a trace manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptTraceError(f"{path} is not valid JSON ({err}): the store is damaged; write it again with "
                                "`trimkv trace --overwrite`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptTraceError(f"{path} is not a trimkv trace manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise CorruptTraceError(f"{path}: trace format version {manifest.get('version')!r}, this trimkv reads "
                                f"version {VERSION}: write the store again with this trimkv")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CorruptTraceError(f"{path} lacks the field(s) {missing}: the store is damaged")
    if manifest["dtype"] not in STORE_DTYPES:
        raise CorruptTraceError(f"{path}: dtype {manifest['dtype']!r} is not one of {sorted(STORE_DTYPES)}")
    done = 0
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and shard.get("file") == shard_name(i) and
                isinstance(shard.get("rows"), list) and len(shard["rows"]) == 2 and shard["rows"][0] == done
                and shard["rows"][1] > done):
            raise CorruptTraceError(f"{path}: shard entry {i} ({shard!r:.120}) does not continue the rows before it "
                                    f"(expected {shard_name(i)} from row {done})")
        done = shard["rows"][1]
    if done != manifest["rows_done"]:
        raise CorruptTraceError(f"{path}: its shards hold {done} rows but rows_done says {manifest['rows_done']}")
    return manifest


def check_shard(folder: Path, manifest: dict, entry: dict) -> None:
    """A shard's size and header against the manifest (no tensor is read)."""
    from safetensors import safe_open

    path = folder / entry["file"]
    if not path.is_file():
        raise MissingTraceError(f"{path} is missing: the manifest lists it (rows {entry['rows'][0]}-"
                                f"{entry['rows'][1] - 1}); write the store again, or restore the file")
    if path.stat().st_size != entry["bytes"]:
        raise CorruptTraceError(f"{path} has {path.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}: "
                                "truncated or replaced; write the store again")
    n = entry["rows"][1] - entry["rows"][0]
    want = expected_tensors(manifest, n)
    try:
        with safe_open(str(path), framework="pt") as f:
            got = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a damaged header
        raise CorruptTraceError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    missing = sorted(set(want) - set(got))
    if missing:
        raise CorruptTraceError(f"{path} lacks {len(missing)} tensor(s) the manifest promises, e.g. {missing[:3]}")
    for name, (dtype, shape) in want.items():
        if got[name] != (dtype, shape):
            raise CorruptTraceError(f"{path}: {name} is {got[name][0]} {list(got[name][1])}, the manifest says "
                                    f"{dtype} {list(shape)} (shape mismatch: the shard belongs to another store?)")


class TraceStore:
    """A trace store, validated on open (manifest, shard headers and sizes).

    ``store.layer(l, rows)`` -> :class:`~trimkv.trace.layer.LayerTrace` of decoder layer ``l`` over the given rows
    (all by default), concatenated over shards. ``num_rows`` counts the rows written (a store still being written, or
    stopped, is readable up to its last whole shard; ``complete`` says whether all were).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        for entry in self.manifest["shards"]:
            check_shard(self.path, self.manifest, entry)
        self._starts = [s["rows"][0] for s in self.manifest["shards"]]

    # -- what it holds
    @property
    def num_rows(self) -> int:
        return self.manifest["rows_done"]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (``layers`` says which of them the store holds; all by default)."""
        return self.manifest["shapes"]["num_layers"]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.manifest["targets"])

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def complete(self) -> bool:
        return self.manifest["rows_done"] == self.manifest["rows"]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TraceStore({str(self.path)!r}: {self.num_rows}/{m['rows']} rows x {m['seq_len']} tokens, "
                f"{len(self.layers)} layers, targets {list(self.targets)}, model {m['model'].get('name')!r})")

    # -- reading
    def layer(self, layer: int, rows: int | slice | Sequence[int] | None = None, *, hidden: bool | None = None,
              dtype: torch.dtype | None = None) -> LayerTrace:
        """Layer ``layer`` over ``rows`` (an index, a slice, a list, None = all); ``hidden``: load x too (None = when
        stored); ``dtype``: cast keys / values / hidden (default: as stored, 16-bit). Targets come back in fp32."""
        if layer not in self.manifest["layers"]:
            raise KeyError(f"{self.path} holds layers {self.layers}, not layer {layer}")
        has_hidden = layer in self.manifest["hidden_layers"]
        if hidden and not has_hidden:
            raise KeyError(f"{self.path} keeps the attention input of layers {self.manifest['hidden_layers']} only, "
                           f"not of layer {layer} (trace again with --hidden)")
        hidden = has_hidden if hidden is None else hidden
        names = {"keys": tensor_name(layer, "keys"), "values": tensor_name(layer, "values"), "pos": "pos",
                 "valid": "valid"}
        names.update({f"target.{t}": tensor_name(layer, f"target.{t}") for t in self.targets})
        if hidden:
            names["hidden"] = tensor_name(layer, "hidden")
        got = self._read(names.values(), self._rows(rows))
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        return LayerTrace(layer=layer, keys=cast(got[names["keys"]]), values=cast(got[names["values"]]),
                          pos=got["pos"].long(), valid=got["valid"],
                          utility={t: got[names[f"target.{t}"]].float() for t in self.targets},
                          hidden=cast(got[names["hidden"]]) if hidden else None)

    def tokens(self, rows: int | slice | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` [R, T] int64, ``loss_mask`` / ``valid`` [R, T] bool of the given rows."""
        got = self._read(["input_ids", "loss_mask", "valid"], self._rows(rows))
        return {"input_ids": got["input_ids"].long(), "loss_mask": got["loss_mask"], "valid": got["valid"]}

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest (reads every byte)."""
        for entry in self.manifest["shards"]:
            path = self.path / entry["file"]
            if _sha256(path) != entry["sha256"]:
                raise CorruptTraceError(f"{path}: its SHA-256 differs from the manifest's: the file changed after "
                                        "it was written; write the store again")

    def _rows(self, rows) -> list[int]:
        n = self.num_rows
        if rows is None:
            return list(range(n))
        if isinstance(rows, slice):
            return list(range(n))[rows]
        if isinstance(rows, int):
            rows = [rows]
        out = [int(r) for r in rows]
        bad = [r for r in out if not 0 <= r < n]
        if bad:
            raise IndexError(f"{self.path} holds rows 0-{n - 1}; asked for {bad[:5]}")
        return out

    def _read(self, names: Iterable[str], rows: list[int]) -> dict[str, torch.Tensor]:
        """Each tensor ``name`` over ``rows`` (in that order), read shard by shard (only the slices needed)."""
        from safetensors import safe_open

        names = list(names)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        order: list[int] = []
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for at, r in enumerate(rows):
            s = _shard_of(self._starts, r)
            by_shard.setdefault(s, []).append((at, r - self._starts[s]))
        for s, items in by_shard.items():
            local = [i for _, i in items]
            lo, hi = min(local), max(local) + 1
            idx = torch.tensor([i - lo for i in local])
            with safe_open(str(self.path / self.manifest["shards"][s]["file"]), framework="pt") as f:
                for name in names:
                    block = f.get_slice(name)[lo:hi]
                    parts[name].append(block if (hi - lo == len(local) and local == sorted(local))
                                       else block.index_select(0, idx))
            order += [at for at, _ in items]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        out = {}
        for name in names:
            cat = torch.cat(parts[name]) if parts[name] else None
            if cat is None:
                raise IndexError(f"{self.path}: no rows asked for")
            out[name] = cat if order == sorted(order) else cat.index_select(0, inverse)
        return out


def _shard_of(starts: list[int], row: int) -> int:
    import bisect

    return bisect.bisect_right(starts, row) - 1


def fingerprint(parts: dict[str, Any]) -> str:
    """SHA-256 of what makes a store what it is (model, data, settings), for resume checks."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

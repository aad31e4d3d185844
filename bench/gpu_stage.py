"""Staging for a GPU visit: what the lent machine lacks, cut to what one device command may carry.

The lent machine has no package index, and each device command carries at most 64 MiB: the working tree (tracked
and untracked-not-ignored files) plus the paths it names. So, on a machine with the index, before the visit::

    python -m bench.gpu_plan stage       # = make gpu-stage (builds with this module's functions)

writes two ignored folders:

* ``.whl/``: wheels for the GPU image's Python (3.12, manylinux x86-64) of what its image lacks (:data:`WHEELS`,
  versions from ``constraints.txt``), and DeepSpeed built here from its source release with ``DS_BUILD_OPS=0``
  (pure Python; PyPI has no DeepSpeed wheel);
* ``.gguf_parts/``: the default model's GGUF in parts (``part-0``, ``part-1``, ...) sized so that each command of
  the visit (:mod:`bench.gpu_plan`) stays under the limit with the working tree beside it, and ``MANIFEST.json``
  (size and sha256 of the GGUF, every part and every wheel).

On the GPU machine (every target runs it first)::

    python3 -m bench.gpu_stage receive   # parts carried by this command -> /tmp/trimkv-stage/parts, wheels installed
    python3 -m bench.gpu_stage assemble  # all parts -> $TRIMKV_HOME/models/smollm2/<gguf>, sha256 checked

``/tmp`` outlives a command while the machine stays warm, so parts carried by earlier commands of the same visit are
found there. Back here, ``python -m bench.gpu_stage unpack FOLDER DEST`` joins and extracts the bundles a target
wrote to ``$OUT`` (:func:`bundle`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
PARTS_DIR = REPO / ".gguf_parts"
MANIFEST = PARTS_DIR / "MANIFEST.json"
STAGE = Path(os.environ.get("TRIMKV_GPU_STAGE", "/tmp/trimkv-stage"))   # on the GPU machine; kept while warm
LIMIT = 64 * 2**20                   # bytes one device command may carry (working tree + carried paths)
MARGIN = 2**20                       # left free in every command (stage again right before the visit)
BUNDLE_PART = 15 * 2**20             # a file coming back from $OUT may have 16 MiB

# What the GPU image lacks (gpu.md, KINDS.md: it has torch, triton, transformers, accelerate, peft, safetensors,
# pyarrow, pandas, pytest, pytest-xdist, pytest-timeout, ...). Versions come from constraints.txt.
WHEELS = ("gguf", "datasets", "dill", "multiprocess", "pydantic", "pydantic_core", "annotated-types",
          "typing-inspection", "typing_extensions", "hjson")
SOURCE_BUILDS = ("deepspeed",)       # sdist only: built here into a pure-Python wheel (DS_BUILD_OPS=0)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GPU_PYTHON = "3.12"


class StageError(RuntimeError):
    """Staging is missing or does not match: the message names what and the command that fixes it."""


# ------------------------------------------------------------------------------------------------ helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what every device command sends: tracked files and untracked files git does not ignore (and a
    ``shared/`` folder inside the checkout, if any)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout.decode()
    files = {repo / f for f in out.split("\0") if f}
    files |= {p for p in (repo / "shared").rglob("*") if p.is_file()} if (repo / "shared").is_dir() else set()
    return sum(p.stat().st_size for p in files if p.is_file())


def locked_versions(names, lock: Path = REPO / "constraints.txt") -> dict[str, str]:
    """``name -> version`` from the lock file (names compared PEP 503-normalised); StageError for a missing one."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[norm(m.group(1))] = m.group(2)
    missing = [n for n in names if norm(n) not in pins]
    if missing:
        raise StageError(f"{lock.name} pins no version of {missing}: add them (make test-latest lock)")
    return {n: pins[norm(n)] for n in names}


def gguf_path() -> Path:
    from trimkv.base_model import GGUF_NAME, default_model_dir

    return default_model_dir() / GGUF_NAME


# --------------------------------------------------------------------------------------------- build (here)


def build_wheels(dest: Path = WHEEL_DIR, python: str = sys.executable) -> list[Path]:
    """Download :data:`WHEELS` for the GPU image's Python and build :data:`SOURCE_BUILDS` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = locked_versions(WHEELS + SOURCE_BUILDS)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    GPU_PYTHON, "--implementation", "cp", *plat, "-d", str(dest),
                    *(f"{n}=={pins[n]}" for n in WHEELS)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in SOURCE_BUILDS:
            subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp,
                            f"{name}=={pins[name]}"], check=True)
            sdist = next(Path(tmp).glob(f"{name}-*.tar.gz"))
            subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                            str(sdist)], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    wheels = sorted(dest.glob("*.whl"))
    pure = [w.name for w in wheels if w.name.split("-")[0] in SOURCE_BUILDS and not w.name.endswith("-none-any.whl")]
    if pure:
        raise StageError(f"{pure} were built with compiled ops; they must be pure Python (DS_BUILD_OPS=0)")
    return wheels


def split_gguf(capacities: list[int], source: Path | None = None, dest: Path = PARTS_DIR) -> dict:
    """Cut the GGUF into parts of at most ``capacities[k]`` bytes (one per carrying command, in order) and write
    the manifest; returns it. StageError when the capacities cannot hold the file."""
    source = source or gguf_path()
    if not source.is_file():
        raise StageError(f"{source} is not on disk: run `make model` first (it fetches the default model)")
    total = source.stat().st_size
    if sum(max(c, 0) for c in capacities) < total:
        raise StageError(f"{source.name} has {total / 2**20:.1f} MiB but the visit's commands can carry only "
                         f"{sum(max(c, 0) for c in capacities) / 2**20:.1f} MiB of it beside the working tree: add a "
                         "staging command to the plan (bench/gpu_plan.py) or make the working tree smaller")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    parts = []
    with open(source, "rb") as f:
        for k, cap in enumerate(capacities):
            data = f.read(max(cap, 0))
            if not data:
                break
            part = dest / f"part-{k}"
            part.write_bytes(data)
            parts.append({"name": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"gguf": source.name, "bytes": total, "sha256": sha256(source), "parts": parts,
                "wheels": [{"name": w.name, "bytes": w.stat().st_size} for w in sorted(WHEEL_DIR.glob("*.whl"))]}
    write_manifest(manifest, dest / MANIFEST.name)
    return manifest


def write_manifest(manifest: dict, path: Path = MANIFEST) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: Path = MANIFEST) -> dict:
    if not path.is_file():
        raise StageError(f"{path} is missing: run `make gpu-stage` on a machine with the package index first")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- the GPU machine


def receive(repo: Path = REPO, stage: Path = STAGE, python: str = sys.executable) -> dict:
    """Keep what this command carried: GGUF parts into ``stage/parts`` (sha256 checked against the manifest) and
    the wheels installed into ``stage/site`` (once per machine). Returns what the stage holds now."""
    manifest = read_manifest(repo / ".gguf_parts" / MANIFEST.name)
    (stage / "parts").mkdir(parents=True, exist_ok=True)
    want = {p["name"]: p for p in manifest["parts"]}
    for part in sorted((repo / ".gguf_parts").glob("part-*")):
        info = want.get(part.name)
        if info is None or part.stat().st_size != info["bytes"] or sha256(part) != info["sha256"]:
            raise StageError(f"{part} does not match {MANIFEST.name}: stage again (make gpu-stage) and carry the "
                             "parts of the same staging")
        shutil.copyfile(part, stage / "parts" / part.name)
    wheels = sorted((repo / ".whl").glob("*.whl"))
    marker = stage / "site" / ".installed"
    names = "\n".join(w.name for w in wheels)
    if wheels and (not marker.is_file() or marker.read_text() != names):
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(stage / "site"), *map(str, wheels)], check=True)
        marker.write_text(names)
    return status(manifest, stage)


def status(manifest: dict, stage: Path = STAGE) -> dict:
    have = {p.name for p in (stage / "parts").glob("part-*")} if (stage / "parts").is_dir() else set()
    parts = [p["name"] for p in manifest["parts"]]
    return {"parts": parts, "have": [p for p in parts if p in have], "missing": [p for p in parts if p not in have],
            "wheels_installed": (stage / "site" / ".installed").is_file()}


def assemble(manifest: dict, stage: Path = STAGE, dest: Path | None = None) -> Path:
    """Join the parts into the GGUF at ``dest`` (default: where :func:`trimkv.base_model.load_model` looks) and check
    its sha256; a GGUF already there with the right sha256 is kept."""
    dest = dest or gguf_path()
    if dest.is_file() and dest.stat().st_size == manifest["bytes"] and sha256(dest) == manifest["sha256"]:
        return dest
    state = status(manifest, stage)
    if state["missing"]:
        raise StageError(f"GGUF parts {state['missing']} are not in {stage / 'parts'}: the commands that carry them "
                         "did not run on this machine (it went back between commands?). Run the visit's staging "
                         "commands again, in order (python -m bench.gpu_plan prints them)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with open(tmp, "wb") as out:
        for name in state["parts"]:
            with open(stage / "parts" / name, "rb") as f:
                shutil.copyfileobj(f, out)
    if sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise StageError(f"the joined parts do not give {manifest['gguf']} (sha256 differs): stage again")
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------------------------------- results back


def bundle(folder: Path, out: Path, name: str, *, exclude: tuple[str, ...] = (),
           part_bytes: int = BUNDLE_PART) -> list[Path]:
    """``folder`` as ``out/name.tar.gz`` (cut into ``name.tar.gz.00``, ``.01``, ... when larger than ``part_bytes``:
    a file back from ``$OUT`` may have 16 MiB). ``exclude``: paths relative to ``folder`` left out with what is
    under them (e.g. training checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.tar.gz*"):
        old.unlink()
    whole = out / f"{name}.tar.gz"

    def keep(info: tarfile.TarInfo):
        rel = info.name.split("/", 1)[1] if "/" in info.name else ""
        return None if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude) else info

    with tarfile.open(whole, "w:gz") as tar:
        tar.add(folder, arcname=name, filter=keep)
    if whole.stat().st_size <= part_bytes:
        return [whole]
    pieces = []
    with open(whole, "rb") as f:
        for k, data in enumerate(iter(lambda: f.read(part_bytes), b"")):
            piece = out / f"{name}.tar.gz.{k:02d}"
            piece.write_bytes(data)
            pieces.append(piece)
    whole.unlink()
    return pieces


def unpack(source: Path, dest: Path) -> list[Path]:
    """Join and extract every bundle in ``source`` (the files a target wrote to ``$OUT``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted({re.sub(r"\.tar\.gz(\.\d+)?$", "", p.name) for p in source.glob("*.tar.gz*")})
    done = []
    for name in names:
        pieces = sorted(source.glob(f"{name}.tar.gz.*")) or [source / f"{name}.tar.gz"]
        with tempfile.TemporaryDirectory() as tmp:
            whole = Path(tmp) / "bundle.tar.gz"
            with open(whole, "wb") as out:
                for piece in pieces:
                    out.write(piece.read_bytes())
            with tarfile.open(whole) as tar:
                tar.extractall(dest, filter="data")
        done.append(dest / name)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("receive", help="GPU machine: keep this command's parts, install the wheels")
    sub.add_parser("assemble", help="GPU machine: join the parts into the default model's GGUF")
    u = sub.add_parser("unpack", help="here: join and extract the bundles a target wrote to $OUT")
    u.add_argument("source", type=Path)
    u.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "receive":
            print(json.dumps(receive()))
        elif args.cmd == "assemble":
            print(assemble(read_manifest()))
        else:
            for folder in unpack(args.source, args.dest):
                print(folder)
    except StageError as err:
        print(f"gpu_stage {args.cmd}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What ships with trimkv besides its code: the recipes and the default gates (what ``trimkv demo`` loads).

In a source tree (a clone, or an editable install) they are the repository's ``recipes/`` and ``checkpoints/``
folders; an installed wheel carries copies under ``trimkv/_shipped/`` (``setup.py`` puts them there). Either way
:func:`shipped_root` finds them, so ``trimkv recipes list`` / ``trimkv recipes copy NAME`` and the demo work from
both (as torchtune's ``tune ls`` / ``tune cp`` list and copy its recipes).

Only what the demo needs ships in the wheel: the gates (:data:`DEFAULT_GATES`, ~18 MB of fp32 weights) and their
LU-KV per-head budget allocation (:data:`DEFAULT_ALLOCATION`, a few kB of JSON); the other checkpoints under
``checkpoints/`` are in the repository only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import RecipeError

PACKAGE_DIR = Path(__file__).resolve().parent
WHEEL_DATA = "_shipped"                                   # trimkv/_shipped/ in an installed wheel
RECIPES = "recipes"
# the demo's gates: distilled in layers 0-14 (recipes/smollm2-135m-qa-m64.yaml), trace-fitted in 15-29 (make trace-fit)
DEFAULT_GATES = "checkpoints/smollm2-135m-qa-hybrid-mean"
DEFAULT_ALLOCATION = "checkpoints/smollm2-135m-lukv-hybrid-mean"   # LU-KV head budgets for them (trimkv profile)
SHIPPED = (RECIPES, DEFAULT_GATES, DEFAULT_ALLOCATION)    # what setup.py copies into the wheel


def shipped_root() -> Path:
    """The folder that holds ``recipes/`` and ``checkpoints/``: ``trimkv/_shipped`` of a wheel, else the source tree."""
    inside = PACKAGE_DIR / WHEEL_DATA
    return inside if inside.is_dir() else PACKAGE_DIR.parent


def default_gates() -> Path:
    """The gate checkpoint the demo loads (the shipped SmolLM2 QA gates, M = 64: distilled below, trace-fitted above)."""
    return shipped_root() / DEFAULT_GATES


def default_allocation() -> Path:
    """The LU-KV allocation profiled for the default gates (``--head-budgets`` of the demo's LU-KV row)."""
    return shipped_root() / DEFAULT_ALLOCATION


def recipes_dir() -> Path:
    return shipped_root() / RECIPES


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every shipped recipe, by name (the description is its first comment)."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        text = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        out.append((path.stem, text))
    return out


def recipe_path(name: str) -> Path:
    """The shipped recipe ``name`` (with or without ``.yaml``); RecipeError listing the shipped names otherwise."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = recipes_dir() / f"{stem}.yaml"
    if "/" in stem or not path.is_file():
        names = ", ".join(n for n, _ in list_recipes())
        raise RecipeError(f"no shipped recipe named {name!r}; the shipped recipes are: {names} "
                          "(trimkv recipes list shows what each is for)")
    return path


def copy_recipe(name: str, dest: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or a folder to put ``NAME.yaml`` in; default: the current
    folder) and return the new file. An existing file is kept unless ``overwrite``."""
    src = recipe_path(name)
    target = Path(dest) if dest is not None else Path.cwd()
    if target.is_dir() or (dest is not None and str(dest).endswith(("/", "\\"))):
        target = target / src.name
    if target.exists() and not overwrite:
        raise RecipeError(f"{target} exists; pick another destination or pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


__all__ = ["shipped_root", "default_gates", "recipes_dir", "list_recipes", "recipe_path", "copy_recipe", "SHIPPED"]

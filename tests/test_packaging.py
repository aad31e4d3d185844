"""The package as users install it: a distribution name that is not the TRIM-KV authors' `trimkv`, hard
dependencies that only import/train/serve need, every optional package behind an extra that errors name, floors that
a test run installs, the recipes and the demo's gates inside the wheel, and one cache folder for make and Python."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from trimkv import extras, shipped
from trimkv._version import DISTRIBUTION, __version__
from trimkv.base_model import trimkv_home
from trimkv.errors import MissingDependencyError, TrimKVError

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HARD = {"torch", "transformers", "huggingface_hub", "safetensors", "datasets", "einops", "pyyaml", "rich"}


def _name(req: str) -> str:
    return re.split(r"[<>=!\[; ]", req, maxsplit=1)[0].lower().replace("-", "_")


def _floor(req: str) -> str | None:
    m = re.search(r">=\s*([\w.]+)", req)
    return m.group(1) if m else None


def _pins(lock: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[_name(name)] = version.strip()
    return out


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_distribution_name_does_not_collide_with_the_authors_package():
    assert PROJECT["name"] == DISTRIBUTION == "trimkv-gates"
    assert PROJECT["scripts"]["trimkv"] == "trimkv.cli:main"


def test_hard_dependencies_are_what_import_train_and_serve_need():
    assert {_name(r) for r in PROJECT["dependencies"]} == {n.replace("-", "_") for n in HARD}
    optional = PROJECT["optional-dependencies"]
    for package, extra in extras.EXTRAS.items():    # the one list in trimkv.extras agrees with pyproject.toml
        assert package in {_name(r) for r in optional[extra]}, (package, extra)


def test_every_floor_is_a_version_a_test_run_installs():
    """Floors equal the pins of constraints-oldest.txt (make test-compat), or of constraints.txt (make test) for the
    extras the compatibility run leaves out; torch's floor is the Makefile's TORCH."""
    oldest, newest = _pins("constraints-oldest.txt"), _pins("constraints.txt")
    torch_pin = re.search(r"TORCH\s*\?=\s*torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    reqs = PROJECT["dependencies"] + [r for k, v in PROJECT["optional-dependencies"].items() if k not in ("test", "all")
                                      for r in v]
    for req in reqs:
        name, floor = _name(req), _floor(req)
        assert floor is not None, f"{req}: no floor"
        tested = torch_pin if name == "torch" else oldest.get(name, newest.get(name))
        assert tested is not None, f"{name} is installed by no test run"
        assert _version_tuple(floor) == _version_tuple(tested)[:len(_version_tuple(floor))], (req, tested)


def test_python_versions_are_the_tested_ones():
    """The floor is the Python every CI run uses (3.11); the suite also runs on newer ones (the GPU image's 3.12)."""
    assert PROJECT["requires-python"] == ">=3.11" and sys.version_info[:2] >= (3, 11)
    assert "Programming Language :: Python :: 3.11" in PROJECT["classifiers"]


def test_optional_packages_stay_unimported_and_errors_name_the_extra(monkeypatch):
    mine = sorted(set(extras.EXTRAS) - {"triton", "accelerate"})   # those two torch / transformers import themselves
    code = ("import sys, trimkv, trimkv.train.run, trimkv.serve, trimkv.eval.plots, trimkv.cli; "
            f"print(sorted(p for p in {mine!r} if p in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    monkeypatch.setitem(sys.modules, "peft", None)            # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'trimkv-gates\[lora\]'") as err:
        extras.require("peft", "LoRA co-training")
    assert isinstance(err.value, (TrimKVError, ImportError))


def test_setup_py_ships_what_trimkv_shipped_looks_for():
    text = (ROOT / "setup.py").read_text()
    assert tuple(eval(re.search(r"SHIPPED = (\(.*?\))", text).group(1))) == shipped.SHIPPED
    for rel in shipped.SHIPPED:
        assert (ROOT / rel).is_dir()
    assert (shipped.default_gates() / "config.json").is_file()
    assert "smollm2-135m-qa-m64" in [n for n, _ in shipped.list_recipes()]


def test_the_makefile_and_the_library_use_one_cache_folder(tmp_path):
    """`make` and a direct command agree on TRIMKV_HOME: set, empty or unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRIMKV_HOME", "MAKEFLAGS", "MAKELEVEL")}
    env["HOME"] = str(tmp_path)
    for value in (None, "", str(tmp_path / "elsewhere")):
        run_env = dict(env, **({} if value is None else {"TRIMKV_HOME": value}))
        out = subprocess.run(["make", "-s", "-pn", "-f", "Makefile", "--no-print-directory", "venv"], cwd=ROOT,
                             env=run_env, capture_output=True, text=True).stdout
        made = re.search(r"^TRIMKV_HOME :?= (.*)$", out, re.M).group(1)
        if value is None:
            os.environ.pop("TRIMKV_HOME", None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(tmp_path))
            if value is None:
                mp.delenv("TRIMKV_HOME", raising=False)
            else:
                mp.setenv("TRIMKV_HOME", value)
            assert Path(made) == trimkv_home(), value


def test_the_wheel_carries_the_recipes_and_the_demo_gates(tmp_path):
    """`pip wheel .` (what `pip install .` installs): the recipes, the default gates and their allocation are
    package data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("trimkv_gates-*.whl"))
    assert wheel.name.startswith(f"trimkv_gates-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    recipes = {Path(n).name for n in names if n.startswith("trimkv/_shipped/recipes/")}
    assert recipes == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    gates = {Path(n).name for n in names if n.startswith(f"trimkv/_shipped/{shipped.DEFAULT_GATES}/")}
    assert gates == {"config.json", "model.safetensors", "README.md"}
    allocation = {Path(n).name for n in names if n.startswith(f"trimkv/_shipped/{shipped.DEFAULT_ALLOCATION}/")}
    assert allocation == {"allocation.json", "README.md"}
    folders = {n.split("/")[3] for n in names if n.startswith("trimkv/_shipped/checkpoints/")}
    assert folders == {Path(shipped.DEFAULT_GATES).name, Path(shipped.DEFAULT_ALLOCATION).name}   # the rest stay
    assert not any(n.startswith(("tests/", "checkpoints/", "recipes/")) for n in names)
    assert wheel.stat().st_size < 30 * 2**20

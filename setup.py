"""Build hook (all metadata is in pyproject.toml): the wheel carries the recipes and the demo's gates as package data.

They stay where a clone has them (``recipes/``, ``checkpoints/``) and are copied into ``trimkv/_shipped/`` of the
built package, where :mod:`trimkv.shipped` looks first. An editable install needs no copy: it finds the source tree.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# = trimkv.shipped.SHIPPED (a test checks they agree)
SHIPPED = ("recipes", "checkpoints/smollm2-135m-qa-hybrid-mean", "checkpoints/smollm2-135m-lukv-hybrid-mean")


class BuildPyWithShipped(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        shipped = Path(self.build_lib) / "trimkv" / "_shipped"
        shutil.rmtree(shipped, ignore_errors=True)        # a reused build/ keeps what an earlier SHIPPED named
        for rel in SHIPPED:
            src, dst = HERE / rel, shipped / rel
            if not src.is_dir():
                raise FileNotFoundError(f"{src} is missing: build the wheel from a full clone (or its sdist)")
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.tmp-*", ".*"))


setup(cmdclass={"build_py": BuildPyWithShipped})

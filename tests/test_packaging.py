"""The wheel ships every module: the package's own, the Triton kernels (top-level ``kernels/`` installed as
``otlabel.kernels``) and the PEP 561 marker. A module missing from it would pass every test run from the checkout.

The wheel is built from a copy of the tracked files: a ``build/`` folder left in the checkout would otherwise
supply stale modules and hide a broken package configuration.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building the wheel needs setuptools")
def test_wheel_contains_every_module(tmp_path):
    source = tmp_path / "src"
    for name in tracked_files():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    done = subprocess.run([*build, str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("otlabel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"otlabel/{p.relative_to(ROOT / 'otlabel').as_posix()}" for p in (ROOT / "otlabel").rglob("*.py")}
    expected |= {f"otlabel/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected.add("otlabel/py.typed")
    assert expected <= names, sorted(expected - names)


def test_every_submodule_is_an_attribute_of_the_package():
    """``otlabel.<module>`` works without importing it first for every module and subpackage of otlabel (a new
    module missing from ``SUBMODULES`` raised AttributeError: ``otlabel.feasibility`` did)."""
    import otlabel

    package = Path(otlabel.__file__).parent
    names = {p.stem for p in package.glob("*.py") if not p.stem.startswith("__")}
    names |= {p.parent.name for p in package.glob("*/__init__.py")} | {"kernels"}  # kernels: installed in otlabel/
    assert set(otlabel.SUBMODULES) == names
    for name in names:
        assert getattr(otlabel, name).__name__ == f"otlabel.{name}", name

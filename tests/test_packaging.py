"""The wheel ships every module: the package's own, the Triton kernels (top-level ``kernels/`` installed as
``otlabel.kernels``) and the PEP 561 marker. A module missing from it would pass every test run from the checkout.

The wheel is built from a copy of the tracked files: a ``build/`` folder left in the checkout would otherwise
supply stale modules and hide a broken package configuration.
"""

from __future__ import annotations

import importlib.util
import re
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


def setuptools_builds_wheels() -> bool:
    """Whether this environment can build the wheel without isolation, as below: pyproject.toml's setuptools >= 68,
    with the wheel package or from 70.1 on (which builds wheels itself). A venv's bundled setuptools 65 could not
    ("invalid command 'bdist_wheel'")."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    release = tuple(int(p) for p in re.findall(r"\d+", version("setuptools"))[:2])
    return release >= (70, 1) or (release >= (68,) and importlib.util.find_spec("wheel") is not None)


@pytest.mark.skipif(not setuptools_builds_wheels(), reason="building the wheel needs setuptools >= 68")
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


def test_dir_lists_the_module_globals_and_the_names_imported_on_first_use():
    """dir(otlabel) listed __version__, the public names and the submodules, but not the dunders plain dir() gives
    (__name__, __doc__, __file__, __path__...) nor names already imported."""
    import otlabel

    listed = dir(otlabel)
    assert listed == sorted(listed)
    assert {"__name__", "__doc__", "__file__", "__path__", "__version__", "__all__"} <= set(listed)
    assert set(vars(otlabel)) <= set(listed)
    assert set(otlabel.__all__) | set(otlabel.SUBMODULES) <= set(listed)


SOLVE_EVERY_WAY = """
import json, sys
if sys.argv[1:] == ["--without-extras"]:
    for name in ("triton", "scipy", "ot"):  # the optional extras: [triton], [exact]
        sys.modules[name] = None  # import raises ImportError
import torch
from otlabel import exact_assign, exact_plan, sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream

g = torch.Generator().manual_seed(0)
s, z, p = torch.randn(300, 5, generator=g), torch.randn(300, 8, generator=g), torch.randn(5, 8, generator=g)
labels = {
    "dense": sinkhorn_assign(s, 0.1).labels.tolist(),
    "features": sinkhorn_assign(features=z, prototypes=p, epsilon=0.5).labels.tolist(),
    "stream": sinkhorn_assign_stream(s.numpy(), 0.1).labels.tolist(),
    "sharded": sinkhorn_assign_sharded(s, 0.1).labels.tolist(),
}
errors = {}
for name, call in {"triton": lambda: sinkhorn_assign(s, 0.1, backend="triton"),
                   "exact": lambda: exact_plan(s[:20, :4]),
                   "linprog": lambda: exact_plan(s[:20, :4], method="linprog"),
                   "assign": lambda: exact_assign(s[:20, :4])}.items():
    try:
        call()
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"labels": labels, "errors": errors}))
"""


def test_the_cpu_entry_points_work_without_the_optional_extras():
    """``pip install otlabel`` without [triton] or [exact]: every CPU entry point solves as with them (CI always has
    both installed, so nothing else here would notice an import of either creeping into the core), and the two that
    need them say which extra to install."""
    import json

    def solve(*flags) -> dict:
        run = subprocess.run([sys.executable, "-c", SOLVE_EVERY_WAY, *flags], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.splitlines()[-1])

    got, want = solve("--without-extras"), solve()
    assert got["labels"] == want["labels"]
    assert "otlabel[triton]" in got["errors"]["triton"], got["errors"]
    for name in ("exact", "linprog", "assign"):
        assert "ImportError" in got["errors"][name] and "otlabel[exact]" in got["errors"][name], got["errors"]


def args_entries(fn) -> set[str]:
    """The names a Google-style ``Args:`` section of ``fn``'s docstring gives entries to (``a, b: ...`` names both);
    the section ends at the next unindented line."""
    import inspect

    lines = inspect.getdoc(fn).splitlines()
    assert "Args:" in lines, f"{fn.__name__} has no Args section"
    start = lines.index("Args:") + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    named = set()
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        if len(line) - len(line.lstrip()) == indent and ":" in line:
            named |= {name.strip() for name in line.split(":")[0].split(",")}
    return named


def test_every_public_function_has_an_args_entry_per_parameter():
    """help() on each public function lists every parameter of its signature in Args, under its own name. Only
    sinkhorn_assign_sharded's was checked: sinkhorn_assign_stream's entry read ``scores / features`` (neither name),
    allow_tf32 (sinkhorn_assign) and epsilon_scaling (sharded) were only words inside other entries, and the exact
    solvers and baselines had no Args section."""
    import inspect

    import otlabel

    functions = [getattr(otlabel, name) for name in otlabel.__all__ if inspect.isfunction(getattr(otlabel, name))]
    assert len(functions) == 7
    for fn in functions:
        parameters = set(inspect.signature(fn).parameters)
        assert parameters - args_entries(fn) == set(), fn.__name__
        assert args_entries(fn) - parameters == set(), fn.__name__


def test_sinkhorn_assign_help_names_what_it_raises_and_warns():
    """help(sinkhorn_assign) never named InputWarning or ScoreSpanError, which a new user meets first (SeLa's lambda
    given as epsilon, probabilities as scores, a small epsilon on logits), nor said that warn=False leaves
    InputWarning on, nor what the default epsilon is for: a user had to read the README or the source."""
    import inspect

    import otlabel

    doc = inspect.getdoc(otlabel.sinkhorn_assign)
    lines = doc.splitlines()
    assert "Raises:" in lines and "Warns:" in lines
    warns = " ".join(lines[lines.index("Warns:") :]).split("Example:")[0]
    assert "ConvergenceWarning" in warns and "InputWarning" in warns
    raises = " ".join(lines[lines.index("Raises:") : lines.index("Warns:")])
    assert "TypeError" in raises and "ValueError" in raises and "ScoreSpanError" in raises
    entry = " ".join(doc.split())
    assert "The default, 0.05, is SwAV's for cosine similarities" in entry and "1 / lambda" in entry
    assert "It does not silence :class:`~otlabel.InputWarning`" in entry


def test_score_span_error_help_says_when_it_is_raised_and_what_to_do():
    """help(otlabel.ScoreSpanError), a public name, spoke to the command line's code ('with what the message was
    made from, so that the command line can say the fixes in its own terms'): not when it is raised nor the fix."""
    import otlabel

    doc = " ".join(otlabel.ScoreSpanError.__doc__.split())
    assert "3e3" in doc and "1e11" in doc and "epsilon" in doc
    assert "scores.amax(-1, keepdim=True)" in doc and "float64" in doc

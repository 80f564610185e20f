"""Smoke tests that keep every benchmark scenario runnable (tiny sizes, < 1 minute in all).

Nothing here asserts on a time: timings belong to ``python -m benchmarks``. What is asserted is that every
scenario runs end to end, that every method shows up in its tables (failures as FAILED/TIMEOUT/SKIPPED rows, never
dropped), that the methods share one signature and the uniform read-outs are right, and that the outputs (CSV,
markdown sections, plots) are written where they should be.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `benchmarks` is not installed

import otlabel  # noqa: E402
from benchmarks import SCENARIOS, harness, methods  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.problems import make_problem  # noqa: E402

pytest.importorskip("pytest_benchmark")
pytest.importorskip("ot")

TINY = (300, 8)
STATUS_WORDS = ("ok", "FAILED", "TIMEOUT", "SKIPPED")


def tiny_context(tmp_path) -> harness.Context:
    return harness.Context(quick=True, out=tmp_path, repeats=1, budget_s=0.1, max_iter=300, size=TINY)


def raised(row: harness.Row) -> bool:
    """A FAILED row from an exception ("FAILED: ValueError: ..."), not from a plan that missed its target."""
    return re.match(r"FAILED: \w*(Error|Exception)\b", row.status) is not None


@pytest.fixture(scope="module")
def problem():
    return make_problem(*TINY, 0.1, warm=True)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_runs_and_reports(name, tmp_path, benchmark):
    module = importlib.import_module(f"benchmarks.{name}")
    ctx = tiny_context(tmp_path)
    rows = benchmark.pedantic(module.run, args=(ctx,), rounds=1, iterations=1)
    assert rows, f"{name} produced no rows"
    for row in rows:
        assert row.status.split(":")[0] in STATUS_WORDS, row
        assert not (row.method.startswith("otlabel") and raised(row)), f"otlabel raised: {row}"
        if row.ok and row.metric.startswith("s"):
            assert math.isfinite(row.median), row
    text = module.report(rows, ctx)
    assert "|---" in text
    for path in module.plot(rows, ctx):
        assert path.exists() and path.stat().st_size > 0


def test_every_method_is_a_row_even_when_it_fails(tmp_path):
    """Tolerance at eps=0.01: the SwAV-style loop overflows in float32 — the row must say FAILED, not vanish."""
    from benchmarks import tolerance

    ctx = tiny_context(tmp_path)
    rows = tolerance.run(ctx)
    expected = set(ctx.selected(tolerance.methods()))
    for eps in tolerance.epsilons(ctx):
        for tol in tolerance.TOLERANCES:
            got = {r.method for r in rows if r.eps == eps and r.metric == f"s to {tol:g}"}
            assert got == expected, f"missing at eps={eps}, tol={tol}: {expected - got}"
    assert not [r for r in rows if r.method.startswith("otlabel") and raised(r)], "an otlabel variant raised"
    swav = next(r for r in rows if r.method == "swav" and r.eps == 0.01)
    assert swav.status.startswith("FAILED"), swav
    assert "|" in tolerance.report(rows, ctx) and "**FAILED**" in tolerance.report(rows, ctx)


def test_methods_share_one_signature(problem):
    registry = {**methods.all_methods(), **methods.acceleration_variants(), **methods.published_rule_methods()}
    for name, method in registry.items():
        params = list(inspect.signature(method.run).parameters)
        assert params == ["problem", "n_iter", "tol"], f"{name}: {params}"


@pytest.mark.parametrize("name", list(methods.all_methods()))
def test_each_method_returns_a_balanced_plan(problem, name):
    method = methods.all_methods()[name]
    if method.available(problem.device):
        pytest.skip(method.available(problem.device))
    method.prepare_inputs(problem)
    out, _ = harness.call(method, problem, 200, None, harness.Context())
    metrics = harness.evaluate(problem, out)
    assert metrics["finite"], name
    assert metrics["marginal_error"] < 1e-3, f"{name}: marginal error {metrics['marginal_error']:.3g} at eps=0.1"


def test_swav_to_tolerance_is_the_library_baseline(problem):
    """The stopping loop in methods.swav is otlabel.swav_sinkhorn plus a free check: same codes, same iterations."""
    out = methods.swav(problem, 1000, 1e-4)
    assert out.converged
    ref = otlabel.swav_sinkhorn(problem.scores, problem.epsilon, out.n_iter)
    torch.testing.assert_close(out.values, ref, rtol=1e-5, atol=1e-7)


def test_evaluate_reads_out_exact_and_converged_plans(problem):
    exact = otlabel.exact_plan(problem.scores)
    m = harness.evaluate(problem, methods.Outcome(exact.plan, 1.0, 0, None))
    assert m["marginal_error"] < 1e-9
    assert m["objective"] == pytest.approx(exact.objective, rel=1e-9)
    res = otlabel.sinkhorn_assign(problem.scores, 0.1, tol=1e-5)
    m = harness.evaluate(problem, methods.otlabel_outcome(res, problem))
    assert m["marginal_error"] < 2e-5
    assert m["objective"] <= exact.objective + 1e-9
    counts = np.bincount(res.labels.numpy(), minlength=problem.k)
    assert m["label_imbalance"] == pytest.approx(np.abs(counts / problem.n - 1 / problem.k).sum())


def test_nan_and_exceptions_become_failed_rows(problem):
    nan_plan = methods.Outcome(np.full((problem.n, problem.k), np.nan), 1.0, 3, None)
    assert harness.judge(nan_plan, harness.evaluate(problem, nan_plan), None).startswith("FAILED")

    def broken(problem, n_iter, tol):
        raise RuntimeError("boom")

    row = harness.time_to_tolerance(methods.Method("broken", broken, "test"), problem, 1e-3, harness.Context(), "test")
    assert row.status == "FAILED: RuntimeError: boom"
    rows = harness.per_iteration(methods.Method("broken", broken, "test"), problem, harness.Context(), "test")
    assert all(r.status.startswith("FAILED") for r in rows)


def test_stall_is_told_apart_from_slow_convergence():
    assert methods.stall_level([math.inf] + [1e-5] * 400) == pytest.approx(1e-5)
    assert methods.stall_level([math.inf] + list(np.geomspace(1, 1e-9, 400))) is None


def test_epsilon_scaling_variant_runs_or_says_why(problem):
    variant = methods.acceleration_variants()["otlabel eps-scaling 0.5"]
    row = harness.time_to_tolerance(variant, problem, 1e-3, harness.Context(budget_s=0.5), "test")
    if methods.has_epsilon_scaling():
        assert row.ok, row
    else:
        assert row.status.startswith("SKIPPED") and "epsilon_scaling" in row.status


def test_outputs_csv_and_markdown_sections(tmp_path):
    assert main(["--quick", "--scenario", "quality", "--size", *map(str, TINY), "--out", str(tmp_path)]) == 0
    assert main(["--quick", "--scenario", "memory", "--size", *map(str, TINY), "--out", str(tmp_path)]) == 0
    assert (
        main(["--quick", "--scenario", "quality", "--size", *map(str, TINY), "--out", str(tmp_path), "--no-plots"]) == 0
    )
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["scenario"] for r in rows} == {"quality", "memory"}
    assert all(r["torch"] == torch.__version__ and r["mode"] == "quick" for r in rows)
    text = (tmp_path / "RESULTS_CPU.md").read_text()
    assert text.count("<!-- scenario:quality -->") == 1 and text.count("<!-- scenario:memory -->") == 1
    assert (tmp_path / "plots" / "memory.png").exists()


def test_csv_with_an_old_header_is_moved_aside(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("date,method\n2020-01-01,x\n")
    env = harness.environment(torch.device("cpu"))
    harness.append_csv([harness.Row("s", 1, 1, 0.1, "m", "s/iter", 1.0)], path, env, "full")
    assert path.read_text().startswith(",".join(harness.CSV_FIELDS))
    assert len(list(tmp_path.glob("results.*.csv"))) == 1


@pytest.mark.parametrize("script", ["gpu_dense.py", "gpu_features.py"])
def test_gpu_scripts_dry_run_on_the_interpreter(script, tmp_path):
    """The GPU scripts must be ready for a lent GPU: their dry run (tiny sizes, Triton interpreter) goes end to end
    and writes rows under their own header (never into the suite's results.csv)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.csv"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), "--dry-run", "--csv", str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and "frac_copy" in rows[0] and all(r["median_ms"] for r in rows)
    assert done.stdout.rstrip().endswith("|"), "the markdown table must be printed last"


def test_gpu_tolerance_dry_run_compares_the_default_with_plain_steps(tmp_path):
    """benchmarks/gpu_tolerance.py end to end on the interpreter: every method solved to the tolerance, timed,
    one CSV row each as it was measured, and the table (with the plain / default ratio) printed last."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tol.csv"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_tolerance.py"), "--dry-run", "--csv", str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["default (anderson)", "plain steps", "default, warm start"]
    assert all(r["converged"] == "True" and float(r["median_s"]) > 0 for r in rows)
    iterations = {r["method"]: int(r["iterations"]) for r in rows}
    assert iterations["default, warm start"] < iterations["plain steps"]
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("| 48 | 10 | float32 | 0.05 |") and last.count("x |") == 1


def _sm90_compile(*args: str):
    """``benchmarks/sm90_compile.py`` run as CI would, or a skip where the Triton wheel cannot compile offline."""
    import os
    import subprocess

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel carries no NVIDIA toolchain (ptxas, cuobjdump)")
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(root / "benchmarks" / "sm90_compile.py"), *args],
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, capture_output=True, text=True,
        timeout=600, cwd=root,
    )  # fmt: skip


def test_kernels_compile_for_sm90_without_spilling_iteration_kernels():
    """What the interpreter cannot check: every kernel compiles for an H100 (sm_90, offline, with the ptxas in the
    Triton wheel), no kernel uses atomics, no kernel that runs every iteration spills registers (D = 136 and 200
    included: fp32 rows aligned only through the kernels' hint), and no features kernel needs more shared memory
    than the launch heuristic counts on."""
    done = _sm90_compile("--check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count("| dense_") >= 24 and done.stdout.count("| features_") >= 45, done.stdout[-2000:]
    assert "D=200" in done.stdout and "D=136" in done.stdout


def test_features_launches_fit_a_99_kb_gpu():
    """On an A10 / RTX 30xx (sm_86: 99 KB of shared memory per program) the D = 256 launches, 128-208 KB as tuned for
    an H100, shrink until they fit: compiled offline for sm_86, each needs at most 99 KB."""
    done = _sm90_compile("--check", "--arch", "86", "--only", "D=256")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count("| features_") == 16 and "target sm_86" in done.stdout, done.stdout[-2000:]


def test_acceleration_sweep_counts_against_plain_steps():
    """The sweep behind the README's "never more iterations than plain Sinkhorn": both families build, solve and
    land in the summary table, one row per family and method."""
    from benchmarks import acceleration_sweep as sweep

    rows = []
    for desc, scores, weights in [sweep.cosine_problem(2), sweep.tiny_problem(1000)]:
        assert scores.shape == (desc["n"], desc["k"])
        rows += [sweep.solve(scores, weights, desc, m, "torch", max_iter=3000) for m in ("auto", "none")]
    assert all(r["converged"] for r in rows), rows
    table = sweep.summary(rows)
    assert "| cosine | auto | 1 |" in table and "| tiny | auto | 1 |" in table and "| all | auto | 2 | 0 |" in table


def test_acceleration_sweep_counts_infeasible_masks_apart():
    """13 of the sweep's problems have masks that admit no balanced plan. Since otlabel refuses those before any
    iteration (a ValueError), ``python -m benchmarks.acceleration_sweep`` stopped at the first of them; now the rows
    say so and the summary leaves them out of the ratios, naming them."""
    from benchmarks import acceleration_sweep as sweep

    rows = []
    for desc, scores, weights in [sweep.tiny_problem(1000), sweep.tiny_problem(1007)]:  # feasible, then not
        for path in ("torch", "stream"):
            rows += [sweep.solve(scores, weights, desc, m, path, max_iter=3000) for m in ("auto", "none")]
    assert [r["infeasible"] for r in rows] == [False] * 4 + [True] * 4, rows
    table = sweep.summary([r for r in rows if r["path"] == "torch"])
    assert "| all | auto | 1 | 0 |" in table and "not counted above): 1 problems (1007)" in table, table


def test_regression_sweep_writes_rows_and_compares_two_runs(tmp_path):
    """The sweep that holds a changed default against the one before it: a run writes one row per problem, and a
    comparison of a run with itself reads ratio 1 everywhere. Run as a program (it sets one thread and ignores
    warnings for its own process)."""
    import subprocess

    root = Path(__file__).parents[1]
    out = tmp_path / "rows.jsonl"
    sweep = [sys.executable, "-m", "benchmarks.regression_sweep"]
    done = subprocess.run([*sweep, "--problems", "6", "--out", str(out)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 6 and "6 problems" in done.stdout
    compared = subprocess.run([*sweep, "--compare", str(out), str(out)], cwd=root, capture_output=True, text=True)
    assert compared.returncode == 0, compared.stderr
    assert "| all |" in compared.stdout and "| 1.000 / 1.000 | 1.00 / 1.000 | 0 / 0 |" in compared.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")))
def test_every_benchmark_script_compiles(script):
    """Scripts that only run on a GPU machine are not imported here otherwise: at least they must compile (a
    ``global`` declared after its name's first use once stopped stream_features.py on the lent H100)."""
    source = Path(__file__).parents[1] / "benchmarks" / script
    compile(source.read_text(), str(source), "exec")


def test_stream_exp_benchmark_runs_and_restores_exp(capsys):
    """The exp2-vs-exp script on a tiny problem: it compares labels itself, and leaves otlabel's exp_ in place."""
    import otlabel.backends.torch_backend as torch_backend
    import otlabel.streaming as streaming
    from benchmarks import stream_exp

    fast = torch_backend.exp_
    stream_exp.main(["--n", "3000", "--k", "20"])
    assert torch_backend.exp_ is fast and streaming.exp_ is fast
    assert "labels equal" in capsys.readouterr().out


def test_cpu_readout_benchmark_runs_and_restores_the_read_out(capsys):
    """The compiled-vs-torch read-out script on a tiny problem: it compares codes itself (and against the SwAV loop),
    and leaves the compiled read-out in place."""
    from benchmarks import cpu_readout
    from otlabel.backends.torch_backend import LogDomainOperator

    compiled = LogDomainOperator.assign
    cpu_readout.main(["--repeats", "1", "--sizes", "300x8"])
    assert LogDomainOperator.assign is compiled
    out = capsys.readouterr().out
    assert "| 300 x 8 | 0.05 |" in out and "read-outs agree" in out, out


def test_small_calls_side_by_side_fails_on_a_baseline_that_computes_otherwise(tmp_path, capsys):
    """benchmarks/small_calls.py with --baseline: this tree's own package passes (labels and codes bitwise equal,
    ratios to the SwAV loop and to the baseline printed last); a copy whose default tolerance differs fails."""
    import shutil

    from benchmarks import small_calls

    root = Path(__file__).resolve().parents[1]
    same, other = tmp_path / "same", tmp_path / "other"
    for copy in (same, other):
        shutil.copytree(root / "otlabel", copy / "otlabel", ignore=shutil.ignore_patterns("__pycache__"))
    solver = other / "otlabel" / "solver.py"
    solver.write_text(solver.read_text().replace("DEFAULT_TOL = 1e-4", "DEFAULT_TOL = 1e-2"))
    args = ["--sizes", "20x5", "--seconds", "0.01"]
    small_calls.main([*args, "--baseline", str(same)])
    out = capsys.readouterr().out
    assert "| 20 x 5 | 3 it | 3 |" in out and "bitwise equal to the baseline's in every row" in out, out
    with pytest.raises(SystemExit, match="1"):
        small_calls.main([*args, "--baseline", str(other)])
    assert "differ from the baseline's: 20x5 tol 1e-4" in capsys.readouterr().err


def test_small_calls_reports_changes_when_told_to_and_times_pot_beside(tmp_path, capsys):
    """benchmarks/small_calls.py --expect-changes: a baseline whose outputs differ is reported (labels that differ, the
    codes' largest difference), not a failure; --pot times POT's ot.sinkhorn to 1e-4 in the tol mode's rounds."""
    import shutil

    from benchmarks import small_calls

    pytest.importorskip("ot")
    other = tmp_path / "other"
    shutil.copytree(Path(__file__).resolve().parents[1] / "otlabel", other / "otlabel",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    solver = other / "otlabel" / "solver.py"
    solver.write_text(solver.read_text().replace("DEFAULT_TOL = 1e-4", "DEFAULT_TOL = 1e-2"))
    small_calls.main(["--sizes", "20x5", "--seconds", "0.01", "--baseline", str(other), "--expect-changes", "--pot"])
    out = capsys.readouterr().out
    assert "outputs that differ from the baseline's:\n20x5 tol 1e-4: " in out and "labels differ, codes up to" in out
    assert "otlabel / POT: min, median |" in out and "| 20 x 5 | 3 it | 3 |" in out, out
    tol_row = next(line for line in out.splitlines() if line.startswith("| 20 x 5 | tol 1e-4 |"))
    assert tol_row.count("|") == 12 and " - |" not in tol_row, tol_row  # POT's time and ratio filled in


def test_cpu_loops_side_by_side_fails_on_a_baseline_that_computes_otherwise(tmp_path, capsys):
    """benchmarks/cpu_loops.py with --baseline: the same module passes (every output bitwise equal, ratios printed
    last); a copy whose exponential floor differs (-80 instead of -87 nats) fails."""
    from otlabel.backends import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("numba is not installed")
    from benchmarks import cpu_loops

    source = Path(cpu_kernels.__file__).read_text()
    same, other = tmp_path / "same.py", tmp_path / "other.py"
    same.write_text(source)
    other.write_text(source.replace("_EXP_FLOOR = np.float32(-87.0)", "_EXP_FLOOR = np.float32(-80.0)"))
    assert other.read_text() != source
    assert cpu_loops.main(["--sizes", "40x10", "--repeats", "1", "--baseline", str(same)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("x |")
    scores_far_apart = ["--sizes", "40x10", "--repeats", "1", "--baseline", str(other)]  # randn * 20: spans > 80 nats
    assert cpu_loops.main(scores_far_apart) == 1
    assert "outputs differ from the baseline's: 40x10 kernel build" in capsys.readouterr().err

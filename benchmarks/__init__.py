"""otlabel's benchmark suite: ``python -m benchmarks [--quick] [--scenario NAME ...]``.

One module per scenario (``cpu_dense``, ``per_iteration``, ``tolerance``, ``quality``, ``memory``), each with
``NAME``, ``TITLE``, ``run(ctx) -> rows``, ``report(rows, ctx) -> markdown`` and ``plot(rows, ctx) -> paths``;
every compared method is set up once, in :mod:`benchmarks.methods`; timing, CSV, markdown and plots live in
:mod:`benchmarks.harness`. Results: rows appended to ``results.csv``, a section per scenario in
``RESULTS_CPU.md`` (``RESULTS_GPU.md`` on CUDA), plots under ``plots/``.
"""

SCENARIOS = ("cpu_dense", "per_iteration", "tolerance", "quality", "memory")

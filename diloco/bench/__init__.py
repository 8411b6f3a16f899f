"""Benchmarks: ``diloco bench optim`` (does SNOO / EMA-Nesterov / DiLoCo beat tuned AdamW/Muon?).

:mod:`diloco.bench.plan` says what runs (methods, sizes, grids, each run's config);
:mod:`diloco.bench.optim` tunes and measures them (the protocol) and is the command;
:mod:`diloco.bench.runner` runs (several at once) and caches the trainings;
:mod:`diloco.bench.compute_factor` holds the compute-factor arithmetic;
:mod:`diloco.bench.report` writes the tables and the plot.
"""

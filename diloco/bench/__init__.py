"""Benchmarks: ``diloco bench optim`` (does SNOO / EMA-Nesterov / DiLoCo beat tuned AdamW/Muon?).

:mod:`diloco.bench.compute_factor` holds the pure compute-factor arithmetic;
:mod:`diloco.bench.optim` plans the benchmark and runs its protocol;
:mod:`diloco.bench.runner` runs (several at once) and caches the trainings;
:mod:`diloco.bench.report` writes its tables and plot.
"""

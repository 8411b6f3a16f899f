"""Benchmarks: ``diloco bench optim`` (does SNOO / EMA-Nesterov / DiLoCo beat tuned AdamW/Muon?).

:mod:`diloco.bench.compute_factor` holds the pure compute-factor arithmetic;
:mod:`diloco.bench.optim` plans, runs (with a per-run cache) and reports the benchmark.
"""

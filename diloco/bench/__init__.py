"""Benchmarks, all in this package.

``diloco bench optim`` (does SNOO / EMA-Nesterov / DiLoCo beat tuned AdamW/Muon?):
:mod:`diloco.bench.plan` says what runs (methods, sizes, grids, each run's config);
:mod:`diloco.bench.optim` tunes and measures them (the protocol) and is the command;
:mod:`diloco.bench.runner` runs (several at once) and caches the trainings;
:mod:`diloco.bench.spec` is what one run is (its config, cache key and label);
:mod:`diloco.bench.compute_factor` holds the compute-factor arithmetic;
:mod:`diloco.bench.report` writes the tables and the plot.

Scripts, run as modules (``python -m diloco.bench.<name> --help``):
:mod:`diloco.bench.distributed` (outer vs inner step, bytes, memory per G × S layout),
:mod:`diloco.bench.slow_link` (data parallel vs DiLoCo vs streaming over an emulated slow link,
with :mod:`diloco.bench.link`), :mod:`diloco.bench.ray_overhead` (``diloco launch ray``
against torchrun) and :mod:`diloco.bench.gpu_check` (GPT-2 124M on one CUDA GPU: AdamW vs
SNOO, compile off and on; docs/gpu.md).
"""

"""The algorithm layer: DiLoCo / SNOO / EMA-Nesterov in any training loop.

:mod:`~diloco.algorithm.outer` (outer optimisers), :mod:`~diloco.algorithm.wrapper` (the
:class:`DiLoCo` wrapper), :mod:`~diloco.algorithm.streaming` with
:mod:`~diloco.algorithm.fragments` (Streaming DiLoCo), and :mod:`~diloco.algorithm.reducer`, the
seam to the network (how Δ is averaged across groups; the implementations are in
:mod:`diloco.comm`). Nothing here imports :mod:`diloco.comm`, the training job, checkpoints or
launchers.
"""

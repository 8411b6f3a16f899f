"""The training job behind ``diloco train``: :mod:`~diloco.job.train` (the loop), its data
(:mod:`~diloco.job.data`), inner optimisers (:mod:`~diloco.job.inner`), outputs
(:mod:`~diloco.job.metrics`, :mod:`~diloco.job.progress`), inner engines
(:mod:`~diloco.job.engines`) and the one observer seam (:mod:`~diloco.job.events`)."""

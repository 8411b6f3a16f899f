"""Session-wide test settings.

Every test computes with one intra-op thread, in-process and in the subprocesses it launches
(which set OMP_NUM_THREADS=1 themselves): float reductions then run in the same order in both, so
a resumed or relaunched run can be compared bit for bit with an in-process reference.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

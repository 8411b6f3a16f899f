"""Communication: where this process sits (:mod:`~diloco.comm.topology`), the pseudo-gradient
average over the (G, S) device mesh (:mod:`~diloco.comm.mesh`) and its compression
(:mod:`~diloco.comm.compress`). Implements :mod:`diloco.algorithm.reducer`'s protocols."""

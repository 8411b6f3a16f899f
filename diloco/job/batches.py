"""This rank's batches, prepared one step ahead on a background thread.

Each step the main thread takes the batch drawn during the previous step and hands the next
draw (windows of the group's :class:`~diloco.job.data.BatchStream`, this shard's rows, and on
CUDA a copy into pinned host memory) to a worker thread, so the step's forward and backward
overlap it; the batch goes to the device with a non-blocking copy (pinned memory makes it
asynchronous on CUDA). The data are the same as drawing in line, batch for batch.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from diloco.job.data import BatchStream, shard_batch

__all__ = ["Prefetcher"]


class Prefetcher:
    """``next()`` gives this shard's rows of the group's next batch on ``device``.

    Checkpoints see the position of the batches handed out: :meth:`state_dict` is the
    stream's state before the batch drawn ahead; :meth:`load_state_dict` drops that batch and
    continues from the given state (as ``BatchStream``'s own methods would).
    """

    def __init__(self, stream: BatchStream, shard: int, shards: int, device: torch.device):
        self.stream, self.shard, self.shards, self.device = stream, shard, shards, device
        self._pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-batches")
        self._ahead: Future | None = None
        self._position: dict[str, Any] | None = None  # the stream's state before _ahead

    def _draw(self) -> tuple[Tensor, Tensor]:
        x, y = shard_batch(*self.stream.next(), self.shard, self.shards)
        return (x.pin_memory(), y.pin_memory()) if self._pin else (x, y)

    def next(self) -> tuple[Tensor, Tensor]:
        """x, y int64 [B/S, T] on the device (this shard's rows of the next group batch)."""
        ahead = self._ahead if self._ahead is not None else self._pool.submit(self._draw)
        x, y = ahead.result()
        self._position = self.stream.state_dict()
        self._ahead = self._pool.submit(self._draw)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        if self._position is None:
            return self.stream.state_dict()
        return self._position

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_ahead()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Finish the draw in flight and stop the thread."""
        self._drop_ahead()
        self._pool.shutdown(wait=True)

    def _drop_ahead(self) -> None:
        """Wait for the batch drawn ahead and forget it (an error drawing it is moot)."""
        if self._ahead is not None:
            self._ahead.exception()
        self._ahead, self._position = None, None

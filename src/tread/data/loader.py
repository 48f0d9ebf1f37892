"""BatchStream: a deterministic, resumable, rank-aware infinite batch iterator, and Prefetcher,
which prepares its next batches on a background thread while the current step runs."""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from tread.data.arrays import ImageArrays
from tread.errors import CheckpointError, ConfigError
from tread.seeding import derive_seed

__all__ = ["BatchStream", "Prefetcher", "derive_seed"]


class BatchStream:
    """Endless (images, labels) batches for one rank of a data-parallel run.

    Order: epoch ``e`` visits the dataset in the permutation drawn from a generator seeded by
    ``derive_seed(seed, "perm", e)``. Each step takes the next ``world_size * batch_size``
    indices of it (the global batch) and rank ``r`` keeps slice ``[r*b, (r+1)*b)``, so the
    concatenation over ranks equals the batch a single rank with ``batch_size * world_size``
    would see. Horizontal flips are drawn for the whole global batch from
    ``derive_seed(seed, "hflip", step)``, which makes them independent of the rank layout too.

    At an epoch's end: with ``drop_last`` the leftover ``N mod G`` indices are skipped; without
    it the batch is completed from the start of the next epoch's permutation, so every batch
    is full (no shape changes for compiled models) and no sample is skipped.

    Args:
        data: the dataset; numpy-backed (memory-mapped) latents are read lazily per batch.
        batch_size: samples per rank per step.
        seed: base seed of the stream.
        rank: this process's rank in [0, world_size).
        world_size: number of data-parallel ranks.
        hflip: flip each sample horizontally with probability 1/2.
        drop_last: skip each epoch's incomplete final global batch.
    """

    def __init__(
        self,
        data: ImageArrays,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        hflip: bool = False,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"BatchStream: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"BatchStream: need 0 <= rank < world_size, got {rank}/{world_size}")
        global_batch = batch_size * world_size
        if drop_last and len(data) < global_batch:
            raise ConfigError(
                f"BatchStream: {data.name} has {len(data)} samples, fewer than one global batch "
                f"of {global_batch} with drop_last=True"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.hflip = hflip
        self.drop_last = drop_last
        self._epoch = 0
        self._index = 0  # position of the next unread index in this epoch's permutation
        self._step = 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch the next batch starts in."""
        return self._epoch

    @property
    def step(self) -> int:
        """Number of batches produced so far."""
        return self._step

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "perm", epoch))
            self._perm = torch.randperm(len(self.data), generator=gen)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def _normalise(self) -> None:
        """Move to the next epoch when the current one cannot supply another batch."""
        remaining = len(self.data) - self._index
        if remaining == 0 or (self.drop_last and remaining < self.global_batch_size):
            self._epoch += 1
            self._index = 0

    def _next_global_indices(self) -> torch.Tensor:
        """Consume and return the next (G,) global batch of dataset indices."""
        parts, need = [], self.global_batch_size
        while need:
            self._normalise()
            chunk = self._permutation(self._epoch)[self._index : self._index + need]
            parts.append(chunk)
            self._index += len(chunk)
            need -= len(chunk)
        self._normalise()
        return torch.cat(parts)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's next batch.

        Returns:
            images (b, C, H, W) float32 and labels (b,) int64, b = ``batch_size``.
        """
        global_idx = self._next_global_indices()  # (G,)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        images, labels = self.data.take(global_idx[mine])
        if self.hflip:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "hflip", self._step))
            # Draw for the whole global batch, then slice, so flips do not depend on the layout.
            flip = (torch.rand(self.global_batch_size, generator=gen) < 0.5)[mine]
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        self._step += 1
        return images, labels

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream plus the settings a resume must match (plain ints/bools)."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.data),
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`, possibly saved under another rank layout.

        Args:
            state: a dict from :meth:`state_dict`. The seed, global batch size, dataset size and
                ``drop_last`` must match this stream, else the order would silently change.
        """
        expected = {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.data),
            "drop_last": self.drop_last,
        }
        for key, value in expected.items():
            if key not in state:
                raise CheckpointError(f"BatchStream state: missing key {key!r}")
            if state[key] != value:
                raise CheckpointError(
                    f"BatchStream state: {key}={state[key]!r} != this stream's {value!r}"
                )
        for key in ("epoch", "index", "step"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise CheckpointError(f"BatchStream state: {key} must be an int >= 0")
        if state["index"] > len(self.data):
            raise CheckpointError(f"BatchStream state: index {state['index']} > {len(self.data)}")
        self._epoch, self._index, self._step = state["epoch"], state["index"], state["step"]
        self._normalise()


class Prefetcher:
    """Batches of a :class:`BatchStream` read ahead on a background thread, moved to ``device``.

    The thread takes batches from the stream (disk reads, flips) while the training step runs;
    on CUDA it pins them so the copy to the GPU is asynchronous. :meth:`state_dict` is the
    stream's position after the batches *returned* so far, not after those read ahead, so a
    checkpoint resumes at the first batch that was not trained on.

    Args:
        stream: the stream to read; only the background thread touches it from now on.
        device: where :meth:`__next__` puts the batches.
        depth: batches read ahead.
    """

    def __init__(self, stream: BatchStream, device: torch.device, depth: int = 2) -> None:
        self.stream = stream
        self.device = device
        self._state = stream.state_dict()  # position after the batches consumed so far
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="tread-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        pin = self.device.type == "cuda"
        while not self._stop.is_set():
            try:
                images, labels = next(self.stream)
                if pin:
                    images, labels = images.pin_memory(), labels.pin_memory()
                item: Any = (images, labels, self.stream.state_dict())
            except BaseException as err:  # re-raised in the consumer, which can report it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (images (b, C, H, W), labels (b,)) batch on ``device``."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        images, labels, self._state = item
        return (
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
        )

    def state_dict(self) -> dict[str, Any]:
        """The stream's :meth:`BatchStream.state_dict` after the batches returned so far."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the thread (batches read ahead are dropped; the stream is then past them)."""
        self._stop.set()
        self._thread.join(timeout=5)

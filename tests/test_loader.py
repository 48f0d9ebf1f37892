"""Prefetcher: batches read ahead on a thread, identical to the stream's, resumable exactly."""

from __future__ import annotations

import time

import pytest
import torch

from tread.data import BatchStream, ImageArrays
from tread.data.loader import Prefetcher
from tread.errors import DataError


def tiny_data(n: int = 10) -> ImageArrays:
    images = torch.linspace(-1, 1, n * 16).reshape(n, 1, 4, 4)
    return ImageArrays(images=images, labels=torch.arange(n) % 3, num_classes=3, name="tiny")


def stream(data: ImageArrays) -> BatchStream:
    return BatchStream(data, batch_size=3, seed=1, hflip=True, drop_last=False)


def test_prefetched_batches_equal_the_stream_and_state_counts_consumed_batches():
    data = tiny_data()
    reference = stream(data)
    expected = [next(reference) for _ in range(7)]
    ahead = Prefetcher(stream(data), torch.device("cpu"), depth=3)
    try:
        for k in range(4):
            images, labels = next(ahead)
            assert torch.equal(images, expected[k][0]) and torch.equal(labels, expected[k][1])
        deadline = time.monotonic() + 5
        while ahead.stream.step < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The thread has read ahead (3 queued, 1 waiting); the position is still "after 4".
        assert ahead.stream.step >= 7
        position = ahead.state_dict()
        assert position["step"] == 4
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()
    resumed = stream(data)
    resumed.load_state_dict(position)
    for k in range(4, 7):
        images, labels = next(resumed)
        assert torch.equal(images, expected[k][0]) and torch.equal(labels, expected[k][1])


def test_a_data_error_in_the_thread_reaches_the_consumer():
    data = tiny_data()
    calls = []
    real_take = data.take

    def failing_take(indices):
        calls.append(1)
        if len(calls) == 3:
            raise DataError("tiny: sample 7 is unreadable")
        return real_take(indices)

    object.__setattr__(data, "take", failing_take)
    ahead = Prefetcher(stream(data), torch.device("cpu"))
    try:
        next(ahead), next(ahead)
        with pytest.raises(DataError, match="sample 7"):
            next(ahead)
    finally:
        ahead.close()
    assert ahead.state_dict()["step"] == 2

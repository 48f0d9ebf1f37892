"""Metrics sinks: JSONL always (rank 0), TensorBoard optionally."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class MetricsLog:
    """Append rows to ``metrics.jsonl``; mirror scalars to TensorBoard when enabled.

    On resume, rows past the resumed step (written by the interrupted run after its last
    checkpoint) are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        writer_class = _summary_writer() if tensorboard else None  # may refuse: before writing
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _row_step(line) is not None and _row_step(line) <= resume_step
            ]
            # Replace, not rewrite in place: a kill mid-write must not lose the kept rows.
            tmp = self.path.with_name(f".metrics.jsonl.{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in a directory without checkpoints
        self._file = self.path.open("a", buffering=1)
        self._writer = writer_class(str(run_dir / "tensorboard")) if writer_class else None

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install 'tread[tensorboard]'"
        ) from None
    return SummaryWriter


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None

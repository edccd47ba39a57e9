"""A run's metrics: JSON lines in ``<workdir>/metrics.jsonl`` and TensorBoard events in ``<workdir>/tb``.

TensorBoard files are written by tensorboardX (no TensorFlow). A resumed run passes the step it
resumes from: JSON lines of later steps (written by a run that died after its last checkpoint)
are dropped, and TensorBoard is told to purge its events after that step, so neither holds a step
twice.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


class MetricWriter:
    """Scalars to JSON lines and TensorBoard, images to TensorBoard.

    Only process 0 should write; other processes pass ``enabled=False`` (every method is then a
    no-op). ``resume_step``: the step the run continues from (None for a fresh run).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        # tensorboardX names files by second and host: a suffix keeps two writers of one second apart.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._tensorboard = SummaryWriter(str(self.workdir / "tb"), purge_step=resume_step, filename_suffix=suffix)

    def _truncate_after(self, step: int) -> None:
        """Drop JSON lines of steps after ``step``, and a last line cut short by a crash."""
        if not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.jsonl_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.jsonl_path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for tag, value in values.items():
            self._tensorboard.add_scalar(tag, value, int(step))
        self._tensorboard.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images [H, W, 3] uint8 (or float in [0, 1]) to TensorBoard under their tags."""
        if not self.enabled:
            return
        for tag, image in images.items():
            self._tensorboard.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

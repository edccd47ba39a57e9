"""A training workdir belongs to one run: its lock and its ``config.json``.

- `WorkdirLock`: one training run per workdir at a time. An advisory ``flock`` on
  ``<workdir>/.lock``, which the kernel releases when the process ends however it ends, so a
  crashed or killed run never leaves the workdir stuck.
- `record_config`: the first run writes ``config.json`` (the config and the model's fields, which
  `checkpointing.restore_model` reads); a later run on the same workdir must be compatible with
  it (`configuration.differences`) and never rewrites it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
from typing import Any

import ml_collections

from enlca_jax import checkpointing, configuration, models

log = logging.getLogger("enlca_jax.train")

CONFIG_JSON = "config.json"
LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another training run holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process, or raises WorkdirBusyError."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by another training run (pid {holder}); wait for it to end or "
                "choose another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, params: Any) -> None:
    """Write ``<workdir>/config.json`` for a new run, or check a resumed run against it.

    Raises ValueError naming the fields that a resumed run may not change (the model, its dtype,
    the training data and batch, the seed). Changes to the others (steps, schedule, logging) are
    logged and allowed; the file keeps the first run's record.
    """
    path = workdir / CONFIG_JSON
    if not path.exists():
        record = {**configuration.run_record(config), "parameters": models.count_params(params)}
        checkpointing.write_json_atomic(path, record)
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({error}); it records this workdir's run: restore it or use another "
                         "--workdir.") from None  # fmt: skip
    incompatible, other = configuration.differences(stored, config)
    if incompatible:
        raise ValueError(
            f"{workdir} holds a run with a different config ({path}); resuming it with this one would mix two runs:\n  "
            + "\n  ".join(incompatible)
            + "\nRun with the workdir's settings, or choose another --workdir."
        )
    if other:
        log.warning("resuming %s with changed settings (%s keeps the first run's):\n  %s", workdir, path.name,
                    "\n  ".join(other))  # fmt: skip

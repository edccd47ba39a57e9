"""Several processes (hosts) training one model: start-up, and what processes must agree on.

`initialize` starts ``jax.distributed`` from ``config.distributed``: on Cloud TPU, SLURM, Open MPI
and Kubernetes JAX finds the cluster itself; anywhere else the coordinator address, the number
of processes and this process's id come from the config fields or from the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_IDS``).

The helpers below are collectives over all processes (every process must call them, in the same
order); with one process they return at once. They move small host values: a config digest, a
stop flag, the data iterators' states, a validation score.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

#: ``config.distributed`` fields that each process sets for itself.
PER_PROCESS_FIELDS = ("process_id", "local_device_ids")

NO_CLUSTER_HINT = (
    "no cluster was detected and the launch is incomplete: give every process "
    "--config.distributed.coordinator_address=HOST:PORT (process 0's address, the same everywhere), "
    "--config.distributed.num_processes=N and its own --config.distributed.process_id=I (or set "
    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
)


def launch_arguments(options: ml_collections.ConfigDict) -> dict[str, Any]:
    """``jax.distributed.initialize`` arguments from ``config.distributed`` and the environment;
    what neither gives is left for JAX's cluster detection."""
    arguments: dict[str, Any] = {}
    address = options.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        arguments["coordinator_address"] = address
    for field, variable in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = options[field]
        if value < 0 and os.environ.get(variable, "").strip():
            try:
                value = int(os.environ[variable])
            except ValueError:
                raise ValueError(f"{variable}={os.environ[variable]!r} is not an integer.") from None
        if value >= 0:
            arguments[field] = value
    ids = options.local_device_ids or os.environ.get("JAX_LOCAL_DEVICE_IDS", "")
    if ids:
        try:
            arguments["local_device_ids"] = [int(i) for i in str(ids).split(",")]
        except ValueError:
            raise ValueError(f"local device ids must be comma-separated integers, got {ids!r}.") from None
    return arguments


def initialize(options: ml_collections.ConfigDict) -> None:
    """Start ``jax.distributed`` if ``options.enabled`` (before any other jax call of the run)."""
    if not options.enabled:
        return
    arguments = launch_arguments(options)
    if options.cpu_collectives:
        # CPU devices of several processes talk through this library (ignored on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", options.cpu_collectives)
    try:
        jax.distributed.initialize(**arguments, initialization_timeout=options.initialization_timeout)
    except ValueError as error:
        if "must be defined" in str(error) or "should be defined" in str(error):
            raise ValueError(f"--config.distributed.enabled: {NO_CLUSTER_HINT} (JAX: {error})") from None
        raise


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, in process order. Gathered padded to a power of two (at least
    64 bytes): each gathered shape is a program to compile, and the JSON of a data-iterator state
    changes length from checkpoint to checkpoint."""
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64)).reshape(-1)
    padded = np.zeros(max(64, 1 << (int(lengths.max()) - 1).bit_length()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [bytes(row[:length]) for row, length in zip(gathered, lengths, strict=True)]


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order."""
    if jax.process_count() == 1:
        return [value]
    return [json.loads(data) for data in _allgather_bytes(json.dumps(value, sort_keys=True).encode())]


def check_same_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError if the processes were started with different configs."""
    if jax.process_count() == 1:
        return
    fields = json.loads(config.to_json_best_effort())
    for own in PER_PROCESS_FIELDS:  # these differ between processes by design
        fields["distributed"].pop(own, None)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    digests = gather_json(digest)
    if len(set(digests)) > 1:
        groups = [[i for i, d in enumerate(digests) if d == unique] for unique in dict.fromkeys(digests)]
        raise ValueError(
            f"the processes were started with different configs (processes grouped by config: {groups}); start "
            "every process with the same --config and --config.* flags (only distributed.process_id may differ)."
        )


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (e.g. a SIGTERM that reached one host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def from_process_0(value: float) -> float:
    """Process 0's ``value`` on every process (e.g. the validation PSNR that picks "best")."""
    if jax.process_count() == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float64(value)))

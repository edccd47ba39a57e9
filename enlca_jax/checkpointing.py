"""Model checkpoints on disk: variables through orbax, the architecture as JSON, written atomically.

A model checkpoint directory holds ``model.json`` (the `models.model_from_config` fields) and
``variables/`` (an orbax StandardCheckpointer tree of ``{'params', 'random_features'}``). The
weight converter writes one; `load_model` reads one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

from enlca_jax import models

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    directory: str | os.PathLike, config: dict[str, Any], variables: Any, *, overwrite: bool = False
) -> pathlib.Path:
    """Save a model checkpoint; the directory appears only once it is complete."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--force) to replace it.")
    models.model_from_config(config)  # fails early on a bad config
    staging = pathlib.Path(tempfile.mkdtemp(dir=directory.parent if directory.parent.exists() else None))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / VARIABLES_DIR, jax.device_get(variables))
        write_json_atomic(staging / MODEL_JSON, config)
        if directory.exists():
            shutil.rmtree(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_model(directory: str | os.PathLike, **overrides: Any) -> tuple[models.ENLCN, dict[str, Any]]:
    """Load ``(model, variables)`` from a model checkpoint directory.

    Args:
      directory: made by `save_model` (e.g. by ``python -m enlca_jax.convert``).
      overrides: ENLCN fields to change (e.g. ``attention='nla'``, ``dtype=jnp.bfloat16``).
    """
    directory = pathlib.Path(directory).absolute()
    config_path = directory / MODEL_JSON
    if not config_path.is_file() or not (directory / VARIABLES_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a model checkpoint: expected {MODEL_JSON} and {VARIABLES_DIR}/ in it "
            "(make one with `python -m enlca_jax.convert WEIGHTS --output DIR`)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is corrupt: {error}") from None
    model = models.model_from_config(config, **overrides)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / VARIABLES_DIR)
    return model, variables

"""Checkpoints on disk, both formats and their restore (evaluation reads them without training code).

- A *model checkpoint* directory holds ``model.json`` (the `models.model_from_config` fields) and
  ``variables/`` (an orbax StandardCheckpointer tree of ``{'params', 'random_features'}``). The
  weight converter writes one (`save_model`); `load_model` reads one.
- A *training workdir* holds ``config.json`` and orbax-managed ``checkpoints/`` (latest K) and
  ``best/`` (best K by validation PSNR) of the whole train state and the data-iterator state
  (`TrainCheckpoints`).

`restore_model` reads a model from either. Everything is written atomically: a crash never
leaves a partial checkpoint that a restore would pick up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from enlca_jax import attention, configuration, models

log = logging.getLogger("enlca_jax.checkpointing")

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are mode 0600 whatever the umask; this one gets 0666 minus the umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def _path_name(path: tuple) -> str:
    """``params/head/kernel``: the same for a dataclass field and a dict key (a state saved as a
    TrainState restores as nested dicts without a target)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_digest(state: Any) -> str:
    """SHA-256 over every array of a pytree (its path, dtype, shape and bytes), as hex; leaves in
    the order of their path names, so that a TrainState and its restored dict agree."""
    digest = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_flatten_with_path(state)[0], key=lambda item: _path_name(item[0]))
    for path, leaf in leaves:
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{_path_name(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.view(np.uint8).reshape(-1).data if array.size else b"")
    return digest.hexdigest()


class CorruptCheckpointError(RuntimeError):
    """A checkpoint could not be read back, or its arrays differ from what was saved."""


def _restore_verified(manager: ocp.CheckpointManager, step: int, abstract_state: Any = None) -> tuple[Any, Any]:
    """(state, data) of one step, checked against the digest saved with it.

    Raises CorruptCheckpointError when orbax cannot read it or the digest differs. Checkpoints
    written before digests were saved restore unchecked.
    """
    folder = manager.directory / str(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if (folder / "data").exists():
        items["data"] = ocp.args.JsonRestore()
    if (folder / "checksum").exists():
        items["checksum"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - orbax raises many kinds for a damaged folder
        raise CorruptCheckpointError(f"{folder} cannot be read: {type(error).__name__}: {error}"[:500]) from None
    state = restored["state"]
    if "checksum" in items:
        expected = restored["checksum"].get("sha256")
        if state_digest(state) != expected:
            raise CorruptCheckpointError(f"{folder}: its arrays differ from the ones saved (SHA-256 mismatch).")
    return state, restored.get("data")


class TrainCheckpoints:
    """Latest-K checkpoints in ``<workdir>/checkpoints`` and best-K by validation PSNR in ``<workdir>/best``.

    Each holds ``state`` (the unreplicated TrainState), ``data`` (the grain iterator state, JSON)
    and ``checksum`` (`state_digest` of the state). Saves are asynchronous; orbax writes into a
    temporary folder and renames it when complete, so a crash never leaves a partial checkpoint
    that a restore would pick up. `restore_latest` checks the digest and falls back from a
    damaged checkpoint to the newest good one, logging which it skipped and why.
    """

    def __init__(self, workdir: pathlib.Path, keep_latest: int, keep_best: int):
        # Both managers can save the same step at once (the last step is validated and saved);
        # with several processes their barriers are named by step, so each needs its own prefix.
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_latest, create=True, multiprocessing_options=self._barriers("latest")
            ),
            item_handlers=self._handlers(),
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_best,
                best_fn=self.psnr,
                best_mode="max",
                create=True,
                multiprocessing_options=self._barriers("best"),
            ),
            item_handlers=self._handlers(),
        )

    @staticmethod
    def psnr(metrics: dict) -> float:
        """What ranks the best checkpoints: their validation PSNR."""
        return metrics["psnr"]

    @staticmethod
    def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
        return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"enlca_{name}_")

    @staticmethod
    def _handlers() -> dict[str, Any]:
        json_handler = ocp.JsonCheckpointHandler
        return {"state": ocp.StandardCheckpointHandler(), "data": json_handler(), "checksum": json_handler()}

    @staticmethod
    def _args(state: Any, data_state: dict) -> ocp.args.Composite:
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            checksum=ocp.args.JsonSave({"sha256": state_digest(state)}),
        )

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> None:
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=self._args(state, data_state), force=force)

    def save_best(self, step: int, state: Any, data_state: dict, psnr: float) -> None:
        if math.isfinite(psnr) and step not in self.best.all_steps():
            self.best.save(step, args=self._args(state, data_state), metrics={"psnr": psnr}, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """(state, data state) of the newest checkpoint that reads back intact, or None if there is
        none; damaged newer ones are skipped with a warning. Raises CorruptCheckpointError if
        every checkpoint is damaged (starting over would silently discard the run)."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        for step in steps:
            try:
                return _restore_verified(self.latest, step, abstract_state)
            except CorruptCheckpointError as error:
                log.warning("skipping checkpoint %d: %s", step, error)
        if steps:
            raise CorruptCheckpointError(
                f"none of the checkpoints {sorted(steps)} in {self.latest.directory} reads back intact (see the "
                "warnings above); move the folder away to start over."
            )
        return None

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def check_choice(which: Any, name: str = "checkpoint") -> str:
    """``which`` as the str `restore_model` takes ('latest', 'best' or a step number), or
    ValueError naming ``name`` (e.g. the flag that gave it)."""
    which = str(which)
    if which not in ("latest", "best") and not which.isdigit():
        raise ValueError(f"{name} must be 'best', 'latest' or a step number, got {which!r}.")
    return which


def restore_model(
    workdir: str | os.PathLike, which: str = "latest", **overrides: Any
) -> tuple[models.ENLCN, dict[str, Any], int]:
    """``(model, variables, step)`` from a training workdir: ``which`` is 'latest', 'best' or a step.

    A model checkpoint directory (`save_model`, e.g. made by the weight converter) also works.
    ``overrides`` are model fields to change (`models.model_from_config`), e.g.
    ``conv_general_dilated=enlca_jax.cpu.setup()``.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    which = check_choice(which)
    if (workdir / MODEL_JSON).is_file() and (workdir / VARIABLES_DIR).is_dir():
        model, variables = load_model(workdir, **overrides)
        return model, variables, 0
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{workdir} is neither a training workdir (no config.json) nor a converted model checkpoint "
            "(no model.json)."
        )
    saved = json.loads(config_path.read_text())
    overrides.setdefault("dtype", configuration.compute_dtype(saved.get("dtype", "float32")))
    model = models.model_from_config(saved["model_config"], **overrides)
    folder = workdir / ("best" if which == "best" else "checkpoints")
    # "best" ranks by the PSNR stored with each checkpoint: a manager without best_fn would call
    # the newest one best.
    ranking = {"best_fn": TrainCheckpoints.psnr, "best_mode": "max"} if which == "best" else {}
    options = ocp.CheckpointManagerOptions(read_only=True, **ranking)
    manager = ocp.CheckpointManager(folder, options=options, item_handlers=TrainCheckpoints._handlers())
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {folder}.")
    if which == "latest":
        step = max(steps)
    elif which == "best":
        step = manager.best_step() if manager.best_step() is not None else max(steps)
    else:
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {folder}; available: {sorted(steps)}.")
    try:
        restored, _ = _restore_verified(manager, step)
    finally:
        manager.close()
    variables = {"params": restored["params"]}
    if restored.get("random_features"):
        variables[attention.FEATURE_COLLECTION] = restored["random_features"]
    return model, variables, step

"""Training: ``train_and_evaluate(config, workdir)``, the library behind ``train.py``.

The pure step (`enlca_jax.train_step`) is ``jax.pmap``-ped over the local devices with axis name
``'batch'``. State is replicated for the step and saved unreplicated by orbax
(`checkpointing.TrainCheckpoints`), so a run restores on any device count; checkpoints hold the
whole train state and the data-iterator state, so a resumed run continues with exactly the
losses an uninterrupted run would have produced. Validation (`validation.Validator`) runs on
whole images; SIGTERM/SIGINT (`stop_signals.StopRequest`) end the run with a checkpoint.
Before any work the config's ranges are checked (`configuration.check_config`), the workdir is
locked for this run (`workdir.WorkdirLock`) and a resumed run's config is checked against the
workdir's ``config.json`` (`workdir.record_config`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from enlca_jax import (
    attention,
    checkpointing,
    configuration,
    datasets,
    distributed,
    input_pipeline,
    metric_writers,
    models,
    stop_signals,
    train_step,
    validation,
)
from enlca_jax import (
    workdir as workdirs,
)

log = logging.getLogger("enlca_jax.train")


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the run stopped without saving that state."""


def check_batch_size(batch_size: int) -> int:
    """Per-process batch; the global batch must divide over all devices of all processes."""
    devices, processes, local = jax.device_count(), jax.process_count(), jax.local_device_count()
    where = f"the {devices} devices of all {processes} processes" if processes > 1 else f"the {devices} devices"
    if batch_size % devices or (batch_size // processes) % local:
        raise ValueError(
            f"batch_size {batch_size} does not divide over {where} ({local} on this process); set "
            f"--config.batch_size to a multiple of {devices}."
        )
    return batch_size // processes


#: pmap's axis: the train step averages over it, and the replicated state is placed under it.
AXIS_NAME = "batch"


def replicate(tree: Any) -> Any:
    """``tree`` copied to each of this process's devices (leaves [n_local, ...]), under pmap's axis
    name: pmap's outputs carry it, and inputs placed under another name would make the second step
    trace and compile the train step again. Placed from one host copy: stacking device arrays on
    the device (as ``flax.jax_utils.replicate`` does with them) compiles a stack and a reshard
    program per leaf shape."""
    devices = jax.local_devices()
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS_NAME,)), jax.P(AXIS_NAME))

    def place(x: np.ndarray) -> jax.Array:
        return jax.device_put(np.broadcast_to(x, (len(devices), *np.shape(x))), sharding)

    return jax.tree_util.tree_map(place, jax.device_get(tree))


def host_replica(tree: Any) -> Any:
    """One replica of a pmapped (replicated) pytree as host arrays, from this process's first
    device. Not ``x[0]``: with several processes that is device 0 of process 0, which the other
    processes can only read through a collective that process 0 does not join. The device shards
    ([1, ...]) are copied whole and indexed on the host, so no slice program is compiled per shape."""
    shards = jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, tree)
    return jax.tree_util.tree_map(lambda x: x[0, ...], jax.device_get(shards))  # [0, ...]: 0-d arrays, not scalars


def data_state(data_iter: Any) -> dict:
    """The data iterators' states for a checkpoint: this process's, or all processes' (gathered,
    so that the one checkpoint holds every process's position in the stream)."""
    states = distributed.gather_json(data_iter.get_state())
    return states[0] if len(states) == 1 else {"per_process": states}


def training_source(config: ml_collections.ConfigDict) -> Any:
    """The training split, checked (`input_pipeline.check_source`): a missing scale or too small
    images fail here, before any work."""
    source = datasets.load_split(
        config.data.train, config.data.train_split, configuration.data_dir(config), scale=config.model.scale
    )
    input_pipeline.check_source(source, config.model.scale, config.data.patch_size)
    return source


def training_batches(config: ml_collections.ConfigDict, source: Any, per_process_batch: int, start: int = 0):
    """This process's shard of the training split, from its batch ``start`` on, as a checkpointable
    iterator of uint8 batches."""
    return iter(
        input_pipeline.train_dataset(
            source, scale=config.model.scale, patch_size=config.data.patch_size, batch_size=per_process_batch,
            seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
            augment=config.data.augment, worker_count=config.data.worker_count,
            read_threads=config.data.read_threads, prefetch=config.data.prefetch, check=False, start=start,
        )
    )  # fmt: skip


def resumed_batches(config: ml_collections.ConfigDict, source: Any, per_process_batch: int, saved: dict, step: int):
    """The training iterator of a run resumed at ``step`` from `data_state`'s record ``saved``.

    Written by as many processes as this run has: this process's saved position. Written by
    another number of processes (a job moved to more or fewer hosts): this process's share of the
    same global stream from batch ``step`` on, which holds the global batches the first run would
    have seen next, so the run continues as if it had not moved.
    """
    states = saved["per_process"] if "per_process" in saved else [saved]
    if len(states) != jax.process_count():
        log.info("the checkpoint was written by %d process(es), this run has %d: continuing the global data "
                 "stream at batch %d", len(states), jax.process_count(), step)  # fmt: skip
        return training_batches(config, source, per_process_batch, start=step)
    data_iter = training_batches(config, source, per_process_batch)
    data_iter.set_state(states[jax.process_index()])
    return data_iter


def parallel_steps(config: ml_collections.ConfigDict, model: models.ENLCN, tx: Any) -> tuple[dict, Callable]:
    """({with_contrastive: pmapped step (state donated)}, pmapped redraw of the random features)."""
    schedule = train_step.learning_rate_schedule(config)
    steps = {
        flag: jax.pmap(
            functools.partial(
                train_step.train_step, model=model, tx=tx, schedule=schedule,
                contrastive_weight=config.contrastive.weight, with_contrastive=flag, axis_name=AXIS_NAME,
            ),
            axis_name=AXIS_NAME,
            donate_argnums=(0,),
        )
        for flag in (False, True)
    }  # fmt: skip
    interval, kind = config.redraw_interval, config.model.feature_type
    redraw = jax.pmap(
        lambda s: s.replace(random_features=train_step.features_at(s.random_features, s.key, s.step, interval, kind)),
        axis_name=AXIS_NAME,
    )
    return steps, redraw


def check_finite(metrics: dict[str, Any], step: int, workdir: pathlib.Path) -> None:
    bad = {key: float(value) for key, value in metrics.items() if not np.isfinite(value)}
    if bad:
        raise NonFiniteError(
            f"non-finite {bad} at step {step}; stopping without saving this state. The last good checkpoint is "
            f"in {workdir / 'checkpoints'}; lower the learning rate or enable config.grad_clip_norm."
        )


def variables_of(state: train_step.TrainState) -> dict[str, Any]:
    """Model variables of a host-side train state."""
    if not state.random_features:
        return {"params": state.params}
    return {"params": state.params, attention.FEATURE_COLLECTION: state.random_features}


class _Progress:
    """Steps/s, the log line or tqdm bar (process 0), and the metric rows every ``log_every`` steps."""

    def __init__(self, config: ml_collections.ConfigDict, writer: metric_writers.MetricWriter, step: int):
        self.config, self.writer, self.is_main = config, writer, jax.process_index() == 0
        self.bar = None
        if config.progress_bar and sys.stderr.isatty() and self.is_main:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=config.num_train_steps, initial=step, unit="step", dynamic_ncols=True)
        self.timer, self.timer_step = time.time(), step

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        total = self.config.num_train_steps
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if step % self.config.log_every and step != total:
            return
        rate = (step - self.timer_step) / max(time.time() - self.timer, 1e-9)
        self.writer.write_scalars(step, {**metrics, "steps_per_second": rate})
        if self.bar is None and self.is_main:
            eta = time.strftime("%H:%M:%S", time.gmtime((total - step) / max(rate, 1e-9)))
            log.info("step %d/%d loss %.5f l1 %.5f contrastive %.4f %.2f it/s ETA %s", step, total, metrics["loss"],
                     metrics["l1"], metrics["contrastive"], rate, eta)  # fmt: skip
        self.timer, self.timer_step = time.time(), step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    conv_general_dilated: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train (resuming from ``workdir`` if it has checkpoints), validate, checkpoint.

    Args:
      config: a training config (``configs/default.py`` lists its fields).
      workdir: where checkpoints, metrics and samples go; a second run resumes from it.
      conv_general_dilated: how the model's convolutions run (`enlca_jax.cpu.setup` returns the
        XLA:CPU one); None for ``jax.lax.conv_general_dilated``. The parameters are the same.

    Returns:
      The last validation metrics (``psnr``, ``ssim``, ``bicubic_psnr``, ``bicubic_ssim`` and the
      ``eval_step`` they are from; none if no validation ran), the ``step`` reached and
      ``stopped_by``: the signal's name if SIGTERM/SIGINT ended the run early, else None.

    Raises:
      ValueError: the config is invalid or incompatible with the workdir's run (before any work).
      workdir.WorkdirBusyError: another run is training in this workdir.
      checkpointing.CorruptCheckpointError: every checkpoint of the workdir is damaged.
      NonFiniteError: the loss or gradients became NaN/inf (the last good checkpoint is kept).
    """
    configuration.check_config(config)
    distributed.initialize(config.distributed)
    distributed.check_same_config(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the workdir {workdir}: {error.strerror}; choose another --workdir.") from None
    logging.getLogger("absl").setLevel(logging.WARNING)
    is_main = jax.process_index() == 0
    per_process_batch = check_batch_size(config.batch_size)
    with workdirs.WorkdirLock(workdir) if is_main else contextlib.nullcontext():
        return _train(config, workdir, per_process_batch, conv_general_dilated)


def _train(config, workdir, per_process_batch, conv_general_dilated) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    model = configuration.build_model(config, conv_general_dilated=conv_general_dilated)
    tx = train_step.create_optimizer(config)
    initialise = train_step.state_initializer(config, model, tx)
    abstract_state = initialise.eval_shape()
    if is_main:
        workdirs.record_config(workdir, config, abstract_state.params)
    source = training_source(config)
    # Read (and score bicubic on) the validation split now: a misspelt or unprepared set fails
    # here, not after the first eval_every steps. Process 0 validates for all.
    validator = validation.Validator(config, model.scale, workdir) if is_main else None
    checkpoints = checkpointing.TrainCheckpoints(workdir, config.keep_latest, config.keep_best)
    # Restored into the abstract state: a resumed run does not compile the initialisation.
    restored = checkpoints.restore_latest(abstract_state)
    if restored is None:
        state = initialise()
        data_iter = training_batches(config, source, per_process_batch)
    else:
        state, saved_data = restored
        data_iter = resumed_batches(config, source, per_process_batch, saved_data, int(state.step))
        log.info("resumed from step %d in %s", int(state.step), workdir)
    step = int(state.step)
    writer = metric_writers.MetricWriter(workdir, enabled=is_main, resume_step=step if restored else None)
    steps, redraw = parallel_steps(config, model, tx)
    replicated = replicate(state)
    with_attention = bool(state.random_features)
    progress = _Progress(config, writer, step)
    last_eval: dict[str, Any] = {}
    stopped_by = None

    snapshot: tuple[int, train_step.TrainState, dict] | None = None

    def saved_at(step: int) -> tuple[train_step.TrainState, dict]:
        """The host state and data positions at ``step``, fetched once however many saves use them
        (each fetch copies the whole state to the host and, with several processes, gathers)."""
        nonlocal snapshot
        if snapshot is None or snapshot[0] != step:
            snapshot = (step, host_replica(replicated), data_state(data_iter))
        return snapshot[1], snapshot[2]

    try:
        with stop_signals.StopRequest() as stop:
            stopping = False
            while step < config.num_train_steps:
                # A signal on any process stops all of them at the same step boundary.
                stopping = distributed.any_process(stop.requested)
                if stopping:
                    break
                if with_attention and step > 0 and step % config.redraw_interval == 0:
                    replicated = redraw(replicated)
                batch = jax.tree_util.tree_map(
                    lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]), next(data_iter)
                )
                replicated, metrics = steps[with_attention and step >= config.contrastive.start_step](replicated, batch)
                metrics = host_replica(metrics)
                check_finite(metrics, step, workdir)
                step += 1
                progress.update(step, metrics)
                if step % config.checkpoint_every == 0:
                    checkpoints.save(step, *saved_at(step))
                if step % config.eval_every == 0 or step == config.num_train_steps:
                    host, positions = saved_at(step)
                    if validator is not None:
                        last_eval, samples = validator(model, variables_of(host), step)
                        writer.write_scalars(step, {f"val_{k}": v for k, v in last_eval.items()})
                        writer.write_images(step, {f"samples/{name}": image for name, image in samples.items()})
                        log.info("validation step %d: PSNR %.3f dB SSIM %.4f (bicubic %.3f dB %.4f)", step,
                                 *(last_eval[k] for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")))  # fmt: skip
                    # Every process takes part in the save; process 0's score decides "best".
                    last_eval["psnr"] = distributed.from_process_0(last_eval.get("psnr", float("nan")))
                    last_eval["eval_step"] = step
                    checkpoints.save_best(step, host, positions, last_eval["psnr"])
            if stopping or stop.requested:
                stopped_by = stop.signal_name or "SIGTERM"  # the signal reached another process
                cause = f"{stopped_by} received" if stop.requested else "another process stopped"
                log.warning("%s at step %d: saving a checkpoint and stopping.", cause, step)
            checkpoints.save(step, *saved_at(step), force=True)
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        progress.close()
    return {**last_eval, "step": step, "stopped_by": stopped_by}

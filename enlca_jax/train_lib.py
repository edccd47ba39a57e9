"""Training: ``train_and_evaluate(config, workdir)``, the library behind ``train.py``.

The train step is pure (``train_step(state, batch) -> (state, metrics)``), jit-compiled and
``jax.pmap``-ped over the local devices with axis name ``'batch'``; gradients and metrics are
averaged over it. State is replicated for the step and saved unreplicated by orbax, so a run
restores on any device count. Random features are a pure function of the step:
``redraw(fold_in(feature_key, step))`` at every multiple of ``redraw_interval``, identical on
every replica and after a resume. Checkpoints hold params, optimiser state, step, random
features, the PRNG key and the data-iterator state, so a resumed run continues with exactly the
losses an uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax

from enlca_jax import attention, checkpointing, datasets, eval_lib, image_io, input_pipeline, metric_writers, models

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# State, model and optimiser from the config
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step needs and a checkpoint stores (besides the data-iterator state)."""

    step: Array  # int32 scalar
    params: Any
    opt_state: Any
    random_features: Any  # {'attention_<j>': {'projection': [M, D]}}
    key: Array  # uint32 raw key data [2] (feature_key = fold_in(key, 1))


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """JSON-able ENLCN fields (``models.model_from_config``) from ``config.model`` and ``config.contrastive``."""
    fields = dict(config.model)
    dtype = fields.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    c = config.contrastive
    fields.update(
        contrastive_positive=c.positive,
        contrastive_negative_start=c.negative_start,
        contrastive_negative=c.negative,
        contrastive_margin=c.margin,
    )
    if c.use_fractions:
        fields["contrastive_fractions"] = (c.positive_fraction, c.negative_start_fraction)
    return fields


def create_model(config: ml_collections.ConfigDict) -> models.ENLCN:
    return models.model_from_config(model_config(config), dtype=DTYPES[config.model.get("dtype", "float32")])


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Piecewise constant: ``learning_rate`` times ``lr_decay`` at each milestone step (a function of step)."""
    return optax.piecewise_constant_schedule(
        config.learning_rate, {int(m): config.lr_decay for m in config.lr_milestones}
    )


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adam)
    return adam


def feature_key(state_key: Array) -> Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state_key), 1)


def features_at(template: Any, state_key: Array, step: Array, interval: int, kind: str) -> Any:
    """The random features in force at ``step``: drawn at the last multiple of ``interval``."""
    drawn_at = (step // interval) * interval
    return attention.redraw_random_features(template, jax.random.fold_in(feature_key(state_key), drawn_at), kind)


def create_train_state(
    config: ml_collections.ConfigDict, model: models.ENLCN, tx: optax.GradientTransformation
) -> TrainState:
    """Initial state from ``config.seed`` (compiled: eager initialisation of the full model is slow)."""
    seed, interval, kind = config.seed, config.redraw_interval, config.model.feature_type

    def build() -> TrainState:
        key = jax.random.key(seed)
        variables = models.init_variables(model, jax.random.fold_in(key, 0))
        params = variables["params"]
        key_data = jax.random.key_data(key)
        features = variables.get(attention.FEATURE_COLLECTION, {})
        if features:
            features = features_at(features, key_data, jnp.int32(0), interval, kind)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), random_features=features,
            key=key_data,
        )  # fmt: skip

    return jax.jit(build)()


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def train_step(
    state: TrainState,
    batch: dict[str, Array],
    *,
    model: models.ENLCN,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    contrastive_weight: float,
    with_contrastive: bool,
    axis_name: str | None = "batch",
) -> tuple[TrainState, dict[str, Array]]:
    """One optimiser step on a per-device batch ``{'lr': [b, p, p, 3], 'hr': [b, ps, ps, 3]}`` uint8.

    Loss: mean L1(SR, HR) + ``contrastive_weight`` · mean over ENLCA blocks and examples of the
    contrastive loss (computed only when ``with_contrastive``, i.e. after the warm-up).
    """
    lr = batch["lr"].astype(jnp.float32) / 255.0 * model.rgb_range
    hr = batch["hr"].astype(jnp.float32) / 255.0 * model.rgb_range

    def loss_fn(params):
        variables = {"params": params, attention.FEATURE_COLLECTION: state.random_features}
        if with_contrastive:
            sr, aux = model.apply(variables, lr, train=True, mutable=[attention.LOSS_COLLECTION])
            total, count = attention.sum_contrastive_losses(aux[attention.LOSS_COLLECTION])
            contrastive = jnp.mean(total) / max(count, 1)
        else:
            sr = model.apply(variables, lr)
            contrastive = jnp.zeros((), jnp.float32)
        l1 = jnp.mean(jnp.abs(sr.astype(jnp.float32) - hr))
        return l1 + contrastive_weight * contrastive, (l1, contrastive)

    (loss, (l1, contrastive)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "l1": l1,
        "contrastive": contrastive,
        "grad_norm": _global_norm(grads),
        "param_norm": _global_norm(params),
        "learning_rate": schedule(state.step),
    }
    if axis_name is not None:
        metrics = lax.pmean(metrics, axis_name)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class Checkpoints:
    """Latest-K checkpoints in ``<workdir>/checkpoints`` and best-K by validation PSNR in ``<workdir>/best``.

    Each holds ``state`` (the unreplicated TrainState) and ``data`` (the grain iterator state, JSON).
    Saves are asynchronous; orbax writes into a temporary folder and renames it when complete, so
    a crash never leaves a partial checkpoint that a restore would pick up.
    """

    def __init__(self, workdir: pathlib.Path, keep_latest: int, keep_best: int):
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True),
            item_handlers=handlers,
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_best, best_fn=lambda m: m["psnr"], best_mode="max", create=True
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

    @staticmethod
    def _args(state: TrainState, data_state: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))

    def save(self, step: int, state: TrainState, data_state: dict, force: bool = False) -> None:
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=self._args(state, data_state), force=force)

    def save_best(self, step: int, state: TrainState, data_state: dict, psnr: float) -> None:
        if math.isfinite(psnr) and step not in self.best.all_steps():
            self.best.save(step, args=self._args(state, data_state), metrics={"psnr": psnr}, force=True)

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        step = self.latest.latest_step()
        if step is None:
            return None
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_model(workdir: str | os.PathLike, which: str = "latest") -> tuple[models.ENLCN, dict[str, Any], int]:
    """``(model, variables, step)`` from a training workdir: ``which`` is 'latest', 'best' or a step.

    A directory made by the weight converter (``model.json`` + ``variables/``) also works.
    """
    workdir = pathlib.Path(workdir).expanduser().absolute()
    if (workdir / checkpointing.MODEL_JSON).is_file() and (workdir / checkpointing.VARIABLES_DIR).is_dir():
        model, variables = checkpointing.load_model(workdir)
        return model, variables, 0
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{workdir} is neither a training workdir (no config.json) nor a converted model checkpoint "
            "(no model.json)."
        )
    saved = json.loads(config_path.read_text())
    model = models.model_from_config(saved["model_config"], dtype=DTYPES[saved.get("dtype", "float32")])
    folder = workdir / ("best" if which == "best" else "checkpoints")
    manager = ocp.CheckpointManager(
        folder,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )
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
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    variables = {"params": restored["params"]}
    if restored.get("random_features"):
        variables[attention.FEATURE_COLLECTION] = restored["random_features"]
    return model, variables, step


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class _Stop:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the next step boundary and returns."""

    requested: bool = False
    signal_name: str = ""

    def install(self) -> dict:
        previous = {}

        def handler(signum, frame):  # noqa: ARG001
            self.requested = True
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return previous


def check_batch_size(batch_size: int) -> int:
    """Per-process batch; the global batch must divide by the device count."""
    devices, processes = jax.device_count(), jax.process_count()
    if batch_size % devices:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {devices} devices (jax.device_count()); "
            f"set --config.batch_size to a multiple of {devices}."
        )
    return batch_size // processes


def _progress(config: ml_collections.ConfigDict, initial: int, total: int):
    if config.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return None


class Validator:
    """Y-PSNR/SSIM of the model next to MATLAB bicubic on the validation split; writes sample PNGs.

    The split is read and decoded, and bicubic's scores computed, once per run (at construction);
    each call only runs the model.
    """

    def __init__(self, config: ml_collections.ConfigDict, scale: int, workdir: pathlib.Path):
        data = config.data
        source = datasets.load_split(data.validation, data.validation_split, _data_dir(config), scale=scale)
        self.images = list(input_pipeline.eval_examples(source, scale))
        if data.validation_images > 0:
            self.images = self.images[: data.validation_images]
        self.scale = scale
        self.num_samples = config.num_sample_images
        self.samples_dir = workdir / "samples"
        self.bicubic = eval_lib.evaluate(eval_lib.bicubic_upscaler(scale), self.images, scale)

    def __call__(self, model: models.ENLCN, variables: Any, step: int) -> dict[str, float]:
        folder = self.samples_dir / f"{step:08d}"
        written = 0

        def save_sample(image, sr):
            nonlocal written
            if written < self.num_samples:
                image_io.write_png(folder / f"{image.name}.png", sr)
                written += 1

        ours = eval_lib.evaluate(eval_lib.model_upscaler(model, variables), self.images, self.scale, save_sample)
        bicubic = self.bicubic
        return {"psnr": ours.psnr, "ssim": ours.ssim, "bicubic_psnr": bicubic.psnr, "bicubic_ssim": bicubic.ssim}


def _data_dir(config: ml_collections.ConfigDict) -> str:
    return os.path.expanduser(config.data.data_dir)


def _unreplicate(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Train (resuming from ``workdir`` if it has checkpoints), validate, checkpoint.

    Returns:
      The last validation metrics (``psnr``, ``ssim``, ``bicubic_psnr``, ``bicubic_ssim``) and
      ``step``.
    """
    if config.distributed:
        jax.distributed.initialize()
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    log = logging.getLogger("enlca_jax.train")
    is_main = jax.process_index() == 0
    per_process_batch = check_batch_size(config.batch_size)
    local_devices = jax.local_device_count()

    model = create_model(config)
    tx = create_optimizer(config)
    schedule = learning_rate_schedule(config)
    state = create_train_state(config, model, tx)
    if is_main:
        checkpointing.write_json_atomic(
            workdir / "config.json",
            {
                "config": json.loads(config.to_json_best_effort()),
                "model_config": model_config(config),
                "dtype": config.model.dtype,
                "parameters": models.count_params(state.params),
            },
        )

    source = datasets.load_split(
        config.data.train, config.data.train_split, _data_dir(config), scale=config.model.scale
    )
    dataset = input_pipeline.train_dataset(
        source,
        scale=config.model.scale,
        patch_size=config.data.patch_size,
        batch_size=per_process_batch,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        augment=config.data.augment,
        worker_count=config.data.worker_count,
        read_threads=config.data.read_threads,
        prefetch=config.data.prefetch,
    )
    data_iter = iter(dataset)

    checkpoints = Checkpoints(workdir, config.keep_latest, config.keep_best)
    writer = metric_writers.MetricWriter(workdir, enabled=is_main)
    restored = checkpoints.restore_latest(jax.eval_shape(lambda: state))
    if restored is not None:
        state, data_state = restored
        data_iter.set_state(data_state)
        writer.truncate_after(int(state.step))
        log.info("resumed from step %d in %s", int(state.step), workdir)
    start_step = int(state.step)

    step_fns = {
        flag: jax.pmap(
            functools.partial(
                train_step,
                model=model,
                tx=tx,
                schedule=schedule,
                contrastive_weight=config.contrastive.weight,
                with_contrastive=flag,
            ),
            axis_name="batch",
            donate_argnums=(0,),
        )
        for flag in (False, True)
    }
    redraw = jax.pmap(
        lambda s: s.replace(
            random_features=features_at(
                s.random_features, s.key, s.step, config.redraw_interval, config.model.feature_type
            )
        ),
        axis_name="batch",
    )
    replicated = flax.jax_utils.replicate(state)
    stop = _Stop()
    previous_handlers = stop.install()
    progress = _progress(config, start_step, config.num_train_steps)
    with_attention = bool(state.random_features)
    last_eval: dict[str, float] = {}
    validator: Validator | None = None  # built at the first validation: reads the split once
    step = start_step
    timer, timer_step = time.time(), step

    def host_state() -> TrainState:
        return jax.device_get(_unreplicate(replicated))

    def save(step: int, force: bool = False) -> None:
        checkpoints.save(step, host_state(), data_iter.get_state(), force=force)

    try:
        while step < config.num_train_steps:
            if stop.requested:
                log.warning("%s received at step %d: saving a checkpoint and stopping.", stop.signal_name, step)
                save(step, force=True)
                break
            if with_attention and step > 0 and step % config.redraw_interval == 0:
                replicated = redraw(replicated)
            batch = next(data_iter)
            batch = jax.tree_util.tree_map(lambda x: x.reshape((local_devices, -1) + x.shape[1:]), batch)
            with_contrastive = with_attention and step >= config.contrastive.start_step
            replicated, metrics = step_fns[with_contrastive](replicated, batch)
            metrics = jax.device_get(_unreplicate(metrics))
            if not all(np.isfinite(v) for v in metrics.values()):
                bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
                raise NonFiniteError(
                    f"non-finite {bad} at step {step}; stopping without saving this state. The last good "
                    f"checkpoint is in {workdir / 'checkpoints'}; lower the learning rate or enable "
                    "config.grad_clip_norm."
                )
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if step % config.log_every == 0 or step == config.num_train_steps:
                elapsed = time.time() - timer
                rate = (step - timer_step) / max(elapsed, 1e-9)
                metrics["steps_per_second"] = rate
                writer.write_scalars(step, metrics)
                if progress is None and is_main:
                    eta = (config.num_train_steps - step) / max(rate, 1e-9)
                    log.info(
                        "step %d/%d loss %.5f l1 %.5f contrastive %.4f %.2f it/s ETA %s",
                        step, config.num_train_steps, metrics["loss"], metrics["l1"],
                        metrics["contrastive"], rate, time.strftime("%H:%M:%S", time.gmtime(eta)),
                    )  # fmt: skip
                timer, timer_step = time.time(), step
            if step % config.checkpoint_every == 0:
                save(step)
            if step % config.eval_every == 0 or step == config.num_train_steps:
                host = host_state()
                variables = {"params": host.params, attention.FEATURE_COLLECTION: host.random_features}
                if not host.random_features:
                    variables.pop(attention.FEATURE_COLLECTION)
                if validator is None:
                    validator = Validator(config, model.scale, workdir)
                last_eval = validator(model, variables, step)
                writer.write_scalars(step, {f"val_{k}": v for k, v in last_eval.items()})
                if is_main:
                    log.info(
                        "validation step %d: PSNR %.3f dB SSIM %.4f (bicubic %.3f dB %.4f)",
                        step, last_eval["psnr"], last_eval["ssim"], last_eval["bicubic_psnr"],
                        last_eval["bicubic_ssim"],
                    )  # fmt: skip
                checkpoints.save_best(step, host, data_iter.get_state(), last_eval["psnr"])
        else:
            save(step, force=True)
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        if progress is not None:
            progress.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return {**last_eval, "step": step}

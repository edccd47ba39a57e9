"""The pure train step and the state it carries: ``train_step(state, batch) -> (state, metrics)``.

`TrainState` holds everything a step needs and a checkpoint stores besides the data-iterator
state. Per-step randomness is a function of the step: the random features in force at step t are
``redraw(fold_in(feature_key, drawn_at))`` with ``drawn_at`` the last multiple of the redraw
interval (`features_at`), identical on every replica and after a resume. The step is written for
``jax.pmap`` with ``axis_name='batch'`` (gradients and metrics ``pmean``-ed over it) or for one
device (``axis_name=None``).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from enlca_jax import attention, models

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a step needs and a checkpoint stores (besides the data-iterator state)."""

    step: Array  # int32 scalar
    params: Any
    opt_state: Any
    random_features: Any  # {'attention_<j>': {'projection': [M, D]}}
    key: Array  # uint32 raw key data [2] (feature_key = fold_in(key, 1))


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


def _state_builder(config: ml_collections.ConfigDict, model: models.ENLCN, tx: optax.GradientTransformation):
    """The function that builds the initial state from ``config.seed`` (pure, no arguments)."""
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

    return build


def state_initializer(config: ml_collections.ConfigDict, model: models.ENLCN, tx: optax.GradientTransformation):
    """The compiled initialisation from ``config.seed``: ``init()`` is the initial `TrainState`,
    ``init.eval_shape()`` its structure, shapes and dtypes (``jax.ShapeDtypeStruct`` leaves)
    without computing it, i.e. what a checkpoint is restored into, at no compile (compiling the
    initialisation takes seconds on a GPU and tens of seconds on a CPU). The two share one trace."""
    return jax.jit(_state_builder(config, model, tx))


def create_train_state(
    config: ml_collections.ConfigDict, model: models.ENLCN, tx: optax.GradientTransformation
) -> TrainState:
    """Initial state from ``config.seed`` (compiled: eager initialisation of the full model is slow)."""
    return state_initializer(config, model, tx)()


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

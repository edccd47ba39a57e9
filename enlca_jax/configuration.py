"""The training config (``configs/default.py`` lists every field): its checks and the model it describes.

`check_config` validates every field's range up front, before any data is read or anything is
compiled, and reports all problems at once. A run's model is stored in its ``config.json`` as the
flat JSON fields of `model_fields`, which `enlca_jax.models.model_from_config` turns back into a
model; `build_model` is that path from a config, so a trained workdir and its config always
describe the same network. `incompatible_fields` says which fields a resumed run may not change.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from enlca_jax import contrastive, models

#: Values of ``config.model.dtype``.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


#: Choices of the string fields.
CHOICES = {
    "model.attention": ("enla", "nla", "none"),
    "model.dtype": tuple(DTYPES),
    "model.feature_type": ("orthogonal", "iid"),
    "model.initializer": ("pytorch", "flax"),
    "contrastive.method": ("select", "top_k"),
    "distributed.cpu_collectives": ("gloo", "mpi", ""),
}

#: Lower bounds of the numeric fields: (bound, inclusive).
MINIMA = {
    "model.num_resblocks": (1, True),
    "model.features": (1, True),
    "model.res_scale": (0, False),
    "model.attention_every": (1, True),
    "model.reduction": (1, True),
    "model.num_random_features": (1, True),
    "model.amplification": (0, False),
    "contrastive.weight": (0, True),
    "contrastive.start_step": (0, True),
    "contrastive.positive": (1, True),
    "contrastive.negative_start": (0, True),
    "contrastive.negative": (1, True),
    "contrastive.margin": (0, True),
    "data.validation_images": (0, True),
    "data.patch_size": (1, True),
    "data.worker_count": (0, True),
    "data.read_threads": (0, True),
    "data.prefetch": (0, True),
    "batch_size": (1, True),
    "num_train_steps": (1, True),
    "learning_rate": (0, False),
    "lr_decay": (0, False),
    "adam_eps": (0, False),
    "grad_clip_norm": (0, True),
    "redraw_interval": (1, True),
    "log_every": (1, True),
    "eval_every": (1, True),
    "checkpoint_every": (1, True),
    "keep_latest": (1, True),
    "keep_best": (0, True),
    "num_sample_images": (0, True),
    "eval.tile_size": (0, True),
    "distributed.num_processes": (-1, True),
    "distributed.process_id": (-1, True),
    "distributed.initialization_timeout": (1, True),
}

#: Fields that count something and must be whole numbers.
INTEGERS = {name for name in MINIMA if not name.endswith(
    ("res_scale", "amplification", "weight", "margin", "learning_rate", "lr_decay", "adam_eps", "grad_clip_norm")
)}  # fmt: skip


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
    for part in name.split("."):
        config = config[part]
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming every out-of-range field of a training config (and the fix).

    Checks the ranges and choices above, the model's shape constraints (scale 2, 3 or 4;
    ``features // reduction`` at least 1), the Adam betas, the learning-rate milestones, and
    that an LR training patch has enough positions for the contrastive windows when the term
    switches on during the run (otherwise that would fail only at ``contrastive.start_step``).
    """
    problems = []
    for name, choices in CHOICES.items():
        if _get(config, name) not in choices:
            problems.append(f"config.{name} = {_get(config, name)!r}: choose one of {', '.join(map(repr, choices))}")
    for name, (bound, inclusive) in MINIMA.items():
        value = _get(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or (name in INTEGERS and int(value) != value):
            kind = "a whole number" if name in INTEGERS else "a number"
            problems.append(f"config.{name} = {value!r}: must be {kind}")
        elif value < bound or (value == bound and not inclusive):
            problems.append(f"config.{name} = {value!r}: must be {'>=' if inclusive else '>'} {bound}")
    model = config.model
    if model.scale not in (2, 3, 4):
        problems.append(f"config.model.scale = {model.scale!r}: choose 2, 3 or 4")
    if isinstance(model.reduction, int) and model.reduction > model.features:
        problems.append(
            f"config.model.reduction = {model.reduction} exceeds config.model.features = {model.features}: the "
            "Q/K width is features // reduction"
        )
    for name in ("adam_b1", "adam_b2"):
        if not 0 <= config[name] < 1:
            problems.append(f"config.{name} = {config[name]!r}: must lie in [0, 1)")
    milestones = tuple(config.lr_milestones)
    if any(not isinstance(m, int) or m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        problems.append(f"config.lr_milestones = {milestones!r}: must be increasing positive step numbers")
    c = config.contrastive
    if model.attention != "none" and c.weight > 0 and c.start_step < config.num_train_steps:
        positions = config.data.patch_size**2
        try:
            if c.use_fractions:
                counts = contrastive.contrastive_counts(positions, c.positive_fraction, c.negative_start_fraction)
            else:
                counts = (c.positive, c.negative_start, c.negative)
            depth = max(counts[0], counts[1] + counts[2])
        except (ValueError, TypeError) as error:
            problems.append(f"config.contrastive fractions: {error}")
        else:
            if depth > positions:
                problems.append(
                    f"config.data.patch_size = {config.data.patch_size} gives {positions} positions per patch, fewer "
                    f"than the {depth} ranked keys the contrastive windows need from step {c.start_step}: raise the "
                    "patch size or lower config.contrastive.negative_start / negative"
                )
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems) + "\n(set each with --config.FIELD=VALUE)")


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """JSON-able model fields (`models.model_from_config`) from ``config.model`` and ``config.contrastive``.

    ``config.model.dtype`` is not among them (a compute choice, stored beside them); the
    contrastive windows are (they configure the ENLCA blocks).
    """
    fields = {key: value for key, value in config.model.items() if key != "dtype"}
    c = config.contrastive
    fields.update(
        contrastive_positive=c.positive,
        contrastive_negative_start=c.negative_start,
        contrastive_negative=c.negative,
        contrastive_margin=c.margin,
        contrastive_method=c.method,
    )
    if c.use_fractions:
        fields["contrastive_fractions"] = (c.positive_fraction, c.negative_start_fraction)
    return fields


def compute_dtype(name: str) -> Any:
    """The jnp dtype named by ``config.model.dtype``."""
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def build_model(config: ml_collections.ConfigDict, **overrides: Any) -> models.ENLCN:
    """The ENLCN of a training config; ``overrides`` as in `models.model_from_config`
    (e.g. ``conv_general_dilated=enlca_jax.cpu.setup()``)."""
    overrides.setdefault("dtype", compute_dtype(config.model.get("dtype", "float32")))
    return models.model_from_config(model_fields(config), **overrides)


def data_dir(config: ml_collections.ConfigDict) -> str:
    """``config.data.data_dir`` with ``~`` expanded."""
    return os.path.expanduser(config.data.data_dir)


#: Config fields a resumed run must share with the run that made its workdir (besides the model
#: fields of `model_fields`, except ``contrastive_method``, which computes the same loss), and the
#: contrastive fields it may change (the term's weight and start; the other ones shape the blocks).
RESUME_FREE = ("contrastive.weight", "contrastive.start_step", "contrastive.method")
RESUME_FIXED = (
    "model.dtype", "data.train", "data.train_split", "data.patch_size", "data.augment", "batch_size", "seed"
)  # fmt: skip


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """A nested dict as {"a.b": value}; lists become tuples (JSON round trips them as lists)."""
    flat = traverse_util.flatten_dict(tree, sep=".")
    return {key: tuple(value) if isinstance(value, list) else value for key, value in flat.items()}


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What ``<workdir>/config.json`` holds of a config: all its fields and the model's JSON fields."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "model_config": json.loads(json.dumps(model_fields(config))),
        "dtype": config.model.dtype,
    }


def differences(stored: dict[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(incompatible, other): the fields in which ``config`` differs from a stored `run_record`,
    as ``"name: stored -> new"`` lines. Incompatible ones change the network, its parameters'
    shapes or the data order of a resumed run; the others (schedule, logging) may change."""
    new = run_record(config)
    old_model, new_model = flatten(stored.get("model_config", {})), flatten(new["model_config"])
    old_all, new_all = flatten(stored.get("config", {})), flatten(new["config"])
    incompatible, other = [], []
    for name in sorted(set(old_model) | set(new_model)):
        if name != "contrastive_method" and old_model.get(name) != new_model.get(name):
            incompatible.append(f"model {name}: {old_model.get(name)!r} -> {new_model.get(name)!r}")
    for name in sorted(set(old_all) | set(new_all)):
        if old_all.get(name) != new_all.get(name):
            line = f"config.{name}: {old_all.get(name)!r} -> {new_all.get(name)!r}"
            if name in RESUME_FIXED:
                incompatible.append(line)
            elif name.startswith("model.") or (name.startswith("contrastive.") and name not in RESUME_FREE):
                continue  # compared above, as the model fields they make
            else:
                other.append(line)
    return incompatible, other

"""The training config (``configs/default.py`` lists every field): the model it describes.

A run's model is stored in its ``config.json`` as the flat JSON fields of `model_fields`, which
`enlca_jax.models.model_from_config` turns back into a model; `build_model` is that path from a
config, so a trained workdir and its config always describe the same network.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from enlca_jax import models

#: Values of ``config.model.dtype``.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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

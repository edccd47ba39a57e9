"""ENLCN: the EDSR-style super-resolution network with ENLCA blocks (authors' src/model/enlcn.py).

Images are NHWC float in [0, rgb_range] (rgb_range 1, as the authors' commands). Layout of the
trunk ("body") for the default 32 ResBlocks with ``attention_every = 8``::

    ENLCA, RB×8, ENLCA, RB×8, ENLCA, RB×8, ENLCA, RB×8, ENLCA, conv3×3   (+ global skip)

Variables: ``{'params': ..., 'random_features': ...}``; only ``params`` are trainable. Parameter
names: ``head``, ``attention_<j>`` (query/key/value), ``resblocks_<i>`` (conv1/conv2),
``body_conv``, ``upsampler`` (conv_<s>), ``tail``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from enlca_jax import attention
from enlca_jax.cpu import xla_flags

Array = jax.Array

#: DIV2K RGB mean subtracted at the input and added at the output (authors' MeanShift).
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
SUPPORTED_SCALES = (2, 3, 4)


# ---------------------------------------------------------------------------------------------
# Initialisers
# ---------------------------------------------------------------------------------------------


def pytorch_kernel_init() -> Callable[..., Array]:
    """PyTorch's Conv2d default, kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in), for HWIO kernels.

    The values of ``nn.initializers.variance_scaling(1/3, 'fan_in', 'uniform')`` on the kernel's
    shape [kh, kw, C_in, C_out], drawn as the matrix [kh·kw·C_in, C_out]: the same fan-in, and the
    same numbers, since jax numbers the elements of a random draw in row-major order. Drawn so
    because XLA:CPU compiles some 4-D draws very slowly (the tiny test model's [3, 3, 3, 8]: 2.8 s,
    [3, 3, 8, 9]: 20 s, against 0.4-1.4 s as matrices), and every fresh run compiles them all.
    """
    base = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        if len(shape) <= 2:
            return base(key, shape, dtype)
        return base(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

    return init


def pytorch_bias_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's Conv2d bias default: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def pixel_shuffle(x: Array, factor: int) -> Array:
    """PyTorch's PixelShuffle in NHWC: input channel ``c·r² + i·r + j`` → channel c at (h·r+i, w·r+j).

    Args:
      x: [B, H, W, C·r²].

    Returns:
      [B, H·r, W·r, C].
    """
    batch, height, width, channels = x.shape
    out = channels // (factor * factor)
    x = x.reshape(batch, height, width, out, factor, factor)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, H, r_i, W, r_j, C]
    return x.reshape(batch, height * factor, width * factor, out)


def upsampler_factors(scale: int) -> tuple[int, ...]:
    """Pixel-shuffle factors of the authors' Upsampler: ×2 → (2,), ×3 → (3,), ×4 → (2, 2)."""
    if scale not in SUPPORTED_SCALES:
        raise ValueError(f"scale must be one of {SUPPORTED_SCALES}, got {scale!r}.")
    return (3,) if scale == 3 else (2,) * int(math.log2(scale))


def body_layout(num_resblocks: int, attention_every: int, with_attention: bool) -> list[tuple[str, int]]:
    """Order of the trunk: ``('attention', j)`` and ``('resblock', i)`` entries.

    One attention block before the first ResBlock and one after every ``attention_every``-th,
    as in the authors' enlcn.py (``(i + 1) % 8 == 0``).
    """
    layout: list[tuple[str, int]] = []
    num_attention = 0
    if with_attention:
        layout.append(("attention", 0))
        num_attention = 1
    for i in range(num_resblocks):
        layout.append(("resblock", i))
        if with_attention and (i + 1) % attention_every == 0:
            layout.append(("attention", num_attention))
            num_attention += 1
    return layout


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def apply_mask(x: Array, mask: Array | None) -> Array:
    """Zero the padded pixels of x: [B, H·f, W·f, C] with mask [B, H, W] (f ≥ 1 repeats the mask).

    Zeroing every conv input outside the image makes a padded forward equal the unpadded one:
    each 3×3 conv then sees exactly the zeros that 'SAME' padding gives at the image border.
    """
    if mask is None:
        return x
    return x * mask_at(mask, x.shape[1])[..., None].astype(x.dtype)


def mask_at(mask: Array, height: int) -> Array:
    """The LR mask [B, H, W] repeated to an image of ``height`` = f·H rows: [B, f·H, f·W]."""
    factor = height // mask.shape[1]
    if factor > 1:
        mask = jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)
    return mask


class ResBlock(nn.Module):
    """conv3×3 → ReLU → conv3×3, ``x + res_scale · branch`` (no BatchNorm). [B, H, W, C] → same."""

    features: int
    res_scale: float = 0.1
    conv: Callable[..., nn.Module] = nn.Conv

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        y = self.conv(self.features, name="conv1")(x)
        y = self.conv(self.features, name="conv2")(apply_mask(nn.relu(y), mask))
        return apply_mask(x + self.res_scale * y, mask)


class ConvParams(nn.Module):
    """The kernel [kh, kw, C_in, features] and bias [features] of an ``nn.Conv``, declared as it declares
    them (same names, shapes, initialisers and parameter RNG streams, so the same checkpoints),
    returned unapplied: for convolutions computed fused with their neighbours (`Upsampler`)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        shape = (*self.kernel_size, in_features, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        return kernel, self.param("bias", self.bias_init, (self.features,), self.param_dtype)


class Upsampler(nn.Module):
    """Authors' Upsampler: per factor r, conv3×3 C → C·r² then PixelShuffle(r). [B,H,W,C] → [B,sH,sW,C].

    Called with ``tail`` = (kernel [3, 3, C, colors], bias), it returns the tail conv of the
    upsampled image instead, [B, sH, sW, colors]. When ``conv_general_dilated`` has an
    ``upsample_and_tail`` attribute (`enlca_jax.cpu.conv_general_dilated` does), the last stage,
    its shuffle and the tail are computed by it in one call,
    ``upsample_and_tail(x, up_kernel, up_bias, tail_kernel, tail_bias, mask, factor, precision)``,
    which must equal ``conv(tail, mask · PixelShuffle_r(conv(up, x) + b_up)) + b_tail``.
    """

    scale: int
    features: int
    conv: Callable[..., nn.Module] = nn.Conv  # the stages before the last
    last: Callable[..., nn.Module] = ConvParams  # the last stage's kernel and bias
    conv_general_dilated: Callable[..., Array] | None = None
    dtype: Any = None
    precision: Any = None

    def _conv(self, x: Array, kernel: Array, bias: Array) -> Array:
        """``nn.Conv``'s 'SAME' stride-1 application of a kernel and bias from `ConvParams`."""
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        fn = self.conv_general_dilated or jax.lax.conv_general_dilated
        y = fn(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return y + bias

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, tail: tuple[Array, Array] | None = None) -> Array:
        factors = upsampler_factors(self.scale)
        for index, factor in enumerate(factors[:-1]):
            x = self.conv(self.features * factor * factor, name=f"conv_{index}")(x)
            x = apply_mask(pixel_shuffle(x, factor), mask)
        factor = factors[-1]
        kernel, bias = self.last(self.features * factor * factor, name=f"conv_{len(factors) - 1}")(x.shape[-1])
        fused = getattr(self.conv_general_dilated, "upsample_and_tail", None)
        if tail is not None and fused is not None:
            x, kernel, bias, tail_kernel, tail_bias = nn.dtypes.promote_dtype(x, kernel, bias, *tail, dtype=self.dtype)
            here = None if mask is None else mask_at(mask, x.shape[1])
            return fused(x, kernel, bias, tail_kernel, tail_bias, here, factor, self.precision)
        x = apply_mask(pixel_shuffle(self._conv(x, kernel, bias), factor), mask)
        return x if tail is None else self._conv(x, *tail)


class ENLCN(nn.Module):
    """EDSR with ENLCA blocks. ``ENLCN(scale=4)`` is the authors' ×4 model (43,583,363 params).

    Call: ``model.apply(variables, lr, train=False, mask=None)`` with ``lr`` [B, H, W, colors] in
    [0, rgb_range] returns SR [B, s·H, s·W, colors]. With ``train=True`` each ENLCA block sows its
    per-example contrastive loss [B] into the ``'losses'`` collection (pass ``mutable=['losses']``).
    ``mask`` [B, H, W] bool marks the real pixels of images padded at the bottom/right: padded
    pixels are left out of the attention sums and zeroed before every conv, so the output on the
    real pixels equals that of the unpadded image (one compiled shape serves many image sizes).

    Attributes:
      scale: 2, 3 or 4.
      num_resblocks, features, res_scale: EDSR trunk (authors: 32, 256, 0.1).
      attention_every: an ENLCA block before the first ResBlock and after every n-th (8).
      attention_block: the attention block's constructor, ``attention.ENLCA`` (default) or a
        ``functools.partial`` of it with its own settings (random features, amplification,
        contrastive windows, ``attention_fn=attention.softmax_attention`` for exact NLA); None for
        no attention (plain EDSR). ENLCN sets the fields it owns on every block: ``res_scale``,
        ``dtype``, ``param_dtype``, ``precision``, ``conv_general_dilated`` and the initialisers.
      initializer: ``'pytorch'`` (default: the PyTorch defaults the authors trained with; EDSR-style
        nets with res_scale 0.1 were tuned with them) or ``'flax'`` (lecun_normal, zero bias).
      rgb_mean, rgb_range, colors: MeanShift constants and image range.
      dtype, param_dtype, precision: as in flax.linen.Conv (feature maps stay float32).
      conv_general_dilated: how every convolution runs, as ``flax.linen.Conv``'s field of that name
        (None: ``jax.lax.conv_general_dilated``); see `Upsampler` for its optional fused tail.
        Programs on the CPU pass `enlca_jax.cpu.conv_general_dilated`. The parameters are the same
        either way.
    """

    scale: int = 4
    num_resblocks: int = 32
    features: int = 256
    res_scale: float = 0.1
    attention_every: int = 8
    attention_block: Callable[..., nn.Module] | None = attention.ENLCA
    initializer: str = "pytorch"
    rgb_mean: Sequence[float] = DIV2K_MEAN
    rgb_range: float = 1.0
    colors: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    conv_general_dilated: Callable[..., Array] | None = None

    def _conv_inits(self, kernel: int, fan_in: int) -> dict[str, Callable[..., Array]]:
        if self.initializer == "pytorch":
            return {
                "kernel_init": pytorch_kernel_init(),
                "bias_init": pytorch_bias_init(kernel * kernel * fan_in),
            }
        if self.initializer == "flax":
            return {}
        raise ValueError(f"init must be 'pytorch' or 'flax', got {self.initializer!r}.")

    def _conv_factory(self, kernel: int, fan_in: int) -> Callable[..., nn.Module]:
        return functools.partial(
            nn.Conv,
            kernel_size=(kernel, kernel),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            conv_general_dilated=self.conv_general_dilated,
            **self._conv_inits(kernel, fan_in),
        )

    def _params_factory(self, kernel: int, fan_in: int) -> Callable[..., nn.Module]:
        """`ConvParams` declared as `_conv_factory`'s convs are (for convs applied fused)."""
        return functools.partial(
            ConvParams, kernel_size=(kernel, kernel), param_dtype=self.param_dtype, **self._conv_inits(kernel, fan_in)
        )

    @property
    def layout(self) -> list[tuple[str, int]]:
        return body_layout(self.num_resblocks, self.attention_every, self.attention_block is not None)

    @property
    def num_attention_blocks(self) -> int:
        return sum(kind == "attention" for kind, _ in self.layout)

    def setup(self) -> None:
        upsampler_factors(self.scale)  # validates the scale
        if self.num_resblocks < 0 or self.features <= 0 or self.attention_every <= 0:
            raise ValueError(
                "num_resblocks >= 0, features > 0 and attention_every > 0 are required, got "
                f"{self.num_resblocks}, {self.features}, {self.attention_every}."
            )
        conv3 = self._conv_factory(3, self.features)
        self.head = self._conv_factory(3, self.colors)(self.features)
        self.resblocks = [ResBlock(self.features, self.res_scale, conv3) for _ in range(self.num_resblocks)]
        self.attention = [self.attention_block(**self._block_fields()) for _ in range(self.num_attention_blocks)]
        self.body_conv = conv3(self.features)
        params3 = self._params_factory(3, self.features)
        self.upsampler = Upsampler(
            self.scale, self.features, conv3, params3, self.conv_general_dilated, dtype=self.dtype,
            precision=self.precision,
        )  # fmt: skip
        self.tail = params3(self.colors)  # applied by the upsampler (fused with its last stage if it can)

    def _block_fields(self) -> dict[str, Any]:
        """The fields ENLCN sets on its attention blocks (its own; the rest is the block's)."""
        fields = {
            "res_scale": self.res_scale,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "precision": self.precision,
            "conv_general_dilated": self.conv_general_dilated,
        }
        if self.initializer == "pytorch":  # 1×1 convs: fan_in = features
            fields.update(kernel_init=pytorch_kernel_init(), bias_init=pytorch_bias_init(self.features))
        return fields

    def block(self) -> nn.Module | None:
        """An unbound attention block as this model builds them (to read its settings), or None."""
        if self.attention_block is None:
            return None
        return self.attention_block(**self._block_fields(), parent=None)

    # The stages below are public so that tiled inference can run the network piece by piece.

    def embed(self, x: Array, mask: Array | None = None) -> Array:
        """Mean shift and head conv: [B, H, W, colors] → [B, H, W, features]."""
        mean = jnp.asarray(self.rgb_mean, jnp.float32) * self.rgb_range
        return apply_mask(self.head(apply_mask(x - mean.astype(x.dtype), mask)), mask)

    def reconstruct(self, trunk: Array, skip: Array, mask: Array | None = None) -> Array:
        """Body conv, global skip, upsampler, tail, mean add: [B, H, W, F] ×2 → [B, sH, sW, colors]."""
        x = apply_mask(self.body_conv(trunk) + skip, mask)
        x = self.upsampler(x, mask, tail=self.tail(self.features))
        mean = jnp.asarray(self.rgb_mean, jnp.float32) * self.rgb_range
        return x.astype(jnp.float32) + mean

    def __call__(self, x: Array, *, train: bool = False, mask: Array | None = None) -> Array:
        if x.ndim != 4 or x.shape[-1] != self.colors:
            raise ValueError(f"ENLCN expects [B, H, W, {self.colors}] images, got shape {x.shape}.")
        if mask is not None and mask.shape != x.shape[:3]:
            raise ValueError(f"mask must be [B, H, W] = {x.shape[:3]}, got {mask.shape}.")
        if jax.default_backend() == "cpu":
            xla_flags.warn_if_deadlock_prone(self.num_attention_blocks)
        skip = self.embed(x, mask)
        trunk = skip
        for kind, index in self.layout:
            if kind == "attention":
                trunk = apply_mask(self.attention[index](trunk, train=train, mask=mask), mask)
            else:
                trunk = self.resblocks[index](trunk, mask)
        return self.reconstruct(trunk, skip, mask)


#: Names of the attention variants in configs and checkpoints (``attention`` field of the JSON).
ATTENTION_FNS: dict[str, Callable[..., Array] | None] = {
    "enla": attention.efficient_attention,
    "nla": attention.softmax_attention,
    "none": None,
}
#: JSON fields of a model that configure its ENLCA blocks, and the `attention.ENLCA` field of each.
BLOCK_FIELDS = {
    "reduction": "reduction",
    "num_random_features": "num_features",
    "amplification": "amplification",
    "feature_type": "feature_type",
    "contrastive_positive": "contrastive_positive",
    "contrastive_negative_start": "contrastive_negative_start",
    "contrastive_negative": "contrastive_negative",
    "contrastive_fractions": "contrastive_fractions",
    "contrastive_margin": "contrastive_margin",
    "contrastive_method": "contrastive_method",
}


class BlockPartial(functools.partial):
    """``functools.partial`` that compares by value, so models built twice from one config are equal
    (and share compiled functions cached on the model)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, functools.partial):
            return NotImplemented
        return (self.func, self.args, self.keywords) == (other.func, other.args, other.keywords)

    def __hash__(self) -> int:
        return hash((self.func, self.args, tuple(sorted(self.keywords.items()))))


#: JSON fields of earlier versions that no longer configure anything (how convolutions ran).
_IGNORED_FIELDS = ("conv_impl",)


def model_from_config(config: dict[str, Any], **overrides: Any) -> ENLCN:
    """The one way to build an ENLCN from its JSON-able description (configs, checkpoints).

    Args:
      config: flat fields: ENLCN's own (``scale``, ``features``, …), ``attention`` ('enla',
        'nla' or 'none') and the block settings of `BLOCK_FIELDS` (``num_random_features``,
        ``amplification``, ``contrastive_*``, …).
      overrides: fields that replace those of ``config``, JSON ones or objects
        (``dtype=jnp.bfloat16``, ``conv_general_dilated=...``).

    Returns:
      ``ENLCN(attention_block=partial(attention.ENLCA, ...), ...)`` (a `BlockPartial`).
    """
    config = {**dict(config), **overrides}
    for key in _IGNORED_FIELDS:
        config.pop(key, None)
    name = config.pop("attention", "enla")
    if name not in ATTENTION_FNS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_FNS)}, got {name!r}.")
    block = {BLOCK_FIELDS[key]: config.pop(key) for key in list(config) if key in BLOCK_FIELDS}
    fields = set(ENLCN.__dataclass_fields__) - {"parent", "name", "attention_block"}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"unknown ENLCN fields {sorted(unknown)}; known: {sorted(fields | set(BLOCK_FIELDS))}.")
    for fields_, key in ((config, "rgb_mean"), (block, "contrastive_fractions")):
        if isinstance(fields_.get(key), list):
            fields_[key] = tuple(fields_[key])
    attention_fn = ATTENTION_FNS[name]
    if attention_fn is None:
        return ENLCN(attention_block=None, **config)
    return ENLCN(attention_block=BlockPartial(attention.ENLCA, attention_fn=attention_fn, **block), **config)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (works on ShapeDtypeStructs too)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def init_variables(model: ENLCN, key: Array, lr_size: int = 16) -> dict:
    """``model.init`` on a [1, lr_size, lr_size, colors] input (params and random features)."""
    params_key, features_key = jax.random.split(key)
    dummy = jnp.zeros((1, lr_size, lr_size, model.colors), jnp.float32)
    return model.init({"params": params_key, attention.FEATURE_COLLECTION: features_key}, dummy)


# Presets: the authors' models and small ones for tests and CPU demos.
ENLCN_X2 = functools.partial(ENLCN, scale=2)
ENLCN_X3 = functools.partial(ENLCN, scale=3)
ENLCN_X4 = functools.partial(ENLCN, scale=4)
#: EDSR baseline without attention (ablation "no attention").
EDSR_X4 = functools.partial(ENLCN, scale=4, attention_block=None)
#: The exact non-local attention ablation (NLA): softmax attention in every block.
NLA_BLOCK = functools.partial(attention.ENLCA, attention_fn=attention.softmax_attention)
#: Two ResBlocks, 16 channels, attention before and after them (tests).
ENLCN_TINY = functools.partial(
    ENLCN,
    num_resblocks=2,
    features=16,
    attention_every=2,
    attention_block=functools.partial(attention.ENLCA, num_features=32),
)
#: Eight ResBlocks, 32 channels (the golden file's reduced model; CPU demos).
ENLCN_SMALL = functools.partial(ENLCN, num_resblocks=8, features=32)

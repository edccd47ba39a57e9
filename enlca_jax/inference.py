"""Whole-image super-resolution with an ENLCN: plain, self-ensemble ×8, tiled, and the authors' chop.

All functions take LR images as [H, W, C] or [B, H, W, C] (any H, W ≥ 1): float in
[0, rgb_range], or uint8 / uint16 (divided by 255 / 65535 and scaled to rgb_range); they
return float32 SR images [..., s·H, s·W, C] (not clipped or quantised; evaluation does that).

Tiled inference (`predict_tiled`) keeps the attention global: ENLA's key sums ``φ(K)ᵀV`` and
``φ(K)ᵀ1`` are accumulated over all tiles of an image and shared by every tile (exact NLA: every
tile's queries attend to the keys and values of all tiles, held for the whole image), and the
convolutions between attention blocks are run tile by tile with halos wide enough that the
result equals untiled inference up to float rounding. The authors' ``--chop`` (`predict_chop`)
instead runs each quadrant as a separate image, so its attention is global only per quadrant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enlca_jax import attention, models

Array = jax.Array


#: How far float images may stray outside [0, rgb_range] (rounding of earlier processing).
RANGE_TOLERANCE = 0.01


def validate_images(images: Any, colors: int = 3, rgb_range: float = 1.0) -> tuple[np.ndarray, bool]:
    """Check an LR batch and return it as float32 [B, H, W, C] in [0, rgb_range], and whether it
    was unbatched. uint8 and uint16 images are scaled from [0, 255] / [0, 65535]; float (or other
    integer) images must already lie in [0, rgb_range]."""
    x = np.asarray(images)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected an image [H, W, {colors}] or a batch [B, H, W, {colors}], got shape {x.shape}.")
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.shape[-1] != colors:
        raise ValueError(f"expected {colors} colour channels (last axis), got shape {x.shape}.")
    if 0 in x.shape:
        raise ValueError(f"empty image batch: shape {x.shape}.")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"images must be real numbers, got dtype {x.dtype}.")
    if x.dtype in (np.uint8, np.uint16):
        return (x.astype(np.float32) * np.float32(rgb_range / np.iinfo(x.dtype).max)), single
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or infinite values.")
    low, high = float(x.min()), float(x.max())
    if low < -RANGE_TOLERANCE * rgb_range or high > (1 + RANGE_TOLERANCE) * rgb_range:
        raise ValueError(
            f"{x.dtype} images must lie in [0, {rgb_range:g}] (the model's rgb_range), got values in [{low:g}, "
            f"{high:g}]; pass uint8 images as they are (they are divided by 255) or scale floats to [0, {rgb_range:g}]."
        )
    return x, single


@functools.lru_cache(maxsize=32)
def _forward(model: models.ENLCN) -> Callable[..., Array]:
    return jax.jit(lambda variables, x, mask=None: model.apply(variables, x, mask=mask))


def forward(model: models.ENLCN, variables: Any, x: Array, mask: Array | None = None) -> Array:
    """Jitted eval-mode ``model.apply`` (compiled once per model and shape). [B,H,W,C] → [B,sH,sW,C]."""
    return _forward(model)(variables, x, mask)


def dihedral(x: Array, index: int, inverse: bool = False) -> Array:
    """One of the 8 flips/rotations of [B, H, W, C] images (index 0..7), or its inverse."""
    rotations, flip = index % 4, index >= 4
    if not inverse:
        x = jnp.flip(x, axis=2) if flip else x
        return jnp.rot90(x, rotations, axes=(1, 2))
    x = jnp.rot90(x, -rotations, axes=(1, 2))
    return jnp.flip(x, axis=2) if flip else x


def _apply(fn: Callable[[Array], Array], x: np.ndarray, self_ensemble: bool) -> Array:
    if not self_ensemble:
        return fn(jnp.asarray(x))
    outputs = [dihedral(fn(dihedral(jnp.asarray(x), i)), i, inverse=True) for i in range(8)]
    return sum(outputs[1:], outputs[0]) / 8.0


def predict(
    model: models.ENLCN,
    variables: Any,
    images: Any,
    *,
    self_ensemble: bool = False,
    tile_size: int | None = None,
    chop: bool = False,
    pad_multiple: int | None = None,
) -> np.ndarray:
    """Super-resolve LR images.

    Args:
      model, variables: an ENLCN and its variables.
      images: [H, W, C] or [B, H, W, C]: float in [0, rgb_range] or uint8 / uint16 (scaled).
      self_ensemble: average over the 8 flips/rotations (the "+" results in SR papers).
      tile_size: if set, run `predict_tiled` with LR tiles of this size (global attention,
        equal to untiled inference; bounds activation memory for large images).
      chop: run the authors' ``--chop`` (`predict_chop`) instead; changes the result.
      pad_multiple: pad H and W up to multiples of this (bottom/right) and mask the padding out
        of the attention sums and conv inputs: the result equals unpadded inference, and images
        of many sizes share a few compiled shapes.

    Returns:
      SR images [..., s·H, s·W, C] float32 (same batching as the input).

    Raises:
      ValueError: images of the wrong shape, dtype or range; FloatingPointError: a non-finite
      output (from non-finite variables).
    """
    x, single = validate_images(images, model.colors, model.rgb_range)
    if sum(option is not None and option is not False for option in (tile_size, chop, pad_multiple)) > 1:
        raise ValueError("choose one of tile_size (global attention), chop (authors' quadrants), pad_multiple.")
    if chop:
        fn = functools.partial(predict_chop_batch, model, variables)
    elif tile_size is not None:
        fn = functools.partial(predict_tiled_batch, model, variables, tile_size=tile_size)
    elif pad_multiple is not None:
        fn = functools.partial(predict_padded_batch, model, variables, multiple=pad_multiple)
    else:
        fn = functools.partial(forward, model, variables)
    out = np.asarray(_apply(fn, x, self_ensemble), np.float32)
    if not np.all(np.isfinite(out)):
        # The input is finite (checked above): the variables are not, or overflow in the model.
        raise FloatingPointError(
            "the model's output contains NaN or infinite values although the images are finite: check that the "
            "variables are finite (a corrupt or diverged checkpoint); at large activations give the ENLCA blocks "
            "attention_fn=functools.partial(attention.efficient_attention, stabilize=True)."
        )
    return out[0] if single else out


def bucket_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``multiple``."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def predict_padded_batch(model: models.ENLCN, variables: Any, x: Array, *, multiple: int) -> Array:
    """[B, H, W, C] → [B, sH, sW, C] through a forward on the bucket shape with the padding masked."""
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"pad_multiple must be a positive integer, got {multiple!r}.")
    batch, height, width, _ = x.shape
    padded_h, padded_w = bucket_shape(height, width, multiple)
    padded = jnp.pad(jnp.asarray(x), ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
    mask = jnp.zeros((batch, padded_h, padded_w), bool).at[:, :height, :width].set(True)
    out = forward(model, variables, padded, mask)
    return out[:, : height * model.scale, : width * model.scale]


# ---------------------------------------------------------------------------------------------
# Tiled inference with global attention
# ---------------------------------------------------------------------------------------------


def _tiles(height: int, width: int, size: int) -> Iterator[tuple[slice, slice]]:
    for top in range(0, height, size):
        for left in range(0, width, size):
            yield slice(top, min(top + size, height)), slice(left, min(left + size, width))


def _with_halo(region: slice, halo: int, limit: int) -> tuple[slice, slice]:
    """The region grown by ``halo`` (clamped to the image) and where the region sits inside it."""
    start, stop = max(0, region.start - halo), min(limit, region.stop + halo)
    return slice(start, stop), slice(region.start - start, region.start - start + region.stop - region.start)


@functools.lru_cache(maxsize=32)
def _stage_fns(model: models.ENLCN) -> dict[str, Callable[..., Array]]:
    def embed(variables, x):
        return model.apply(variables, x, method=lambda m, x: m.embed(x))

    def resblocks(variables, x, start, stop):
        def run(m, x):
            for index in range(start, stop):
                x = m.resblocks[index](x)
            return x

        return model.apply(variables, x, method=run)

    def summarize(variables, x, index):
        return model.apply(variables, x, method=lambda m, x: m.attention[index].summarize(x))

    def attend(variables, x, summary, index):
        return model.apply(variables, x, summary, method=lambda m, x, s: m.attention[index].apply_with_summary(x, s))

    def reconstruct(variables, trunk, skip):
        return model.apply(variables, trunk, skip, method=lambda m, t, s: m.reconstruct(t, s))

    return {
        "embed": jax.jit(embed),
        "resblocks": jax.jit(resblocks, static_argnums=(2, 3)),
        "summarize": jax.jit(summarize, static_argnums=(2,)),
        "attend": jax.jit(attend, static_argnums=(3,)),
        "reconstruct": jax.jit(reconstruct),
    }


def _segments(model: models.ENLCN) -> list[tuple[str, int, int]]:
    """The trunk as ('attention', j, j) and ('resblocks', first, stop) runs."""
    segments: list[tuple[str, int, int]] = []
    for kind, index in model.layout:
        if kind == "resblock" and segments and segments[-1][0] == "resblocks":
            segments[-1] = ("resblocks", segments[-1][1], index + 1)
        elif kind == "resblock":
            segments.append(("resblocks", index, index + 1))
        else:
            segments.append(("attention", index, index))
    return segments


def predict_tiled_batch(model: models.ENLCN, variables: Any, x: Array, *, tile_size: int) -> Array:
    """Tiled inference with global attention on a batch [B, H, W, C] → [B, sH, sW, C].

    Memory: the full LR-resolution trunk (two [B, H, W, features] float32 arrays, on the host) plus
    one tile's activations, instead of every layer's activations of the whole image; with exact
    NLA also one block's keys and values of the whole image ([B, H·W, features·5/4]), which every
    tile attends to (so tiled NLA is exact global attention too).
    """
    if int(tile_size) != tile_size or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}.")
    block = model.block()
    if block is not None and block.attention_fn not in (attention.efficient_attention, attention.softmax_attention):
        raise ValueError(
            "tiled inference needs ENLA or exact NLA in the attention blocks (their key summaries combine over "
            f"tiles), not {block.attention_fn!r}."
        )
    fns = _stage_fns(model)
    x = np.asarray(x, np.float32)
    batch, height, width, _ = x.shape
    tiles = list(_tiles(height, width, tile_size))

    def conv_stage(source: np.ndarray, halo: int, fn: Callable[[Array], Array], out_scale: int = 1) -> np.ndarray:
        out = None
        for rows, cols in tiles:
            grown_rows, inner_rows = _with_halo(rows, halo, height)
            grown_cols, inner_cols = _with_halo(cols, halo, width)
            piece = np.asarray(fn(jnp.asarray(source[:, grown_rows, grown_cols])))
            if out is None:
                out = np.empty((batch, height * out_scale, width * out_scale, piece.shape[-1]), np.float32)
            s = out_scale
            out[:, rows.start * s : rows.stop * s, cols.start * s : cols.stop * s] = piece[
                :, inner_rows.start * s : inner_rows.stop * s, inner_cols.start * s : inner_cols.stop * s
            ]
        return out

    skip = conv_stage(x, 1, lambda t: fns["embed"](variables, t))  # head conv 3×3: halo 1
    trunk = skip
    for kind, start, stop in _segments(model):
        if kind == "resblocks":  # two 3×3 convs per ResBlock: halo 2 each
            trunk = conv_stage(
                trunk, 2 * (stop - start), lambda t, a=start, b=stop: fns["resblocks"](variables, t, a, b)
            )
            continue
        summary = None  # attention: pointwise convs; every tile attends to the keys of all tiles
        for rows, cols in tiles:
            part = fns["summarize"](variables, jnp.asarray(trunk[:, rows, cols]), start)
            summary = part if summary is None else attention.combine_summaries(summary, part)
        trunk = conv_stage(trunk, 0, lambda t, s=summary, j=start: fns["attend"](variables, t, s, j))
    # Body conv, then per upsampler stage one conv, then the tail conv: each needs 1 LR pixel.
    halo = 2 + len(models.upsampler_factors(model.scale))
    both = np.concatenate([trunk, skip], axis=-1)
    features = trunk.shape[-1]
    return jnp.asarray(
        conv_stage(
            both,
            halo,
            lambda t: fns["reconstruct"](variables, t[..., :features], t[..., features:]),
            out_scale=model.scale,
        )
    )


# ---------------------------------------------------------------------------------------------
# The authors' --chop (EDSR forward_chop with ENLCA's rounding)
# ---------------------------------------------------------------------------------------------


def predict_chop_batch(
    model: models.ENLCN, variables: Any, x: Array, *, shave: int = 10, min_size: int = 120000
) -> Array:
    """The authors' ``forward_chop`` (src/model/__init__.py) on [B, H, W, C] → [B, sH, sW, C].

    Four overlapping quadrants of (H/2 + shave, W/2 + shave), height raised to the next multiple
    of 4 and width to the next multiple of 8 (always adding at least 1, as their code does),
    each run as its own image (so attention is global only within a quadrant), recursing while a
    quadrant has ``min_size`` pixels or more. Quadrants larger than the image are clamped to it,
    and recursion stops where a quadrant would be the whole input (tiny images).
    """
    x = jnp.asarray(x)
    scale = model.scale
    _, h, w, _ = x.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size = h_half + shave, w_half + shave
    h_size = min(h, h_size + 4 - h_size % 4)
    w_size = min(w, w_size + 8 - w_size % 8)
    pieces = [
        x[:, 0:h_size, 0:w_size],
        x[:, 0:h_size, w - w_size : w],
        x[:, h - h_size : h, 0:w_size],
        x[:, h - h_size : h, w - w_size : w],
    ]
    if w_size * h_size < min_size or (h_size, w_size) == (h, w):  # (no progress: stop recursing)
        outs = [forward(model, variables, piece) for piece in pieces]
    else:
        outs = [predict_chop_batch(model, variables, piece, shave=shave, min_size=min_size) for piece in pieces]
    h, w, h_half, w_half = scale * h, scale * w, scale * h_half, scale * w_half
    h_size, w_size = scale * h_size, scale * w_size
    top = jnp.concatenate([outs[0][:, 0:h_half, 0:w_half], outs[1][:, 0:h_half, w_size - w + w_half : w_size]], axis=2)
    bottom = jnp.concatenate(
        [
            outs[2][:, h_size - h + h_half : h_size, 0:w_half],
            outs[3][:, h_size - h + h_half : h_size, w_size - w + w_half : w_size],
        ],
        axis=2,
    )
    return jnp.concatenate([top, bottom], axis=1)


def predict_tiled(model: models.ENLCN, variables: Any, images: Any, tile_size: int, **kwargs: Any) -> np.ndarray:
    """`predict` with ``tile_size`` set (global attention, bounded activation memory)."""
    return predict(model, variables, images, tile_size=tile_size, **kwargs)


def predict_chop(model: models.ENLCN, variables: Any, images: Any, **kwargs: Any) -> np.ndarray:
    """`predict` with the authors' chop."""
    return predict(model, variables, images, chop=True, **kwargs)

"""The last upsampling stage, its pixel shuffle and the tail conv, fused (XLA:CPU fast path of `ENLCN`).

ENLCN ends with ``tail(PixelShuffle_r(conv_up(x) + b_up))``: a 3×3 conv to r²·C channels, a pixel
shuffle to r× the resolution, and a 3×3 conv to 3 colours. Written that way, the shuffled tensor
(C channels at the output resolution: 604 MB in the ×4 train step, 4 GiB for an LR 512² image)
is copied once by the shuffle forward and once more by its transpose backward, and for a big
image the chunked up-conv first writes all of it into a zeroed buffer; on the CPU these copies
are a tenth of large-image inference (docs/performance.md).

`upsample_and_tail` computes the same function without ever forming the shuffled tensor:

1. The up-conv's output channels are permuted from PyTorch's shuffle order (c, i, j) to
   (i, j, c) (`shuffle_permutation`; a permutation of the kernel's columns, free), so that the
   r² sub-pixels of every input pixel are contiguous blocks of C channels.
2. The tail is a thin-output conv (`conv.thin_output_conv`): its tap outputs are one matmul of
   each sub-pixel's C channels, ``z = u[..., (i, j), :] @ w_tail[C, (ki, kj, colours)]``, which
   reads u in place. Done per chunk of the up-conv (`conv.map_conv_chunks`), so that in
   inference u lives only one chunk at a time.
3. Only z (kh·kw·colours = 27 channels) is shuffled, then its taps are shifted and summed.

Its VJP keeps u in the (i, j, c) order (training forms it once, no shuffle): ``du = dz @ w_tailᵀ``,
``dw_tail = dzᵀ u``, and the up-conv's gradients from `conv.conv_general_dilated`'s VJP.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from enlca_jax.cpu import conv

Array = jax.Array

_NHWC = ("NHWC", "HWIO", "NHWC")


def shuffle_permutation(channels: int, factor: int) -> np.ndarray:
    """p with ``x[..., p]`` in (i, j, c) order for x in PixelShuffle's (c, i, j) order (``c·r² + i·r + j``)."""
    if channels % (factor * factor):
        raise ValueError(f"{channels} channels do not divide into {factor}² sub-pixels.")
    return np.arange(channels).reshape(-1, factor, factor).transpose(1, 2, 0).reshape(-1)


def _same_padding(kernel: Array) -> tuple:
    """'SAME' padding of a stride-1 conv with this HWIO kernel, as ((top, bottom), (left, right))."""
    return tuple((int(lo), int(hi)) for lo, hi in lax.padtype_to_pads((1, 1), kernel.shape[:2], (1, 1), "SAME"))


def _tap_outputs(u: Array, tail_kernel: Array, factor: int, precision: Any) -> Array:
    """u [b, h, w, r²·C] in (i, j, c) order → tail tap outputs per sub-pixel [b, h, w, r², kh·kw·Co] (float32)."""
    return conv.tap_outputs(u.reshape(*u.shape[:3], factor * factor, -1), tail_kernel, precision)


def _finish(z: Array, tail_kernel: Array, tail_bias: Array, factor: int, dtype: Any) -> Array:
    """Sub-pixel tap outputs [B, H, W, r², T] → shuffled, shifted and summed, plus bias: [B, rH, rW, Co]."""
    batch, height, width, _, taps = z.shape
    z = z.reshape(batch, height, width, factor, factor, taps).transpose(0, 1, 3, 2, 4, 5)
    z = z.reshape(batch, height * factor, width * factor, taps)
    y = conv.add_shifted_taps(z, tail_kernel.shape[:2], _same_padding(tail_kernel))
    return (y + tail_bias).astype(dtype)


def _permuted(up_kernel: Array, up_bias: Array, factor: int) -> tuple[Array, Array]:
    perm = shuffle_permutation(up_kernel.shape[-1], factor)
    return up_kernel[..., perm], up_bias[perm]


def _masked(u: Array, mask: Array | None) -> Array:
    return u if mask is None else u * mask[..., None].astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def upsample_and_tail(
    x: Array,
    up_kernel: Array,
    up_bias: Array,
    tail_kernel: Array,
    tail_bias: Array,
    mask: Array | None,
    factor: int,
    precision: Any = None,
) -> Array:
    """``conv(tail, mask · PixelShuffle_r(conv(up, x) + b_up)) + b_tail``, both convs 'SAME', stride 1.

    Args:
      x: [B, H, W, Ci].
      up_kernel, up_bias: [kh, kw, Ci, r²·C], [r²·C], output channels in PixelShuffle's order.
      tail_kernel, tail_bias: [kh', kw', C, Co], [Co] with kh'·kw'·Co small (the tap outputs per
        sub-pixel: 27 for a 3×3 conv to RGB).
      mask: None, or [B, H, W] (True/1 for real pixels); each masked pixel's r² sub-pixels are
        zeroed before the tail conv (as `models.apply_mask` on the shuffled image).
      factor: r.
      precision: of the convs and matmuls.

    Returns:
      [B, r·H, r·W, Co], in the dtype of x and the kernels.
    """
    up_kernel, up_bias = _permuted(up_kernel, up_bias, factor)

    def chunk(x_chunk: Array, pads: tuple, *mask_chunk: Array) -> Array:
        u = conv.xla_conv(x_chunk, up_kernel, pads, precision, None) + up_bias
        return _tap_outputs(_masked(u, mask_chunk[0] if mask_chunk else None), tail_kernel, factor, precision)

    extras = () if mask is None else (mask,)
    z = conv.map_conv_chunks(chunk, x, _same_padding(up_kernel), up_kernel.shape[:2], extras)
    return _finish(z, tail_kernel, tail_bias, factor, jnp.result_type(x, up_kernel, tail_kernel))


def _forward(x, up_kernel, up_bias, tail_kernel, tail_bias, mask, factor, precision):
    kernel, bias = _permuted(up_kernel, up_bias, factor)
    u = conv.conv_general_dilated(x, kernel, (1, 1), _same_padding(kernel), dimension_numbers=_NHWC,
                                  precision=precision)  # fmt: skip
    u = _masked(u + bias, mask)  # [B, H, W, r²·C], (i, j, c) order
    z = _tap_outputs(u, tail_kernel, factor, precision)
    y = _finish(z, tail_kernel, tail_bias, factor, jnp.result_type(x, up_kernel, tail_kernel))
    return y, (x, kernel, u, tail_kernel, mask)


def _backward(factor, precision, residuals, dy):
    x, kernel, u, tail_kernel, mask = residuals
    batch, height, width, channels = u.shape
    # Tail: dz per output pixel, un-shuffled to [B, H, W, r², T] (27 channels: cheap).
    dz = conv.shifted_taps(dy.astype(u.dtype), tail_kernel.shape[:2], _same_padding(tail_kernel))
    taps = dz.shape[-1]
    dz = dz.reshape(batch, height, factor, width, factor, taps).transpose(0, 1, 3, 2, 4, 5)
    dz = dz.reshape(batch, height, width, factor * factor, taps)
    sub = u.reshape(batch, height, width, factor * factor, -1)
    du, d_tail = conv.tap_outputs_vjp(dz, sub, tail_kernel, precision)
    du = _masked(du.reshape(batch, height, width, channels), mask).astype(u.dtype)
    d_tail = d_tail.astype(tail_kernel.dtype)
    d_tail_bias = jnp.sum(dy, axis=(0, 1, 2), dtype=jnp.float32).astype(tail_kernel.dtype)
    # Up-conv: its own VJP (tap matmuls or XLA's), then the channel permutation undone.
    _, conv_vjp = jax.vjp(
        lambda x, w: conv.conv_general_dilated(
            x, w, (1, 1), _same_padding(w), dimension_numbers=_NHWC, precision=precision
        ),  # fmt: skip
        x,
        kernel,
    )
    dx, d_kernel = conv_vjp(du)
    inverse = np.argsort(shuffle_permutation(channels, factor))
    d_bias = jnp.sum(du, axis=(0, 1, 2), dtype=jnp.float32)[inverse].astype(kernel.dtype)
    return dx, d_kernel[..., inverse], d_bias, d_tail, d_tail_bias, None  # no gradient for the mask


upsample_and_tail.defvjp(_forward, _backward)

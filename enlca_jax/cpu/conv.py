"""Convolution with a faster kernel gradient on XLA:CPU: a drop-in ``conv_general_dilated`` for flax.

XLA:CPU runs a 3×3 convolution and its input gradient through Eigen's spatial convolution at
close to the machine's matmul rate, but it lowers the *kernel* gradient (the correlation of the
input with the output gradient, contracting over batch and space) to a path about three times
slower, the largest single cost of a CPU train step (``benchmarks/conv.py`` measures it).

`conv_general_dilated` below computes the same function as ``jax.lax.conv_general_dilated`` and
keeps XLA's forward and input gradient, but writes the kernel gradient of a stride-1, undilated,
ungrouped 2-D NHWC×HWIO convolution as one matmul per kernel tap:

    dW[i, j] = Σ_{b,h,w} x_pad[b, h+i, w+j, :]ᵀ dy[b, h, w, :]        # [C_in, C_out]

(kh·kw dots of [B·H_out·W_out, C_in]ᵀ × [B·H_out·W_out, C_out]). The forward and the input
gradient (itself a stride-1 convolution of ``dy`` with the flipped, transposed kernel) are run by
XLA in chunks (`chunked_conv`), because XLA:CPU's convolution is slower when one call covers more
than a few images or a very large image: big convolutions are a loop over chunks of at most
`MAX_CHUNK_IMAGES` images and `MAX_CHUNK_PIXELS` output pixels, split along the batch and, for a
single large image, into row bands with their halo. A convolution with few output channels
(kh·kw·C_out ≤ C_in, C_out < `MIN_TAP_CHANNELS`: the ENLCN tail, 256 → 3) is one matmul to all
tap outputs and a shift-add (`thin_output_conv`), with a matmul VJP. Every other convolution falls
through to ``jax.lax.conv_general_dilated`` unchanged. (XLA's cost analysis counts a loop body
once: count FLOPs on the same model with XLA's own convolutions.) Use it with flax as
``nn.Conv(..., conv_general_dilated=conv_general_dilated)``; `enlca_jax.cpu.conv_general_dilated`
is this function plus the fused upsampler tail, for ``ENLCN(conv_general_dilated=...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NHWC = ("NHWC", "HWIO", "NHWC")

#: Below this many input or output channels the per-tap kernel-gradient matmuls are thin and
#: memory-bound (the ×4 tail conv, 256 → 3 channels on 192² pixels, ran 2.5× slower that way);
#: such convs go to `thin_output_conv` when their tap outputs fit (kh·kw·C_out ≤ C_in), else to XLA.
MIN_TAP_CHANNELS = 16

#: Largest chunk one XLA convolution call gets in `chunked_conv`: images, and output pixels
#: (images × H_out × W_out). One 256² image (65536 pixels) runs at full speed in one call, and
#: smaller chunks cost more in copies than they gain (docs/performance.md).
MAX_CHUNK_IMAGES = 4
MAX_CHUNK_PIXELS = 65536


def _is_nhwc_hwio(dimension_numbers: Any, ndim: int) -> bool:
    """True when the dimension numbers mean NHWC input, HWIO kernel, NHWC output."""
    if ndim != 4:
        return False
    try:
        given = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
        wanted = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)
    except (TypeError, ValueError):
        return False
    return tuple(given) == tuple(wanted)


def _explicit_padding(padding: Any, in_spatial: Sequence[int], kernel_spatial: Sequence[int]) -> tuple | None:
    """Padding as ((lo, hi), (lo, hi)) for stride 1, or None if it is not a form handled here."""
    if isinstance(padding, str):
        try:
            pads = lax.padtype_to_pads(in_spatial, kernel_spatial, (1,) * len(in_spatial), padding)
        except (TypeError, ValueError):
            return None
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        return None
    if len(pads) != len(in_spatial) or any(lo < 0 or hi < 0 for lo, hi in pads):
        return None
    return pads


def xla_conv(x: Array, w: Array, padding: tuple, precision: Any, preferred_element_type: Any) -> Array:
    """One stride-1 NHWC×HWIO ``lax.conv_general_dilated`` call with explicit padding."""
    return lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        padding,
        dimension_numbers=_NHWC,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def kernel_gradient(x: Array, dy: Array, kernel_shape: Sequence[int], padding: tuple, precision: Any = None) -> Array:
    """dL/dW of a stride-1 NHWC×HWIO conv: x [B, H, W, Ci], dy [B, Ho, Wo, Co] → [kh, kw, Ci, Co].

    One [B·Ho·Wo, Ci]ᵀ × [B·Ho·Wo, Co] matmul per kernel tap (see the module docstring),
    accumulated and returned in float32 whatever the input dtype.
    """
    kh, kw = kernel_shape[0], kernel_shape[1]
    batch, ho, wo, co = dy.shape
    ci = x.shape[-1]
    # Two batch halves as one batched dot, summed: XLA:CPU runs [2, M/2, C] batched dots ≈8 %
    # faster than one [M, C]ᵀ[M, C] dot with a very long contraction.
    chunks = 2 if batch % 2 == 0 else 1
    x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    dy_rows = dy.reshape(chunks, -1, co)
    taps = []
    for i in range(kh):
        for j in range(kw):
            patch = x_pad[:, i : i + ho, j : j + wo, :].reshape(chunks, -1, ci)
            tap = lax.dot_general(
                patch, dy_rows, (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=jnp.float32
            )
            taps.append(tap.sum(0))
    return jnp.stack(taps).reshape(kh, kw, ci, co)


def tap_matrix(w: Array) -> Array:
    """[kh, kw, Ci, Co] → [Ci, kh·kw·Co], columns ordered (i, j, Co)."""
    kh, kw, ci, co = w.shape
    return w.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def thin_output_conv(
    x: Array, w: Array, padding: tuple, precision: Any = None, preferred_element_type: Any = None
) -> Array:
    """Stride-1 conv with few output channels: x [B, H, W, Ci] * w [kh, kw, Ci, Co] → [B, Ho, Wo, Co].

    One matmul to all kh·kw·Co tap outputs at once, then a shift-add of the taps:

        z = x @ w[Ci, (i, j, Co)]                    # [B, H, W, kh·kw·Co], float32 accumulation
        y[b, h, w] = Σ_{i,j} z_pad[b, h + i, w + j, (i, j)]

    (padding z equals padding x: z is linear per pixel). Its VJP is one matmul each, too: with
    ``dz`` [B, H, W, kh·kw·Co] the output gradient shifted back per tap (`shifted_taps`),
    ``dx = dz @ wᵀ`` and ``dw = dzᵀ x``. XLA:CPU's own convolution and its gradients are
    memory-bound and slow on such shapes (the ×4 tail conv: 256 → 3 channels at the output
    resolution); this way runs it at matmul speed.
    """
    z = tap_outputs(x, w, precision)
    return add_shifted_taps(z, w.shape[:2], padding).astype(preferred_element_type or jnp.result_type(x, w))


def tap_outputs(x: Array, w: Array, precision: Any = None) -> Array:
    """x [..., Ci] → z [..., kh·kw·Co] = x @ `tap_matrix` (w): every tap's output per pixel, float32."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(x, tap_matrix(w), dims, precision=precision, preferred_element_type=jnp.float32)


def tap_outputs_vjp(dz: Array, x: Array, w: Array, precision: Any = None) -> tuple[Array, Array]:
    """Cotangents of `tap_outputs`: dz [..., kh·kw·Co], x [..., Ci] → dx [..., Ci], dw [kh, kw, Ci, Co] (float32)."""
    kh, kw, ci, co = w.shape
    dx = lax.dot_general(dz, tap_matrix(w), (((dz.ndim - 1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # fmt: skip
    # [kh·kw·Co, Ci]: XLA:CPU runs this orientation of the pixel contraction ≈ 3× faster than [Ci, ...].
    rows = x.size // ci
    dw = lax.dot_general(dz.reshape(rows, -1), x.reshape(rows, ci), (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # fmt: skip
    return dx, dw.reshape(kh, kw, co, ci).transpose(0, 1, 3, 2)


def add_shifted_taps(z: Array, kernel_size: Sequence[int], padding: tuple) -> Array:
    """Tap outputs z [B, H, W, kh·kw·Co] ((i, j, Co) order) → y [B, Ho, Wo, Co].

    ``y[:, h, w] = Σ_{i,j} z_pad[:, h + i, w + j, (i, j)]`` with z zero-padded by ``padding``."""
    kh, kw = kernel_size
    batch, height, width, taps = z.shape
    co = taps // (kh * kw)
    (top, bottom), (left, right) = padding
    ho, wo = height + top + bottom - kh + 1, width + left + right - kw + 1
    z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = (i * kw + j) * co
            term = z[:, i : i + ho, j : j + wo, tap : tap + co]
            out = term if out is None else out + term
    return out


def shifted_taps(dy: Array, kernel_size: Sequence[int], padding: tuple) -> Array:
    """dy [B, Ho, Wo, Co] → dz [B, H, W, kh·kw·Co]: tap (i, j) is dy moved by (i − top, j − left).

    The transpose of `add_shifted_taps`."""
    kh, kw = kernel_size
    (top, bottom), (left, right) = padding
    zero = jnp.zeros((), dy.dtype)
    taps = [
        lax.pad(dy, zero, ((0, 0, 0), (i - top, kh - 1 - i - bottom, 0), (j - left, kw - 1 - j - right, 0), (0, 0, 0)))
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(taps, axis=-1)


def _thin_fwd(x, w, padding, precision, preferred_element_type):
    return thin_output_conv(x, w, padding, precision, preferred_element_type), (x, w)


def _thin_bwd(padding, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    dz = shifted_taps(dy.astype(x.dtype), w.shape[:2], padding)  # [B, H, W, kh·kw·Co]
    dx, dw = tap_outputs_vjp(dz, x, w, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


thin_output_conv.defvjp(_thin_fwd, _thin_bwd)


def map_conv_chunks(fn: Callable[..., Any], x: Array, padding: tuple, kernel_size: Sequence[int], extras=()) -> Any:
    """Run a stride-1 convolution-like ``fn`` over the chunks of `chunked_conv` and reassemble.

    Args:
      fn: ``fn(x_chunk, padding_chunk, *extra_chunks)`` → pytree of arrays [b, ho, Wo, ...] for a
        chunk of b images and ho output rows (x_chunk holds the input rows it needs, halo included).
      x: [B, H, W, Ci].
      padding: ((top, bottom), (left, right)), non-negative.
      kernel_size: (kh, kw).
      extras: arrays [B, Ho, Wo, ...] aligned with the output, cut like it.

    Returns:
      The pytree of ``fn`` with arrays [B, Ho, Wo, ...]. Whole images are grouped, at most
      `MAX_CHUNK_IMAGES` and `MAX_CHUNK_PIXELS` output pixels per call (the group size divides
      B); an image with more output pixels than that is cut into row bands of equal height, each
      read with its kh − 1 halo rows (the last band padded below and cropped).
    """
    batch, height, width, _ = x.shape
    kh, kw = kernel_size
    (top, bottom), cols = padding
    ho = height + top + bottom - kh + 1
    wo = width + cols[0] + cols[1] - kw + 1
    per_image = ho * wo
    extras = tuple(extras)
    if batch <= MAX_CHUNK_IMAGES and batch * per_image <= MAX_CHUNK_PIXELS:
        return fn(x, padding, *extras)
    if per_image <= MAX_CHUNK_PIXELS:
        group = max(d for d in range(1, MAX_CHUNK_IMAGES + 1) if batch % d == 0 and d * per_image <= MAX_CHUNK_PIXELS)

        def split(a: Array) -> Array:
            return a.reshape(batch // group, group, *a.shape[1:])

        out = lax.map(lambda args: fn(args[0], padding, *args[1]), (split(x), tuple(map(split, extras))))
        return jax.tree_util.tree_map(lambda a: a.reshape(batch, *a.shape[2:]), out)
    bands = -(-ho // max(1, MAX_CHUNK_PIXELS // wo))
    rows = -(-ho // bands)  # the fewest bands that fit, of equal height
    # Rows padded so that band i reads input rows [i·rows, i·rows + rows + kh − 1).
    x_pad = jnp.pad(x, ((0, 0), (top, bottom + bands * rows - ho), (0, 0), (0, 0)))
    extras_pad = tuple(jnp.pad(e, ((0, 0), (0, bands * rows - ho)) + ((0, 0),) * (e.ndim - 2)) for e in extras)

    def one_image(args: tuple) -> Any:  # [H_pad, W, Ci] → [Ho, Wo, ...]
        image, image_extras = args

        def band(i: Array) -> Any:
            rows_in = lax.dynamic_slice_in_dim(image, i * rows, rows + kh - 1, axis=0)
            band_extras = (lax.dynamic_slice_in_dim(e, i * rows, rows, axis=0)[None] for e in image_extras)
            return jax.tree_util.tree_map(lambda a: a[0], fn(rows_in[None], ((0, 0), cols), *band_extras))

        out = lax.map(band, jnp.arange(bands))
        return jax.tree_util.tree_map(lambda a: a.reshape(bands * rows, *a.shape[2:])[:ho], out)

    return lax.map(one_image, (x_pad, extras_pad))


def chunked_conv(x: Array, w: Array, padding: tuple, precision: Any = None, preferred_element_type: Any = None):
    """``xla_conv`` run as a loop over chunks: x [B, H, W, Ci] * w [kh, kw, Ci, Co] → [B, Ho, Wo, Co].

    Chunks as in `map_conv_chunks`. The result equals one call up to float summation order (it is
    the same arithmetic).
    """

    def conv(chunk: Array, pads: tuple) -> Array:
        return xla_conv(chunk, w, pads, precision, preferred_element_type)

    return map_conv_chunks(conv, x, padding, w.shape[:2])


def input_gradient(dy: Array, w: Array, padding: tuple, precision: Any = None) -> Array:
    """dL/dx of a stride-1 NHWC×HWIO conv: dy [B, Ho, Wo, Co] → [B, H, W, Ci].

    The correlation of ``dy`` padded by kh − 1 − lo (above/left) and kh − 1 − hi with the kernel
    flipped in space and transposed in channels, run through `chunked_conv`.
    """
    kh, kw = w.shape[0], w.shape[1]
    (top, bottom), (left, right) = padding
    flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    pads = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    if min(min(pair) for pair in pads) < 0:  # padding wider than the kernel: crop dy instead
        dy = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
        pads = ((0, 0), (0, 0))
    return chunked_conv(dy, flipped, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_same_stride1(x: Array, w: Array, padding: tuple, precision: Any = None, preferred_element_type: Any = None):
    """Stride-1 NHWC×HWIO conv ``x [B, H, W, Ci] * w [kh, kw, Ci, Co] → [B, Ho, Wo, Co]`` with
    explicit ``padding`` ((lo, hi), (lo, hi)): `chunked_conv`, with `input_gradient` and
    `kernel_gradient` as its VJP."""
    return chunked_conv(x, w, padding, precision, preferred_element_type)


def _conv_fwd(x, w, padding, precision, preferred_element_type):
    return chunked_conv(x, w, padding, precision, preferred_element_type), (x, w)


def _conv_bwd(padding, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = input_gradient(dy, w, padding, precision).astype(x.dtype)
    dw = kernel_gradient(x, dy, w.shape, padding, precision).astype(w.dtype)
    return dx, dw


conv2d_same_stride1.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``jax.lax.conv_general_dilated`` with the tap-matmul kernel gradient where it applies.

    Applies to 2-D convolutions with NHWC input, HWIO kernel, NHWC output, stride 1, no dilation
    and one group: with at least `MIN_TAP_CHANNELS` input and output channels (`conv2d_same_stride1`),
    or with fewer output channels and kh·kw·C_out ≤ C_in (`thin_output_conv`). Everything else is
    passed to ``jax.lax.conv_general_dilated`` as is.
    """
    ones = (1,) * (lhs.ndim - 2)
    pads = None
    if (
        _is_nhwc_hwio(dimension_numbers, lhs.ndim)
        and tuple(window_strides) == ones
        and tuple(lhs_dilation or ones) == ones
        and tuple(rhs_dilation or ones) == ones
        and feature_group_count == 1
        and batch_group_count == 1
    ):
        pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[0:2])
    kh, kw, cin, cout = rhs.shape if pads is not None else (0, 0, 0, 0)
    if pads is not None and cout < MIN_TAP_CHANNELS and kh * kw * cout <= cin:
        return thin_output_conv(lhs, rhs, pads, precision, preferred_element_type)
    if pads is None or min(cin, cout) < MIN_TAP_CHANNELS:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    return conv2d_same_stride1(lhs, rhs, pads, precision, preferred_element_type)

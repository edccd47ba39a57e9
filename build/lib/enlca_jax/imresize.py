"""MATLAB-exact bicubic ``imresize`` (the convention every SR benchmark LR image is made with).

``imresize(image, scale)`` reproduces MATLAB's ``imresize(I, scale, 'bicubic')``: the Keys cubic
kernel with a = −0.5, a kernel widened by 1/scale when downscaling (antialiasing), MATLAB's
coordinate mapping ``u = x/scale + 0.5·(1 − 1/scale)`` (1-based), symmetric boundary handling,
dimensions resized rows first, and, for uint8 input, rounding (halves away from zero) and
clipping to uint8 after each 1-D pass. It reproduces every MATLAB-made LR file of Set5 and Set14
bit-exactly (see tests/test_imresize.py).

Each 1-D pass is one dense matrix product ``[out, in] @ [in, rest]`` in float64, so a DIV2K image
(2040×1356) is downscaled ×4 in a fraction of a second.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = −0.5 (MATLAB's 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


@functools.lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """The [out_length, in_length] float64 matrix of one MATLAB bicubic 1-D resize.

    Args:
      in_length, out_length: sizes along the axis.
      scale: out/in factor MATLAB uses for the coordinate mapping (e.g. 1/4 or 4).
      antialiasing: widen the kernel by 1/scale when downscaling (MATLAB's default).
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        kernel = lambda x: scale * cubic(scale * x)  # noqa: E731
        kernel_width /= scale
    else:
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # output pixel centres in input coordinates (1-based)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # [out, taps], 1-based
    weights = kernel(u[:, None] - indices)
    weights = weights / np.sum(weights, axis=1, keepdims=True)
    # Symmetric padding: index 0 maps to 1, in+1 to in, and so on (MATLAB's aux vector).
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    sources = mirror[np.mod(indices.astype(np.int64) - 1, mirror.size)]
    matrix = np.zeros((out_length, in_length), np.float64)
    rows = np.broadcast_to(np.arange(out_length)[:, None], sources.shape)
    np.add.at(matrix, (rows, sources), weights)
    return matrix


def _round_uint8(x: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)


def imresize(
    image: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
    antialiasing: bool = True,
) -> np.ndarray:
    """MATLAB ``imresize(image, scale, 'bicubic')``.

    Args:
      image: [H, W] or [H, W, C]; uint8 (rounded to uint8 after each pass, as MATLAB) or float
        (kept as float64 arithmetic, returned float32... see below).
      scale: resize factor, e.g. 1/4 (downscale) or 4 (upscale). For a downscale by an integer s
        the output is floor(H/s) × floor(W/s) (MATLAB gives the same on mod-cropped input).
      output_shape: (H_out, W_out) instead of ``scale``; the per-axis factor is then out/in.
      antialiasing: MATLAB's default True.

    Returns:
      The resized image, uint8 for uint8 input, otherwise float32, with the input's channels.
    """
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"imresize expects [H, W] or [H, W, C], got shape {array.shape}.")
    if 0 in array.shape:
        raise ValueError(f"imresize got an empty image of shape {array.shape}.")
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape.")
    height, width = array.shape[:2]
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        inverse = 1.0 / scale
        if scale < 1 and abs(inverse - round(inverse)) < 1e-9:  # integer downscale: floor(H / s)
            output_shape = (height // round(inverse), width // round(inverse))
        else:
            output_shape = (int(math.ceil(height * scale - 1e-9)), int(math.ceil(width * scale - 1e-9)))
        scales = (scale, scale)
    else:
        scales = (output_shape[0] / height, output_shape[1] / width)
    if min(output_shape) < 1:
        raise ValueError(f"image {height}×{width} is too small for scale {scale}: output {output_shape}.")
    is_uint8 = array.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"imresize supports uint8 and float images, got dtype {array.dtype}.")
    squeeze = array.ndim == 2
    x = array.astype(np.float64)
    if squeeze:
        x = x[..., None]
    # Rows first, then columns (MATLAB's order when both factors are equal).
    for axis, (size, out, factor) in enumerate(zip((height, width), output_shape, scales)):
        if size == out and factor == 1:
            continue
        matrix = resize_matrix(size, out, factor, antialiasing)
        x = np.moveaxis(x, axis, 0)
        rest = x.shape[1:]
        x = (matrix @ x.reshape(size, -1)).reshape((out,) + rest)
        x = np.moveaxis(x, 0, axis)
        if is_uint8:
            x = _round_uint8(x).astype(np.float64)
    if squeeze:
        x = x[..., 0]
    return x.astype(np.uint8) if is_uint8 else x.astype(np.float32)


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left floor(H/s)·s × floor(W/s)·s pixels (how SR benchmarks crop HR images)."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR = imresize(modcrop(HR, s), 1/s): the SR literature's LR convention."""
    return imresize(modcrop(hr, scale), 1.0 / scale)

"""enlca_jax.cpu.subpixel: the fused upsampler stage + pixel shuffle + tail equals the unfused layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import models
from enlca_jax.cpu import conv, subpixel

NHWC = ("NHWC", "HWIO", "NHWC")


def random(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def unfused(x, up_kernel, up_bias, tail_kernel, tail_bias, mask, factor):
    """The layers as the authors write them: conv, PixelShuffle, mask, conv (all XLA)."""
    u = jax.lax.conv_general_dilated(x, up_kernel, (1, 1), "SAME", dimension_numbers=NHWC) + up_bias
    image = models.pixel_shuffle(u, factor)
    if mask is not None:
        image = models.apply_mask(image, mask)
    return jax.lax.conv_general_dilated(image, tail_kernel, (1, 1), "SAME", dimension_numbers=NHWC) + tail_bias


def case(batch, side, factor, channels=16, colors=3, seed=0):
    x = random((batch, side, side, 8), seed)
    up_kernel = random((3, 3, 8, channels * factor * factor), seed + 1) * 0.1
    up_bias = random((channels * factor * factor,), seed + 2) * 0.1
    tail_kernel = random((3, 3, channels, colors), seed + 3) * 0.1
    tail_bias = random((colors,), seed + 4)
    return x, up_kernel, up_bias, tail_kernel, tail_bias


def test_shuffle_permutation_reorders_to_subpixel_blocks():
    x = random((1, 2, 3, 5 * 9), 0)
    perm = subpixel.shuffle_permutation(45, 3)
    blocks = x[..., perm].reshape(1, 2, 3, 3, 3, 5).transpose(0, 1, 3, 2, 4, 5).reshape(1, 6, 9, 5)
    np.testing.assert_array_equal(blocks, models.pixel_shuffle(x, 3))
    with pytest.raises(ValueError, match="sub-pixels"):
        subpixel.shuffle_permutation(10, 2)


@pytest.mark.parametrize(
    "batch,side,factor,masked,images,pixels",
    [
        (2, 6, 2, False, 4, 65536),  # one call
        (3, 5, 3, True, 4, 65536),  # ×3, padded pixels masked
        (6, 4, 2, True, 2, 40),  # groups of 2 images (the loop of conv.map_conv_chunks)
        (1, 9, 2, True, 4, 20),  # row bands of 2 rows, the last one padded and cropped
    ],
)
def test_equals_unfused_layers_values_and_gradients(monkeypatch, batch, side, factor, masked, images, pixels):
    monkeypatch.setattr(conv, "MAX_CHUNK_IMAGES", images)
    monkeypatch.setattr(conv, "MAX_CHUNK_PIXELS", pixels)
    params = case(batch, side, factor)
    mask = None
    if masked:
        mask = np.ones((batch, side, side), bool)
        mask[-1, side - 2 :, :] = False
        mask[-1, :, side - 1 :] = False
        mask = jnp.asarray(mask)
    cotangent = random((batch, side * factor, side * factor, 3), 9)

    def loss(fn):
        return lambda *p: jnp.sum(fn(*p, mask, factor) * cotangent)

    fused = jax.jit(lambda *p: subpixel.upsample_and_tail(*p, mask, factor))(*params)
    np.testing.assert_allclose(fused, unfused(*params, mask, factor), rtol=1e-5, atol=1e-5)
    want = jax.jit(jax.grad(loss(unfused), argnums=range(5)))(*params)
    got = jax.jit(jax.grad(loss(subpixel.upsample_and_tail), argnums=range(5)))(*params)
    for name, g, w in zip(("x", "up_kernel", "up_bias", "tail_kernel", "tail_bias"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()), err_msg=name)


def test_bfloat16_inputs():
    params = case(2, 6, 2)
    low = [p.astype(jnp.bfloat16) for p in params]
    out = subpixel.upsample_and_tail(*low, None, 2)
    assert out.dtype == jnp.bfloat16
    reference = unfused(*[p.astype(jnp.float32) for p in low], None, 2)
    tolerance = 2e-2 * float(jnp.abs(reference).max())
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=0, atol=tolerance)
    grads = jax.grad(lambda *p: jnp.sum(subpixel.upsample_and_tail(*p, None, 2).astype(jnp.float32)), range(5))(*low)
    assert all(g.dtype == jnp.bfloat16 for g in grads)

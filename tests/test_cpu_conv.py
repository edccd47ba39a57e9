"""enlca_jax.cpu.conv: the tap-matmul kernel gradient equals XLA's, and everything else falls through."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import cpu, models
from enlca_jax.cpu import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def value_and_grads(conv_fn, x, w, cotangent, **kwargs):
    def f(x, w):
        return jnp.sum(conv_fn(x, w, **kwargs).astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)


def random(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def assert_matches_lax(x, w, args):
    """conv.conv_general_dilated's value of a random linear loss and its x, w gradients equal lax's."""
    out_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, w, **args)).shape
    cotangent = random(out_shape, 2)
    ref_value, (ref_dx, ref_dw) = value_and_grads(jax.lax.conv_general_dilated, x, w, cotangent, **args)
    value, (dx, dw) = value_and_grads(conv.conv_general_dilated, x, w, cotangent, **args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kernel,padding,in_size",
    [
        ((3, 3), "SAME", (9, 7)),
        ((1, 1), "SAME", (6, 6)),
        ((3, 3), "VALID", (8, 9)),
        ((2, 2), "SAME", (6, 5)),  # asymmetric SAME padding (0, 1)
        ((3, 3), ((2, 0), (1, 3)), (7, 6)),
        ((5, 3), ((2, 2), (1, 1)), (8, 8)),
    ],
)
def test_matches_lax_values_and_gradients(kernel, padding, in_size):
    x = random((2, *in_size, 16), 0)
    w = random((*kernel, 16, 24), 1) * 0.1
    args = {"window_strides": (1, 1), "padding": padding, "dimension_numbers": NHWC}
    assert_matches_lax(x, w, args)


@pytest.mark.parametrize(
    "batch,in_size,padding,images,pixels",
    [
        (6, (5, 4), "SAME", 4, 48),  # groups of 3 images (the largest divisor of 6 that fits)
        (5, (4, 4), "SAME", 2, 1000),  # 5 is prime: one image per call
        (2, (9, 7), "SAME", 4, 20),  # row bands: 20 // 7 = 2 rows per band, 9 rows in 5 bands (one row padded)
        (1, (10, 6), ((2, 0), (1, 3)), 4, 24),  # uneven padding: 10 rows of 8 in 4 bands of 3, two cropped
        (3, (8, 9), "VALID", 1, 7),  # one-row bands
    ],
)
def test_chunked_convolution_equals_one_call(monkeypatch, batch, in_size, padding, images, pixels):
    monkeypatch.setattr(conv, "MAX_CHUNK_IMAGES", images)
    monkeypatch.setattr(conv, "MAX_CHUNK_PIXELS", pixels)
    x = random((batch, *in_size, 16), 0)
    w = random((3, 3, 16, 24), 1) * 0.1
    args = {"window_strides": (1, 1), "padding": padding, "dimension_numbers": NHWC}
    reference = jax.lax.conv_general_dilated(x, w, **args)
    out = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, **args))(x, w)
    assert "scan" in str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, **args))(x, w))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    cotangent = random(reference.shape, 2)
    _, (ref_dx, ref_dw) = value_and_grads(jax.lax.conv_general_dilated, x, w, cotangent, **args)
    _, (dx, dw) = value_and_grads(conv.conv_general_dilated, x, w, cotangent, **args)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kernel,padding,in_size,cin,cout",
    [
        ((3, 3), "SAME", (9, 7), 32, 3),  # the ENLCN tail: 256 → 3
        ((3, 3), "VALID", (8, 9), 27, 3),
        ((1, 1), "SAME", (6, 6), 16, 1),
        ((3, 3), ((2, 0), (1, 3)), (7, 6), 32, 2),  # padding wider than the kernel on one side
        ((5, 3), ((2, 2), (1, 1)), (8, 8), 64, 4),
    ],
)
def test_thin_output_convs_match_lax(kernel, padding, in_size, cin, cout):
    x = random((2, *in_size, cin), 0)
    w = random((*kernel, cin, cout), 1) * 0.1
    args = {"window_strides": (1, 1), "padding": padding, "dimension_numbers": NHWC}
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, **args))(x, w))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    assert_matches_lax(x, w, args)
    forward = jax.jit(lambda x, w: conv.conv_general_dilated(x, w, **args))(x, w)
    np.testing.assert_allclose(forward, jax.lax.conv_general_dilated(x, w, **args), rtol=1e-5, atol=1e-5)


def test_thin_output_conv_in_bfloat16():
    x, w = random((2, 10, 10, 64), 0, jnp.bfloat16), random((3, 3, 64, 3), 1, jnp.bfloat16)
    args = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC}
    cotangent = random((2, 10, 10, 3), 2)
    _, (dx, dw) = value_and_grads(conv.conv_general_dilated, x, w, cotangent, **args)
    out = conv.conv_general_dilated(x, w, **args)
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    _, (ref_dx, ref_dw) = value_and_grads(jax.lax.conv_general_dilated, x32, w32, cotangent, **args)
    reference = jax.lax.conv_general_dilated(x32, w32, **args)
    for got, want in ((out, reference), (dx, ref_dx), (dw, ref_dw)):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_tap_path_is_taken_for_eligible_convs():
    x, w = random((1, 6, 6, 16), 0), random((3, 3, 16, 16), 1)
    jaxpr = jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC))
    assert "custom_vjp_call" in str(jaxpr(x, w))


@pytest.mark.parametrize(
    "case",
    [
        {"window_strides": (2, 2)},
        {"rhs_dilation": (2, 2)},
        {"lhs_dilation": (2, 1), "padding": ((1, 1), (1, 1))},
        {"feature_group_count": 2},
        {"in_channels": 3},  # too few channels: the thin tap matmuls would be slower
        {"out_channels": 3},  # 3·3·3 tap outputs > 16 input channels: not thin enough either
        {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    ],
)
def test_other_convs_fall_through_to_lax(case):
    case = dict(case)
    cin, cout = case.pop("in_channels", 16), case.pop("out_channels", 16)
    numbers = case.pop("dimension_numbers", NHWC)
    groups = case.get("feature_group_count", 1)
    if numbers == NHWC:
        x, w = random((2, 8, 8, cin), 0), random((3, 3, cin // groups, cout), 1)
    else:
        x, w = random((2, cin, 8, 8), 0), random((cout, cin, 3, 3), 1)
    kwargs = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": numbers} | case
    jaxpr = jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, **kwargs))(x, w)
    assert "custom_vjp_call" not in str(jaxpr)
    expected = jax.lax.conv_general_dilated(x, w, **kwargs)
    np.testing.assert_array_equal(conv.conv_general_dilated(x, w, **kwargs), expected)


def test_bfloat16_kernel_gradient_is_accumulated_in_float32():
    x, w = random((4, 12, 12, 32), 0, jnp.bfloat16), random((3, 3, 32, 32), 1, jnp.bfloat16)
    cotangent = random((4, 12, 12, 32), 2)
    args = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC}
    _, (_, dw) = value_and_grads(conv.conv_general_dilated, x, w, cotangent, **args)
    assert dw.dtype == jnp.bfloat16
    exact = conv.kernel_gradient(
        x.astype(jnp.float32), cotangent.astype(jnp.bfloat16).astype(jnp.float32), w.shape, ((1, 1), (1, 1))
    )
    np.testing.assert_allclose(np.asarray(dw, np.float32), exact, rtol=1e-2, atol=1e-2 * float(jnp.abs(exact).max()))


def test_flax_conv_accepts_it():
    layer = nn.Conv(20, (3, 3), conv_general_dilated=conv.conv_general_dilated)
    x = random((2, 7, 7, 16), 0)
    variables = layer.init(jax.random.key(0), x)
    reference = nn.Conv(20, (3, 3)).apply(variables, x)
    np.testing.assert_allclose(layer.apply(variables, x), reference, rtol=1e-6, atol=1e-6)


def test_enlcn_gradients_do_not_depend_on_the_conv_implementation():
    x = random((2, 12, 12, 3), 0) * 0.2 + 0.5
    target = random((2, 24, 24, 3), 1) * 0.2 + 0.5
    grads = {}
    variables = models.init_variables(models.ENLCN_TINY(scale=2, features=32), jax.random.key(3))
    for impl, fn in (("xla", None), ("tap_matmul", cpu.conv_general_dilated)):
        model = models.ENLCN_TINY(scale=2, features=32, conv_general_dilated=fn)  # 32 → 3 tail: the thin path

        def loss(params, model=model, variables=variables):
            sr, losses = model.apply({**variables, "params": params}, x, train=True, mutable=["losses"])
            contrastive = sum(jnp.mean(v) for v in jax.tree_util.tree_leaves(losses))
            return jnp.mean(jnp.abs(sr - target)) + 1e-3 * contrastive

        grads[impl] = jax.jit(jax.grad(loss))(variables["params"])
    flat_xla = jax.tree_util.tree_leaves_with_path(grads["xla"])
    flat_tap = jax.tree_util.tree_leaves(grads["tap_matmul"])
    for (path, a), b in zip(flat_xla, flat_tap, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6 * float(jnp.abs(a).max()) + 1e-9, err_msg=str(path))

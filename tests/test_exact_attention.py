"""enlca_jax.exact_attention: blocked (online-softmax) exact attention equals the dense form, values and
gradients, float64 and float32, with masks; no N×L array; any block size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import attention, exact_attention


def normal(seed, shape, dtype="float32"):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def qkv(dtype, batch=(2, 3), n=37, l=53, d=8, c=5, seed=0):
    shapes = ((*batch, n, d), (*batch, l, d), (*batch, l, c))
    return tuple(normal(seed + i, shape, dtype) for i, shape in enumerate(shapes))


def check(dtype, block_size, masked, rtol, atol):
    q, k, v = qkv(dtype)
    mask = jnp.asarray(np.random.default_rng(9).random(k.shape[:-1]) > 0.3) if masked else None
    blocked = functools.partial(exact_attention.blocked_softmax_attention, mask=mask, block_size=block_size)
    dense = functools.partial(exact_attention.dense_softmax_attention, mask=mask)
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), dense(q, k, v), rtol=rtol, atol=atol)
    weights = normal(10, q.shape[:-1] + (v.shape[-1],), dtype)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), (0, 1, 2))(q, k, v) for f in (blocked, dense)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


class TestAgainstDense:
    @pytest.mark.parametrize("block_size", [None, 7, (5, 16), 64])
    @pytest.mark.parametrize("masked", [False, True])
    def test_float64(self, block_size, masked):
        with jax.enable_x64(True):
            check("float64", block_size, masked, rtol=1e-12, atol=1e-13)

    @pytest.mark.parametrize("masked", [False, True])
    def test_float32(self, masked):
        check("float32", (8, 16), masked, rtol=1e-5, atol=1e-5)

    def test_large_logits_are_stable(self):
        # Scores of ±200: exp would overflow float32 without the running max.
        q, k, v = qkv("float32", batch=(1,), n=20, l=40)
        q, k = q * 5, k * 5
        out = exact_attention.blocked_softmax_attention(q, k, v, block_size=8)
        np.testing.assert_allclose(out, exact_attention.dense_softmax_attention(q, k, v), rtol=1e-4, atol=1e-5)
        assert bool(jnp.all(jnp.isfinite(out)))

    def test_a_query_without_valid_keys_is_nan_as_in_the_dense_form(self):
        q, k, v = qkv("float32", batch=(2,), n=4, l=6)
        mask = jnp.asarray([[True] * 6, [False] * 6])
        out = exact_attention.blocked_softmax_attention(q, k, v, mask=mask, block_size=2)
        assert bool(jnp.all(jnp.isfinite(out[0]))) and bool(jnp.all(jnp.isnan(out[1])))


class TestProgram:
    def test_no_quadratic_intermediate(self):
        # N = L = 8192, batch 1: the dense scores alone are 256 MiB; forward and backward stay at
        # a few blocks of 4096 × 1024 scores (16 MiB each: P, dP, dS) and O(N) arrays.
        q, k, v = qkv("float32", batch=(1,), n=8192, l=8192, d=16, c=16)

        def loss(q, k, v):
            return jnp.sum(exact_attention.blocked_softmax_attention(q, k, v) ** 2)

        temp = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        block = 4 * exact_attention.BLOCK_ELEMENTS
        assert temp < 4 * block < 8192 * 8192 * 4 / 2, temp

    def test_block_sizes_from_the_shapes(self):
        assert exact_attention.block_sizes(1, 100, 50) == (100, 50)
        assert exact_attention.block_sizes(4, 9216, 9216) == (1024, 1024)
        assert exact_attention.block_sizes(4, 2304, 2304) == (1152, 768)  # even splits: no padding
        assert exact_attention.block_sizes(16, 2304, 2304) == (330, 768)  # 7 blocks of ≤ 341 rows
        assert exact_attention.block_sizes(1, 34000, 34000) == (3778, 1000)

    def test_vmap_and_the_attention_entry_point(self):
        q, k, v = qkv("float32", batch=(3,))
        out = attention.softmax_attention(q, k, v, None, block_size=9)
        np.testing.assert_allclose(jax.vmap(attention.softmax_attention)(q, k, v), out, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out, exact_attention.dense_softmax_attention(q, k, v), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="block_size must be positive"):
            attention.softmax_attention(q, k, v, block_size=0)

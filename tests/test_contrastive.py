"""enlca_jax.contrastive: exact order statistics and the sort-free loss against a dense sort-based
reference (float64 and float32, values and gradients, ties at every window boundary), no sort in
the program, block-bounded memory, and the top_k fallback."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import attention, contrastive


def enable_x64(on=True):
    """A context in which float64 arrays are float64 (jax computes in float32 by default)."""
    return jax.enable_x64(on)


def dense_reference(q, k, p, s, c, margin, ratio_eps=1e-6):
    """The definition, written with a full descending sort of every row of T = q kᵀ."""
    t = jnp.einsum("...nd,...ld->...nl", q, k)
    ranked = -jnp.sort(-t, axis=-1)
    pos = jnp.mean(jnp.exp(ranked[..., :p]), -1)
    neg = jnp.mean(jnp.exp(ranked[..., s : s + c]), -1)
    return jnp.mean(jax.nn.relu(margin - jnp.log(pos / (neg + ratio_eps))), -1)


def normal(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def assert_same_values_and_gradients(fn, ref, args, rtol, atol):
    argnums = tuple(range(len(args)))

    def value_and_gradients(f):  # one compiled program each (compiling is most of these tests' time)
        return jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b)), argnums)(*a)))(*args)

    (value, ours), (expected, theirs) = value_and_gradients(fn), value_and_gradients(ref)
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol)
    for a, b in zip(ours, theirs, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0  # a gradient that is not clipped away
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


COUNTS = [
    (15, 50, 15),  # the authors'
    (3, 0, 3),  # negatives start at rank 0
    (30, 10, 20),  # the windows overlap
    (1, 79, 1),  # the last rank
]


class TestOrderStatistics:
    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_equal_to_sorting(self, dtype):
        with enable_x64(dtype == "float64"):
            x = normal(0, (6, 41), dtype)
            x = x.at[0].set(0.0).at[1, :20].set(-0.0).at[2, 5:25].set(x[2, 5])  # zeros, −0, ties
            x = x.at[3].set(jnp.asarray([1e-30, -1e-30, 3e38, -3e38] * 10 + [0.0], dtype))
            ranks = (0, 1, 7, 20, 40)
            expected = -jnp.sort(-x, axis=-1)[..., jnp.asarray(ranks)]
            got = jax.jit(contrastive.order_statistics, static_argnums=1)(x, ranks)
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(got, expected)

    def test_keys_keep_the_order(self):
        x = jnp.asarray([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], jnp.float32)
        keys = np.asarray(contrastive.order_keys(x)).astype(np.int64)
        assert np.all(np.diff(keys[[0, 1, 2, 3, 5, 6, 7]]) > 0) and keys[3] == keys[4]
        np.testing.assert_array_equal(contrastive.from_order_keys(contrastive.order_keys(x), jnp.float32), x + 0.0)


class TestAgainstTheDefinition:
    @pytest.mark.parametrize("counts", COUNTS)
    def test_float64_random(self, counts):
        p, s, c = counts
        with enable_x64():
            q, k = normal(1, (3, 70, 8), "float64"), normal(2, (3, 80, 8), "float64")
            # Margin 6: random 8-dim embeddings separate top and lower ranks by more than the
            # authors' margin 1, which would clip every term to 0 and hide the gradients.
            fn = jax.jit(functools.partial(contrastive.contrastive_loss, num_positive=p, negative_start=s,
                                           num_negative=c, margin=6.0, block_rows=16))  # fmt: skip
            ref = functools.partial(dense_reference, p=p, s=s, c=c, margin=6.0)
            assert_same_values_and_gradients(fn, ref, (q, k), rtol=1e-12, atol=1e-14)

    def test_float32_random(self):
        q, k = normal(3, (2, 64, 16), "float32"), normal(4, (2, 96, 16), "float32")
        fn = functools.partial(contrastive.contrastive_loss, margin=8.0, block_rows=24)
        ref = functools.partial(dense_reference, p=15, s=50, c=15, margin=8.0)
        assert_same_values_and_gradients(jax.jit(fn), ref, (q, k), rtol=2e-5, atol=1e-6)

    def test_paper_fractions(self):
        n = 24 * 24
        p, s, c = contrastive.contrastive_counts(n)  # (11, 46, 11)
        with enable_x64():
            q, k = normal(5, (2, n, 8), "float64"), normal(6, (2, n, 8), "float64")
            fn = functools.partial(contrastive.contrastive_loss, num_positive=p, negative_start=s, num_negative=c,
                                   margin=6.0)  # fmt: skip
            ref = functools.partial(dense_reference, p=p, s=s, c=c, margin=6.0)
            assert_same_values_and_gradients(fn, ref, (q, k), rtol=1e-12, atol=1e-14)

    @pytest.mark.parametrize("counts", COUNTS)
    def test_ties_from_duplicated_keys(self, counts):
        # 80 keys drawn from 12 distinct ones: every window boundary falls inside a run of equal
        # scores. Gradients are compared with respect to the 12 distinct keys, which do not
        # depend on how a tied boundary's share is split among its copies.
        p, s, c = counts
        index = jnp.asarray(np.random.default_rng(7).integers(0, 12, 80))
        with enable_x64():
            q, base = normal(8, (2, 50, 8), "float64"), normal(9, (2, 12, 8), "float64")
            fn = lambda q, base: contrastive.contrastive_loss(  # noqa: E731
                q, base[:, index], num_positive=p, negative_start=s, num_negative=c, margin=6.0, block_rows=7
            )
            ref = lambda q, base: dense_reference(q, base[:, index], p, s, c, 6.0)  # noqa: E731
            assert_same_values_and_gradients(fn, ref, (q, base), rtol=1e-12, atol=1e-14)

    def test_constant_image_patch(self):
        # As in an ENLCA block: q, k are normalised 1×1-conv embeddings of an image whose 6×6 top
        # left corner is constant, so 36 positions have identical queries and keys (ties in every
        # row). Gradients with respect to the embedding weights sum over positions.
        x = np.random.default_rng(10).normal(size=(1, 12, 12, 4))
        x[:, :6, :6] = x[:, 0, 0]
        with enable_x64():
            x = jnp.asarray(x.reshape(1, 144, 4))

            def embed(wq, wk):
                q = attention.l2_normalize(x @ wq) * math.sqrt(6)
                k = attention.l2_normalize(x @ wk) * math.sqrt(6)
                return q, k

            fn = lambda wq, wk: contrastive.contrastive_loss(*embed(wq, wk), margin=4.0, block_rows=32)  # noqa: E731
            ref = lambda wq, wk: dense_reference(*embed(wq, wk), 15, 50, 15, 4.0)  # noqa: E731
            w = normal(11, (2, 4, 8), "float64")
            assert_same_values_and_gradients(fn, ref, (w[0], w[1]), rtol=1e-11, atol=1e-14)

    def test_exact_ties_at_each_boundary_count_as_ranked(self):
        # One query, scores chosen by hand: ranks 0-1 are 5, 2-6 are 3, 7-11 are 2, 12-13 are 1.
        # The positive window (ranks 0-3) ends inside the run of 3s; the negative window (ranks
        # 8-12) starts inside the run of 2s and ends inside the run of 1s.
        scores = np.array([5, 5, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 0, 0], np.float64)
        with enable_x64():
            q = jnp.ones((1, 1), jnp.float64)
            k = jnp.asarray(np.random.default_rng(12).permutation(scores)[:, None])
            got = contrastive.contrastive_loss(q, k, num_positive=4, negative_start=8, num_negative=5, margin=9.0)
            ranked = np.sort(scores)[::-1]
            pos, neg = np.exp(ranked[:4]).mean(), np.exp(ranked[8:13]).mean()
            np.testing.assert_allclose(got, max(0.0, 9.0 - math.log(pos / (neg + 1e-6))), rtol=1e-14)


class TestCandidates:
    """Long rows go through the candidate reduction (`contrastive._candidates`)."""

    @pytest.mark.parametrize("counts, keep_scores", [((11, 46, 11), True), ((1, 120, 30), False)])
    def test_long_rows_float64(self, counts, keep_scores):
        p, s, c = counts
        with enable_x64():
            q, k = normal(21, (2, 48, 8), "float64"), normal(22, (2, 900, 8), "float64")
            fn = functools.partial(contrastive.contrastive_loss, num_positive=p, negative_start=s, num_negative=c,
                                   margin=9.0, block_rows=40, keep_scores=keep_scores)  # fmt: skip
            ref = functools.partial(dense_reference, p=p, s=s, c=c, margin=9.0)
            assert_same_values_and_gradients(jax.jit(fn), ref, (q, k), rtol=1e-12, atol=1e-14)

    def test_every_windowed_score_is_a_candidate(self):
        t = normal(23, (64, 900), "float32")
        candidates, overflow = contrastive._candidates(t, 65, 65 + contrastive.SPARE)
        assert not bool(jnp.any(overflow))
        ranked = -jnp.sort(-t, axis=-1)[:, :65]
        np.testing.assert_array_equal(-jnp.sort(-candidates, axis=-1)[:, :65], ranked)

    def test_rows_with_many_equal_scores_fall_back_to_whole_rows(self):
        # 900 keys from 3 distinct ones: every group maximum ties, far more groups than kept.
        index = jnp.asarray(np.random.default_rng(24).integers(0, 3, 900))
        with enable_x64():
            q, base = normal(25, (2, 20, 8), "float64"), normal(26, (2, 3, 8), "float64")
            t = jnp.einsum("bnd,bld->bnl", q, base[:, index])
            assert bool(jnp.all(contrastive._candidates(t, 65, 81)[1]))
            fn = lambda q, base: contrastive.contrastive_loss(q, base[:, index], margin=4.0)  # noqa: E731
            ref = lambda q, base: dense_reference(q, base[:, index], 15, 50, 15, 4.0)  # noqa: E731
            assert_same_values_and_gradients(fn, ref, (q, base), rtol=1e-12, atol=1e-14)

    def test_set_bit_positions(self):
        rng = np.random.default_rng(27)
        mask = rng.random((9, 1000)) < rng.random((9, 1)) * 0.2
        index, count = contrastive._set_bit_positions(jnp.asarray(mask), 97)
        for row in range(9):
            want = np.flatnonzero(mask[row])[:97]
            np.testing.assert_array_equal(index[row, : len(want)], want)
            assert np.all(np.asarray(index[row, len(want) :]) == 1000) and int(count[row]) == mask[row].sum()


class TestProgram:
    def test_no_sort_and_no_top_k(self):
        q, k = normal(13, (2, 100, 8), "float32"), normal(14, (2, 100, 8), "float32")

        def ranking_ops(fn):
            """Sort and top-k ops in the lowered StableHLO and in XLA's optimised HLO of jit(fn)."""
            lowered = jax.jit(fn).lower(q, k)
            ops = re.findall(r"\b(?:stablehlo\.sort|chlo\.top_k|mhlo\.topk)\b", lowered.as_text())
            compiled = lowered.compile().as_text()
            ops += re.findall(r"= \S+ (sort|topk)\(", compiled) + re.findall(r'custom_call_target="\w*TopK', compiled)
            return ops

        def loss(q, k, method="select"):
            return jnp.mean(contrastive.contrastive_loss(q, k, method=method))

        assert ranking_ops(loss) == [] and ranking_ops(jax.grad(loss, (0, 1))) == []
        assert ranking_ops(functools.partial(loss, method="top_k"))  # the check can fail

    def test_memory_is_bounded_by_a_block(self):
        # Batch 2, N = 2048, L = 4096: one whole T is 64 MiB in float32. Without keeping it,
        # forward and backward hold arrays of one block of it (64 queries of both examples, 2 MiB
        # each) and, per row, its candidates (324 scores) and thresholds: the temporaries do not
        # grow with N. Keeping T costs at least T.
        q, k = normal(15, (2, 2048, 16), "float32"), normal(16, (2, 4096, 16), "float32")
        whole = 2 * 2048 * 4096 * 4

        def temporaries(**options):
            loss = functools.partial(contrastive.contrastive_loss, block_rows=128, **options)
            grad = jax.grad(lambda q, k: jnp.mean(loss(q, k)), (0, 1))
            return jax.jit(grad).lower(q, k).compile().memory_analysis().temp_size_in_bytes

        assert temporaries(keep_scores=False) < whole / 3
        assert temporaries() > whole

    def test_top_k_method_is_the_same_loss(self):
        q, k = normal(17, (2, 70, 8), "float32"), normal(18, (2, 90, 8), "float32")
        fns = [functools.partial(contrastive.contrastive_loss, margin=6.0, method=m) for m in ("select", "top_k")]
        assert_same_values_and_gradients(jax.jit(fns[0]), jax.jit(fns[1]), (q, k), rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("block_rows", [1, 7, 70, 500])
    def test_any_block_size_unbatched_and_vmapped(self, block_rows):
        q, k = normal(19, (3, 70, 8), "float32"), normal(20, (3, 75, 8), "float32")
        fn = functools.partial(contrastive.contrastive_loss, margin=6.0, block_rows=block_rows)
        batched = fn(q, k)
        np.testing.assert_allclose(batched, dense_reference(q, k, 15, 50, 15, 6.0), rtol=2e-6)
        np.testing.assert_allclose(jax.vmap(fn)(q, k), batched, rtol=1e-6)
        assert fn(q[0], k[0]).shape == ()
        assert fn(q.reshape(3, 1, 70, 8), k.reshape(3, 1, 75, 8)).shape == (3, 1)

    def test_paper_counts(self):
        assert contrastive.contrastive_counts(2304) == (46, 184, 46)
        assert contrastive.contrastive_counts(144) == (2, 11, 2)
        with pytest.raises(ValueError, match="too few"):
            contrastive.contrastive_counts(10, 0.5, 0.8)
        with pytest.raises(ValueError, match="fractions"):
            contrastive.contrastive_counts(100, 2.0)

    def test_bad_inputs(self):
        q = jnp.ones((2, 40, 8))
        with pytest.raises(ValueError, match=r"65 ranked keys but k has L = 40"):
            contrastive.contrastive_loss(q, q)
        with pytest.raises(ValueError, match="integers"):
            contrastive.contrastive_loss(q, q, num_positive=0)
        with pytest.raises(ValueError, match="disagree"):
            contrastive.contrastive_loss(jnp.ones((2, 70, 8)), jnp.ones((2, 70, 4)))

    def test_bad_options(self):
        q = jnp.ones((2, 70, 8))
        with pytest.raises(ValueError, match="method must be one of"):
            contrastive.contrastive_loss(q, q, method="sort")
        with pytest.raises(ValueError, match="block_rows"):
            contrastive.contrastive_loss(q, q, block_rows=0)

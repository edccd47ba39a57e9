"""Tests of enlca_jax.attention: golden arrays from the authors' code, statistics, API contracts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden

from enlca_jax import attention as A


def nchw_to_tokens(x):
    """[B, C, H, W] -> [B, H*W, C] (row-major positions, as golden/README.md)."""
    b, c, h, w = x.shape
    return np.asarray(x).reshape(b, c, h * w).transpose(0, 2, 1)


def torch_conv(state, name):
    """A PyTorch 1x1 conv's OIHW weight and bias as Flax Conv params (HWIO)."""
    return {
        "kernel": state[f"{name}.weight"].transpose(2, 3, 1, 0),
        "bias": state[f"{name}.bias"],
    }


def golden_module_variables(g):
    state = {k[len("state_dict/") :]: v for k, v in g.items() if k.startswith("state_dict/")}
    return {
        "params": {
            "query": torch_conv(state, "conv_match1.0"),
            "key": torch_conv(state, "conv_match2.0"),
            "value": torch_conv(state, "conv_assembly.0"),
        },
        A.FEATURE_COLLECTION: {"projection": state["attn_fn.projection_matrix"]},
    }


def golden_g(shape):
    """The objective weights G of golden/enlca_module.npz (see its README)."""
    n = int(np.prod(shape))
    g = np.cos(0.1 * np.arange(n, dtype=np.float64)).reshape(shape) / math.sqrt(n)
    return g.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Golden: the authors' outputs.
# ---------------------------------------------------------------------------------------------


class TestGolden:
    """Tolerances from golden/README.md: the stored float32 outputs differ from a float64 run of
    the same code by up to 4e-6 relative (phi) and 2.1e-6 absolute (ENLA), so our float32 result
    can differ from them by about twice that. ENLA outputs cross zero, so they are compared with an
    absolute tolerance (values up to 1.4)."""

    def test_feature_map(self):
        g = load_golden("feature_map.npz")
        fn = jax.jit(A.softmax_kernel_features)
        np.testing.assert_allclose(fn(g["u"], g["F"]), g["phi"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fn(g["u_norm6"], g["F"]), g["phi_norm6"], rtol=1e-5, atol=1e-6)

    def test_enla(self):
        g = load_golden("enla.npz")
        out = jax.jit(A.efficient_attention)(g["Q"], g["K"], g["V"], g["F"])
        np.testing.assert_allclose(out, g["out"], rtol=1e-5, atol=1e-5)
        unit = A.efficient_attention(g["Q"] / math.sqrt(6), g["K"] / math.sqrt(6), g["V"], g["F"])
        np.testing.assert_allclose(unit, g["out_unit"], rtol=1e-5, atol=1e-5)

    def test_enla_intermediate_features(self):
        g = load_golden("enla.npz")
        np.testing.assert_allclose(A.softmax_kernel_features(g["Q"], g["F"]), g["phi_q"], rtol=1e-5)
        np.testing.assert_allclose(A.softmax_kernel_features(g["K"], g["F"]), g["phi_k"], rtol=1e-5)

    def test_softmax_attention(self):
        g = load_golden("enla.npz")
        out = jax.jit(A.softmax_attention)(g["Q"], g["K"], g["V"])
        np.testing.assert_allclose(out, g["out_softmax"], rtol=1e-5, atol=1e-5)
        # The far-from-softmax ENLA error at amplification 6 the golden file records.
        enla = A.efficient_attention(g["Q"], g["K"], g["V"], g["F"])
        rel = np.linalg.norm(enla - out) / np.linalg.norm(out)
        np.testing.assert_allclose(rel, g["rel_fro_err_enla_vs_softmax"], rtol=1e-3)

    def test_contrastive_loss_and_grads(self):
        g = load_golden("contrastive.npz")

        def loss_fn(q_raw, k_raw):
            q = A.l2_normalize(nchw_tokens_jnp(q_raw), eps=5e-5) * math.sqrt(6)
            k = A.l2_normalize(nchw_tokens_jnp(k_raw), eps=5e-5) * math.sqrt(6)
            return jnp.mean(A.contrastive_loss(q, k))

        loss, (gq, gk) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(g["q_raw"], g["k_raw"])
        np.testing.assert_allclose(loss, g["loss"], atol=1e-6)
        np.testing.assert_allclose(gq, g["grad_q_raw"], rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(gk, g["grad_k_raw"], rtol=1e-3, atol=1e-7)
        per_position = jax.vmap(
            lambda q, k: jax.nn.relu(
                1
                - jnp.log(
                    jnp.mean(jnp.sort(jnp.exp(q @ k.T), axis=-1)[:, ::-1][:, :15], -1)
                    / (jnp.mean(jnp.sort(jnp.exp(q @ k.T), axis=-1)[:, ::-1][:, 50:65], -1) + 1e-6)
                )
            )
        )(nchw_to_tokens(g["q"]), nchw_to_tokens(g["k"]))
        np.testing.assert_allclose(per_position, g["per_position_loss_recomputed"], atol=1e-5)

    def test_module_forward_loss_and_grads(self):
        g = load_golden("enlca_module.npz")
        variables = golden_module_variables(g)
        x = g["x"].transpose(0, 2, 3, 1)
        weights = golden_g(g["x"].shape).transpose(0, 2, 3, 1)
        block = A.ENLCA()

        def objective(params, x):
            out, aux = block.apply({**variables, "params": params}, x, train=True, mutable=[A.LOSS_COLLECTION])
            total, count = A.sum_contrastive_losses(aux[A.LOSS_COLLECTION])
            return jnp.sum(out * weights) + jnp.mean(total / count), out

        (value, out), (gp, gx) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
            variables["params"], x
        )
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), g["out"], atol=1e-5)
        np.testing.assert_allclose(value, g["objective"], rtol=1e-5, atol=1e-5)
        eval_out = block.apply(variables, x)
        np.testing.assert_allclose(eval_out, out, atol=1e-6)  # train and eval outputs agree
        np.testing.assert_allclose(gx.transpose(0, 3, 1, 2), g["grad_x"], rtol=1e-3, atol=1e-7)
        for ours, theirs in [
            ("query", "conv_match1.0"),
            ("key", "conv_match2.0"),
            ("value", "conv_assembly.0"),
        ]:
            np.testing.assert_allclose(
                gp[ours]["kernel"], g[f"grad/{theirs}.weight"].transpose(2, 3, 1, 0), rtol=1e-3, atol=1e-7
            )
            np.testing.assert_allclose(gp[ours]["bias"], g[f"grad/{theirs}.bias"], rtol=1e-3, atol=1e-7)

    def test_module_loss(self):
        g = load_golden("enlca_module.npz")
        _, aux = A.ENLCA().apply(
            golden_module_variables(g), g["x"].transpose(0, 2, 3, 1), train=True, mutable=["losses"]
        )
        (per_example,) = aux["losses"]["contrastive"]
        assert per_example.shape == (2,)
        np.testing.assert_allclose(jnp.mean(per_example), g["loss_train"], atol=1e-6)


def nchw_tokens_jnp(x):
    b, c, h, w = x.shape
    return jnp.transpose(jnp.reshape(x, (b, c, h * w)), (0, 2, 1))


# ---------------------------------------------------------------------------------------------
# Random matrices
# ---------------------------------------------------------------------------------------------


class TestRandomMatrices:
    @pytest.mark.parametrize("m,d", [(128, 64), (128, 8), (100, 64), (7, 16)])
    def test_orthogonal_structure(self, m, d):
        f = np.asarray(A.orthogonal_random_matrix(jax.random.key(0), m, d))
        assert f.shape == (m, d) and f.dtype == np.float32
        unit = f / np.linalg.norm(f, axis=1, keepdims=True)
        for start in range(0, m, d):
            block = unit[start : start + d]
            np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=2e-6)

    def test_row_norms_follow_chi(self):
        # chi(D) has mean sqrt(2) Γ((D+1)/2) / Γ(D/2) and variance D - mean^2.
        d, m = 64, 128
        f = jax.vmap(lambda k: A.orthogonal_random_matrix(k, m, d))(jax.random.split(jax.random.key(1), 64))
        norms = np.linalg.norm(np.asarray(f), axis=-1).ravel()
        mean = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
        var = d - mean**2
        assert abs(norms.mean() - mean) < 5 * math.sqrt(var / norms.size)
        assert abs(norms.var() / var - 1) < 0.1

    def test_gaussian(self):
        f = np.asarray(A.gaussian_random_matrix(jax.random.key(2), 512, 32))
        assert f.shape == (512, 32)
        assert abs(f.mean()) < 5 / math.sqrt(f.size) and abs(f.std() - 1) < 0.02

    def test_keys_are_explicit(self):
        a = A.orthogonal_random_matrix(jax.random.key(3), 16, 8)
        b = A.orthogonal_random_matrix(jax.random.key(3), 16, 8)
        c = A.orthogonal_random_matrix(jax.random.key(4), 16, 8)
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)

    @pytest.mark.parametrize("m,d", [(0, 8), (-1, 8), (8, 0)])
    def test_bad_sizes(self, m, d):
        with pytest.raises(ValueError, match="positive integer"):
            A.orthogonal_random_matrix(jax.random.key(0), m, d)
        with pytest.raises(ValueError, match="positive integer"):
            A.gaussian_random_matrix(jax.random.key(0), m, d)

    def test_bad_kind(self):
        with pytest.raises(ValueError, match="orthogonal"):
            A.random_matrix(jax.random.key(0), 8, 8, "sobol")


# ---------------------------------------------------------------------------------------------
# Statistics of the estimator
# ---------------------------------------------------------------------------------------------


def _unit(v):
    return v / np.linalg.norm(v)


class TestEstimatorStatistics:
    """With eps = 0 and iid F, phi(q).phi(k) = mean over M of exp(w.(q+k) - |q|^2/2 - |k|^2/2) is
    unbiased for exp(q.k), with variance exp(q.k)^2 (exp(|q+k|^2) - 1) / M (Performer, lemma 1)."""

    M = 16
    DRAWS = 20000

    def estimates(self, q, k, kind="iid"):
        keys = jax.random.split(jax.random.key(11), self.DRAWS)
        q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)

        @jax.jit
        @jax.vmap
        def one(key):
            f = A.random_matrix(key, self.M, q.shape[-1], kind)
            phi_q = A.softmax_kernel_features(q[None], f, eps=0.0)[0]  # [M]
            return phi_q @ A.softmax_kernel_features(k[None], f, eps=0.0)[0]

        return np.asarray(one(keys), np.float64)

    @pytest.mark.parametrize("cos,norm", [(0.5, 0.8), (-0.3, 0.7), (0.9, 0.6)])
    def test_unbiased_with_closed_form_variance(self, cos, norm):
        rng = np.random.default_rng(0)
        d = 8
        a, b = _unit(rng.normal(size=d)), rng.normal(size=d)
        b = _unit(b - (b @ a) * a)
        q = norm * a
        k = norm * (cos * a + math.sqrt(1 - cos**2) * b)
        x = self.estimates(q, k)
        target = math.exp(q @ k)
        variance = target**2 * (math.exp(np.sum((q + k) ** 2)) - 1) / self.M
        n = x.size
        # Mean: 5 standard errors. Variance: 5 standard errors of the sample variance,
        # sqrt((mu4 - s^4) / n) from the sample's own fourth central moment.
        assert abs(x.mean() - target) < 5 * math.sqrt(variance / n)
        s2 = x.var(ddof=1)
        mu4 = np.mean((x - x.mean()) ** 4)
        assert abs(s2 - variance) < 5 * math.sqrt((mu4 - s2**2) / n)

    def test_orthogonal_lowers_variance(self):
        rng = np.random.default_rng(1)
        q = 0.8 * _unit(rng.normal(size=8))
        k = 0.8 * _unit(q + 0.5 * rng.normal(size=8))
        self.M = 8  # one full orthogonal block
        iid, ortho = self.estimates(q, k, "iid"), self.estimates(q, k, "orthogonal")
        assert abs(ortho.mean() - math.exp(q @ k)) < 5 * ortho.std() / math.sqrt(ortho.size)
        assert ortho.var() < 0.9 * iid.var()


class TestApproachesSoftmax:
    """ENLA -> exact attention as M grows, error ~ 1/sqrt(M); orthogonal beats iid."""

    @staticmethod
    def rel_error(m, kind, seeds=8):
        rng = np.random.default_rng(5)
        q = rng.normal(size=(64, 16))
        k = q + 0.3 * rng.normal(size=(64, 16))
        q = jnp.asarray(q / np.linalg.norm(q, axis=-1, keepdims=True), jnp.float32)
        k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
        v = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
        exact = A.softmax_attention(q, k, v)

        @jax.vmap
        def err(key):
            out = A.efficient_attention(q, k, v, A.random_matrix(key, m, 16, kind))
            return jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)

        return float(jnp.mean(err(jax.random.split(jax.random.key(m), seeds))))

    def test_error_shrinks_like_inverse_sqrt_m(self):
        ms = [16, 64, 256, 1024]
        errors = [self.rel_error(m, "iid") for m in ms]
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        slope = np.polyfit(np.log(ms), np.log(errors), 1)[0]
        assert -0.7 < slope < -0.35, (slope, errors)

    def test_orthogonal_beats_iid(self):
        for m in (16, 64):
            assert self.rel_error(m, "orthogonal") < self.rel_error(m, "iid")


# ---------------------------------------------------------------------------------------------
# Efficient attention: contracts
# ---------------------------------------------------------------------------------------------


def _qkv(seed=0, batch=(2,), n=24, l=20, d=8, cv=6, amp=6.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=batch + (n, d))
    k = rng.normal(size=batch + (l, d))
    q = math.sqrt(amp) * q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = math.sqrt(amp) * k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=batch + (l, cv))
    return (jnp.asarray(a, jnp.float32) for a in (q, k, v))


def numpy_enla(q, k, v, f, eps=1e-4):
    """Float64 NumPy ENLA written from the formula (golden/README.md), no stabiliser."""
    q, k, v, f = (np.asarray(a, np.float64) for a in (q, k, v, f))

    def phi(x):
        return (np.exp(x @ f.T - 0.5 * np.sum(x * x, -1, keepdims=True)) + eps) / math.sqrt(len(f))

    pq, pk = phi(q), phi(k)
    kv = np.einsum("...lm,...lc->...mc", pk, v)
    return np.einsum("...nm,...mc->...nc", pq, kv) / (pq @ pk.sum(-2)[..., None])


class TestEfficientAttention:
    def test_shapes_scalar_and_batched(self):
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        for batch in [(), (3,), (2, 2)]:
            q, k, v = _qkv(batch=batch)
            assert A.efficient_attention(q, k, v, f).shape == batch + (24, 6)
            assert A.softmax_attention(q, k, v).shape == batch + (24, 6)

    def test_vmap_matches_batched(self):
        q, k, v = _qkv(batch=(3,))
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        batched = jax.jit(A.efficient_attention)(q, k, v, f)
        mapped = jax.vmap(A.efficient_attention, in_axes=(0, 0, 0, None))(q, k, v, f)
        np.testing.assert_allclose(batched, mapped, rtol=1e-6, atol=1e-6)

    def test_hand_worked_single_key(self):
        # One key: every query's weights are [1], so the output is that key's value exactly.
        q, k, v = _qkv(batch=(), l=1)
        f = A.gaussian_random_matrix(jax.random.key(0), 4, 8)
        np.testing.assert_allclose(A.efficient_attention(q, k, v, f), jnp.broadcast_to(v, (24, 6)), rtol=1e-6)

    def test_hand_worked_features(self):
        # M = 1, F = [[1, 0]], x = [1, 1]: phi = exp(1 - 1) + eps = 1 + eps.
        phi = A.softmax_kernel_features(jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.0]]), eps=0.5)
        np.testing.assert_allclose(phi, [[1.5]])

    def test_stabilized_equals_plain(self):
        q, k, v = _qkv()
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        plain = A.efficient_attention(q, k, v, f)
        stable = A.efficient_attention(q, k, v, f, stabilize=True)
        np.testing.assert_allclose(stable, plain, rtol=1e-4, atol=1e-5)
        g_plain = jax.grad(lambda q: jnp.sum(A.efficient_attention(q, k, v, f) ** 2))(q)
        g_stable = jax.grad(lambda q: jnp.sum(A.efficient_attention(q, k, v, f, stabilize=True) ** 2))(q)
        np.testing.assert_allclose(g_stable, g_plain, rtol=1e-3, atol=1e-4)

    def test_stabilizer_survives_overflow(self):
        # |x|^2 = 100 with rows |f| ~ 17: phi reaches e^120, beyond float32 (e^88); float64 is fine.
        q, k, v = _qkv(amp=100.0)
        f = 6.0 * A.gaussian_random_matrix(jax.random.key(0), 32, 8)
        assert not np.all(np.isfinite(A.efficient_attention(q, k, v, f)))
        stable = A.efficient_attention(q, k, v, f, stabilize=True)
        np.testing.assert_allclose(stable, numpy_enla(q, k, v, f), rtol=1e-4, atol=1e-5)

    def test_stabilizer_at_large_norms_where_every_feature_underflows(self):
        # |q| = |k| = 15 with unit-norm rows of F: every logit F x - |x|²/2 <= 15 - 112.5, so
        # exp() underflows and the features are eps alone; the plain path is finite there, and
        # the stabilised one must be too (and agree with the float64 formula), gradients included.
        q, k, v = _qkv(amp=225.0)
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8) / math.sqrt(8)
        plain = A.efficient_attention(q, k, v, f)
        stable = A.efficient_attention(q, k, v, f, stabilize=True)
        assert np.all(np.isfinite(plain)) and np.all(np.isfinite(stable))
        np.testing.assert_allclose(stable, numpy_enla(q, k, v, f), rtol=1e-4, atol=1e-5)
        grads = jax.grad(lambda q, k: jnp.sum(A.efficient_attention(q, k, v, f, stabilize=True) ** 2), (0, 1))(q, k)
        assert all(np.all(np.isfinite(g)) for g in grads)

    def test_mask_equals_dropping_keys(self):
        q, k, v = _qkv()
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        mask = jnp.arange(20) < 13
        mask = jnp.broadcast_to(mask, (2, 20))
        for fn in (
            A.efficient_attention,
            functools.partial(A.efficient_attention, stabilize=True),
            A.softmax_attention,
        ):
            np.testing.assert_allclose(fn(q, k, v, f, mask=mask), fn(q, k[:, :13], v[:, :13], f), rtol=1e-5, atol=1e-6)

    def test_summaries_add_over_tiles(self):
        q, k, v = _qkv()
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        s1 = A.key_summary(k[:, :7], v[:, :7], f)
        s2 = A.key_summary(k[:, 7:], v[:, 7:], f)
        total = jax.tree_util.tree_map(jnp.add, s1, s2)
        np.testing.assert_allclose(
            A.attend_with_summary(q, total, f), A.efficient_attention(q, k, v, f), rtol=1e-5, atol=1e-6
        )

    def test_grad_and_jit(self):
        q, k, v = _qkv()
        f = A.orthogonal_random_matrix(jax.random.key(0), 32, 8)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.efficient_attention(q, k, v, f)), (0, 1, 2)))(q, k, v)
        assert all(np.all(np.isfinite(g)) for g in grads)
        assert float(jnp.abs(grads[0]).sum()) > 0

    def test_bf16_inputs_finite_at_amplification_6(self):
        q, k, v = _qkv(d=64, n=256, l=256)
        f = A.orthogonal_random_matrix(jax.random.key(0), 128, 64)
        out = A.efficient_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), f)
        assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
        ref = A.efficient_attention(q, k, v, f)
        assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))
        assert A.softmax_kernel_features(q.astype(jnp.bfloat16), f).dtype == jnp.float32

    def test_no_quadratic_intermediate(self):
        # The compiled ENLA has no N x L buffer (N = L = 4096 would be 64 MiB in float32).
        q, k, v = _qkv(batch=(1,), n=4096, l=4096, d=8, cv=8)
        f = A.orthogonal_random_matrix(jax.random.key(0), 16, 8)
        memory = jax.jit(A.efficient_attention).lower(q, k, v, f).compile().memory_analysis()
        assert memory.temp_size_in_bytes < 4096 * 4096 * 4 / 8

    @pytest.mark.parametrize("stabilize", [False, True])
    @pytest.mark.parametrize("masked", [False, True])
    @pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
    def test_hand_written_backward_equals_autodiff(self, stabilize, masked, batch):
        # efficient_attention has a custom VJP; key_summary + attend_with_summary are plain jnp,
        # so autodiff through them is the reference, for q, k, v and F, with masks and N != L.
        q, k, v = _qkv(seed=3, batch=batch, n=24, l=20, amp=3.0)
        f = A.orthogonal_random_matrix(jax.random.key(4), 32, 8)
        mask = jnp.asarray(np.random.default_rng(5).random(batch + (20,)) < 0.7) if masked else None
        weights = jax.random.normal(jax.random.key(6), batch + (24, 6))

        def reference(q, k, v, f):
            summary = A.key_summary(k, v, f, mask=mask, stabilizer="global" if stabilize else None)
            out = A.attend_with_summary(q, summary, f, stabilizer="row" if stabilize else None)
            return jnp.sum(out * weights)

        def custom(q, k, v, f):
            return jnp.sum(A.efficient_attention(q, k, v, f, mask=mask, stabilize=stabilize) * weights)

        expected = jax.grad(reference, argnums=(0, 1, 2, 3))(q, k, v, f)
        got = jax.jit(jax.grad(custom, argnums=(0, 1, 2, 3)))(q, k, v, f)
        for name, a, b in zip("qkvF", expected, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5 * float(jnp.abs(a).max()), err_msg=name)

    def test_hand_written_backward_bf16_and_second_use(self):
        q, k, v = _qkv(seed=7, n=32, l=32)
        f = A.orthogonal_random_matrix(jax.random.key(8), 16, 8)
        lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        grads = jax.grad(lambda q, k, v: jnp.sum(A.efficient_attention(q, k, v, f).astype(jnp.float32)), (0, 1, 2))(*lo)
        assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
        full = jax.grad(lambda q, k, v: jnp.sum(A.efficient_attention(q, k, v, f)), (0, 1, 2))(q, k, v)
        for a, b in zip(full, grads, strict=True):
            assert float(jnp.max(jnp.abs(b.astype(jnp.float32) - a))) < 0.05 * float(jnp.max(jnp.abs(a)))
        # jvp-of-vjp is not needed by training, but vmap over the custom rule must work.
        per_example = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(A.efficient_attention(q, k, v, f))))(q, k, v)
        np.testing.assert_allclose(per_example, full[0], rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize(
        "shapes,match",
        [
            (((24, 8), (20, 7), (20, 6), (32, 8)), "embedding widths"),
            (((24, 8), (20, 8), (19, 6), (32, 8)), "positions L"),
            (((2, 24, 8), (3, 20, 8), (3, 20, 6), (32, 8)), "leading"),
            (((8,), (20, 8), (20, 6), (32, 8)), r"\[\.\.\., N, D\]"),
            (((24, 8), (20, 8), (20, 6), (32, 7)), "projection"),
            (((24, 8), (20, 8), (20, 6), (0, 8)), "M = 0"),
        ],
    )
    def test_bad_shapes(self, shapes, match):
        q, k, v, f = (jnp.ones(s) for s in shapes)
        with pytest.raises(ValueError, match=match):
            A.efficient_attention(q, k, v, f)

    def test_bad_mask(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="mask"):
            A.efficient_attention(q, k, v, jnp.ones((8, 8)), mask=jnp.ones((2, 24), bool))


# ---------------------------------------------------------------------------------------------
# ENLCA module
# ---------------------------------------------------------------------------------------------


class TestENLCAModule:
    def setup_method(self):
        self.x = jax.random.normal(jax.random.key(0), (2, 9, 10, 16))
        self.block = A.ENLCA(num_features=32)
        self.variables = self.block.init(jax.random.key(1), self.x)

    def test_variables(self):
        params = self.variables["params"]
        assert set(params) == {"query", "key", "value"}
        assert params["query"]["kernel"].shape == (1, 1, 16, 4)
        assert params["value"]["kernel"].shape == (1, 1, 16, 16)
        projection = self.variables[A.FEATURE_COLLECTION]["projection"]
        assert projection.shape == (32, 4)
        # Orthogonal within the block of 4 rows.
        unit = projection / jnp.linalg.norm(projection, axis=1, keepdims=True)
        np.testing.assert_allclose(unit[:4] @ unit[:4].T, np.eye(4), atol=1e-5)

    def test_rng_stream_for_features(self):
        other = self.block.init({"params": jax.random.key(1), A.FEATURE_COLLECTION: jax.random.key(9)}, self.x)
        np.testing.assert_array_equal(other["params"]["query"]["kernel"], self.variables["params"]["query"]["kernel"])
        assert not np.allclose(
            other[A.FEATURE_COLLECTION]["projection"], self.variables[A.FEATURE_COLLECTION]["projection"]
        )

    def test_forward_matches_pure_functions(self):
        y = jax.jit(self.block.apply)(self.variables, self.x)
        assert y.shape == self.x.shape
        p = self.variables["params"]
        flat = self.x.reshape(2, 90, 16)
        q = A.l2_normalize(flat @ p["query"]["kernel"][0, 0] + p["query"]["bias"]) * math.sqrt(6)
        k = A.l2_normalize(flat @ p["key"]["kernel"][0, 0] + p["key"]["bias"]) * math.sqrt(6)
        v = flat @ p["value"]["kernel"][0, 0] + p["value"]["bias"]
        att = A.efficient_attention(q, k, v, self.variables[A.FEATURE_COLLECTION]["projection"])
        np.testing.assert_allclose(y, (flat + 0.1 * att).reshape(self.x.shape), rtol=1e-5, atol=1e-5)

    def test_train_sows_loss_eval_does_not(self):
        _, aux = self.block.apply(self.variables, self.x, train=True, mutable=[A.LOSS_COLLECTION])
        total, count = A.sum_contrastive_losses(aux[A.LOSS_COLLECTION])
        assert count == 1 and total.shape == (2,)
        _, aux = self.block.apply(self.variables, self.x, mutable=[A.LOSS_COLLECTION])
        assert A.sum_contrastive_losses(aux.get(A.LOSS_COLLECTION, {}))[1] == 0

    def test_paper_fractions(self):
        block = A.ENLCA(num_features=32, contrastive_fractions=(0.02, 0.08))
        _, aux = block.apply(self.variables, self.x, train=True, mutable=[A.LOSS_COLLECTION])
        q, k, _, _ = block.apply(self.variables, self.x, method=A.ENLCA.embed)
        expected = A.contrastive_loss(q, k, num_positive=1, negative_start=7, num_negative=1)
        np.testing.assert_allclose(aux[A.LOSS_COLLECTION]["contrastive"][0], expected, rtol=1e-6)

    def test_exact_attention_fn(self):
        # y = x + 0.1 · softmax(q kᵀ) v over all 90 positions, q and k of norm sqrt(6).
        block = A.ENLCA(num_features=32, attention_fn=A.softmax_attention)
        y = block.apply(self.variables, self.x)
        p = {name: (np.asarray(c["kernel"][0, 0], np.float64), np.asarray(c["bias"], np.float64))
             for name, c in self.variables["params"].items()}  # fmt: skip
        flat = np.asarray(self.x, np.float64).reshape(2, 90, 16)

        def unit(a):
            return a / np.linalg.norm(a, axis=-1, keepdims=True) * math.sqrt(6)

        q, k = unit(flat @ p["query"][0] + p["query"][1]), unit(flat @ p["key"][0] + p["key"][1])
        v = flat @ p["value"][0] + p["value"][1]
        scores = q @ k.transpose(0, 2, 1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        expected = flat + 0.1 * (weights / weights.sum(-1, keepdims=True)) @ v
        np.testing.assert_allclose(y, expected.reshape(self.x.shape), rtol=1e-5, atol=1e-5)

    def test_redraw(self):
        features = self.variables[A.FEATURE_COLLECTION]
        a = A.redraw_random_features(features, jax.random.fold_in(jax.random.key(0), 640))
        b = A.redraw_random_features(features, jax.random.fold_in(jax.random.key(0), 640))
        c = A.redraw_random_features(features, jax.random.fold_in(jax.random.key(0), 1280))
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(features)
        np.testing.assert_array_equal(a["projection"], b["projection"])
        assert not np.allclose(a["projection"], c["projection"])
        y = self.block.apply({**self.variables, A.FEATURE_COLLECTION: a}, self.x)
        assert not np.allclose(y, self.block.apply(self.variables, self.x))

    def test_tile_summaries_equal_whole(self):
        whole = self.block.apply(self.variables, self.x)
        tiles = [self.x[:, :4], self.x[:, 4:]]
        sums = [self.block.apply(self.variables, t, method=A.ENLCA.summarize) for t in tiles]
        total = jax.tree_util.tree_map(jnp.add, *sums)
        outs = [self.block.apply(self.variables, t, total, method=A.ENLCA.apply_with_summary) for t in tiles]
        np.testing.assert_allclose(jnp.concatenate(outs, axis=1), whole, rtol=1e-5, atol=1e-6)

    def test_mask_matches_crop(self):
        padded = jnp.pad(self.x, ((0, 0), (0, 3), (0, 2), (0, 0)))
        mask = jnp.zeros(padded.shape[:3], bool).at[:, :9, :10].set(True)
        y = self.block.apply(self.variables, padded, mask=mask)[:, :9, :10]
        np.testing.assert_allclose(y, self.block.apply(self.variables, self.x), rtol=1e-5, atol=1e-6)

    def test_bf16_compute(self):
        # bfloat16 keeps 8 bits of mantissa: the block's output agrees with float32 to a few of its
        # ulps, far closer than the attention term itself (which a wrong cast would lose or scale).
        block = A.ENLCA(num_features=32, dtype=jnp.bfloat16)
        y = np.asarray(block.apply(self.variables, self.x), np.float32)
        assert block.apply(self.variables, self.x).dtype == jnp.bfloat16
        reference = np.asarray(self.block.apply(self.variables, self.x))
        term = reference - np.asarray(self.x)  # 0.1 · attention
        error = np.abs(y - reference)
        assert error.max() < 0.01 * np.abs(reference).max()
        assert np.abs((y - np.asarray(self.x)) - term).mean() < 0.1 * np.abs(term).mean()

    @pytest.mark.parametrize(
        "shape,kwargs,match",
        [
            ((9, 10, 16), {}, "NHWC"),
            ((2, 9, 10, 3), {}, "at least reduction = 4"),
            ((2, 9, 10, 16), {"num_features": 0}, "must be > 0"),
        ],
    )
    def test_bad_input(self, shape, kwargs, match):
        with pytest.raises(ValueError, match=match):
            A.ENLCA(**kwargs).init(jax.random.key(0), jnp.ones(shape))

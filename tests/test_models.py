"""enlca_jax.models: parameter counts, layout, variants, the JSON description, the conv injection point."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import attention, cpu, models


def abstract_params(model):
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))["params"]


def dense_softmax_attention(q, k, v, projection, **unused):
    """softmax(q kᵀ) v with the whole score matrix: [B, N, D], [B, L, D], [B, L, C] -> [B, N, C]."""
    return jax.nn.softmax(q @ k.swapaxes(-1, -2)) @ v


class TestArchitecture:
    # Authors' counts (ENLCA_REFERENCE.md section 1, counted from their layer list).
    @pytest.mark.parametrize("scale,count", [(2, 41_223_043), (3, 44_173_443), (4, 43_583_363)])
    def test_parameter_counts(self, scale, count):
        assert models.count_params(abstract_params(models.ENLCN(scale=scale))) == count

    def test_edsr_count_and_five_blocks(self):
        assert models.count_params(abstract_params(models.EDSR_X4())) == 43_089_923
        model = models.ENLCN()
        assert model.num_attention_blocks == 5
        assert [i for i, (kind, _) in enumerate(model.layout) if kind == "attention"] == [0, 9, 18, 27, 36]

    def test_random_features_are_not_params(self):
        shapes = jax.eval_shape(lambda: models.init_variables(models.ENLCN(), jax.random.key(0)))
        assert set(shapes) == {"params", attention.FEATURE_COLLECTION}
        assert all(leaf.shape == (128, 64) for leaf in jax.tree_util.tree_leaves(shapes["random_features"]))
        assert len(jax.tree_util.tree_leaves(shapes["random_features"])) == 5

    @pytest.mark.parametrize("scale", [2, 3, 4])
    def test_shapes(self, scale):
        model = models.ENLCN_TINY(scale=scale)
        variables = models.init_variables(model, jax.random.key(0))
        out = jax.jit(model.apply)(variables, jnp.zeros((2, 9, 11, 3)))
        assert out.shape == (2, 9 * scale, 11 * scale, 3)

    def test_pixel_shuffle_matches_pytorch_order(self):
        # PyTorch: input channel c*r*r + i*r + j goes to output channel c at (h*r + i, w*r + j).
        x = np.arange(2 * 3 * 4 * 8, dtype=np.float32).reshape(2, 3, 4, 8)
        y = np.asarray(models.pixel_shuffle(jnp.asarray(x), 2))
        for c, i, j in [(0, 0, 0), (1, 0, 1), (1, 1, 0), (0, 1, 1)]:
            np.testing.assert_array_equal(y[:, i::2, j::2, c], x[..., c * 4 + i * 2 + j])

    def test_pytorch_init_bounds(self):
        variables = models.init_variables(models.ENLCN_TINY(), jax.random.key(0))
        kernel = variables["params"]["resblocks_0"]["conv1"]["kernel"]
        bound = 1 / math.sqrt(3 * 3 * 16)
        assert float(jnp.max(jnp.abs(kernel))) <= bound
        assert float(jnp.max(jnp.abs(kernel))) > 0.9 * bound  # uniform fills the range
        flax_vars = models.init_variables(models.ENLCN_TINY(initializer="flax"), jax.random.key(0))
        assert float(jnp.max(jnp.abs(flax_vars["params"]["head"]["bias"]))) == 0.0

    def test_pytorch_kernel_init_is_variance_scaling(self):
        # Drawn as a matrix, the same numbers as flax's initialiser on the 4-D shape, bit for bit.
        init, reference = models.pytorch_kernel_init(), nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        for index, shape in enumerate([(3, 3, 4, 5), (1, 1, 6, 3), (2, 3, 4, 5, 6), (5, 7)]):
            key = jax.random.key(index)
            np.testing.assert_array_equal(init(key, shape), reference(key, shape))

    def test_variants(self):
        x = jnp.asarray(np.random.default_rng(0).random((1, 10, 10, 3)), jnp.float32)
        variables = models.init_variables(models.ENLCN_TINY(), jax.random.key(0))
        enla = models.ENLCN_TINY().apply(variables, x)
        # NLA: the same blocks with exact softmax attention, here written out densely.
        nla_block = functools.partial(models.NLA_BLOCK, num_features=32)
        nla = models.ENLCN_TINY(attention_block=nla_block).apply(variables, x)
        dense = functools.partial(models.NLA_BLOCK.func, num_features=32, attention_fn=dense_softmax_attention)
        np.testing.assert_allclose(nla, models.ENLCN_TINY(attention_block=dense).apply(variables, x), atol=1e-5)
        assert not np.allclose(enla, nla, atol=1e-3)
        # No attention: the same network as ENLCN whose attention adds nothing (V = 0).
        plain = models.ENLCN_TINY(attention_block=None)
        plain_vars = models.init_variables(plain, jax.random.key(0))
        assert "attention_0" not in plain_vars["params"] and set(plain_vars) == {"params"}
        silenced = jax.tree_util.tree_map(lambda a: a, variables)
        for name in ("attention_0", "attention_1"):
            value = silenced["params"][name]["value"]
            silenced["params"][name]["value"] = jax.tree_util.tree_map(jnp.zeros_like, value)
        kept = {key: value for key, value in silenced["params"].items() if not key.startswith("attention_")}
        assert set(kept) == set(plain_vars["params"])
        np.testing.assert_allclose(plain.apply({"params": kept}, x), models.ENLCN_TINY().apply(silenced, x), atol=1e-6)
        assert enla.shape == nla.shape == (1, 40, 40, 3)

    def test_train_mode_sows_one_loss_per_block(self):
        model = models.ENLCN_TINY()
        variables = models.init_variables(model, jax.random.key(0))
        _, aux = model.apply(variables, jnp.ones((2, 9, 9, 3)), train=True, mutable=["losses"])
        total, count = attention.sum_contrastive_losses(aux["losses"])
        assert count == 2 and total.shape == (2,)

    @pytest.mark.parametrize(
        "kwargs,shape,match",
        [
            ({"scale": 5}, (1, 8, 8, 3), "scale"),
            ({}, (8, 8, 3), "images"),
            ({}, (1, 8, 8, 4), "images"),
            ({"initializer": "xavier"}, (1, 8, 8, 3), "pytorch"),
        ],
    )
    def test_bad_configuration(self, kwargs, shape, match):
        with pytest.raises(ValueError, match=match):
            models.ENLCN_TINY(**kwargs).init(jax.random.key(0), jnp.ones(shape))


class TestModelFromConfig:
    def test_fields_reach_the_blocks(self):
        fields = {"scale": 2, "attention": "nla", "rgb_mean": [0.5, 0.5, 0.5], "num_random_features": 16,
                  "amplification": 4.0, "contrastive_fractions": [0.02, 0.08], "contrastive_margin": 0.5}  # fmt: skip
        model = models.model_from_config(fields)
        block = model.block()
        assert block.attention_fn is attention.softmax_attention and model.rgb_mean == (0.5, 0.5, 0.5)
        assert (block.num_features, block.amplification, block.contrastive_margin) == (16, 4.0, 0.5)
        assert block.contrastive_fractions == (0.02, 0.08) and block.res_scale == model.res_scale
        assert models.model_from_config({"attention": "none"}).block() is None

    def test_one_description_one_model(self):
        # Equal descriptions give equal (hashable) models, which share compiled functions.
        a, b = models.model_from_config({"scale": 2}), models.model_from_config({"scale": 2})
        assert a == b and hash(a) == hash(b)
        assert models.model_from_config({"scale": 2, "amplification": 4.0}) != a

    def test_bad_fields(self):
        with pytest.raises(ValueError, match="unknown ENLCN fields"):
            models.model_from_config({"n_feats": 3})
        with pytest.raises(ValueError, match="attention must be"):
            models.model_from_config({"attention": "performer"})

    def test_earlier_conv_impl_field_is_ignored(self):
        # config.json / model.json written before the conv injection point carried 'conv_impl'.
        assert models.model_from_config({"scale": 2, "conv_impl": "auto"}) == models.model_from_config({"scale": 2})


class TestConvInjection:
    """`conv_general_dilated` changes how convolutions run, never the parameters or the function."""

    def test_plain_flax_by_default(self):
        cpu_paths = ("conv2d_same_stride1", "thin_output_conv", "upsample_and_tail")
        x = jnp.zeros((1, 8, 8, 3))
        for conv, expected in ((None, False), (cpu.conv_general_dilated, True)):
            model = models.ENLCN_TINY(scale=4, features=32, conv_general_dilated=conv)
            variables = models.init_variables(model, jax.random.key(0))
            jaxpr = str(jax.make_jaxpr(lambda v, x, model=model: model.apply(v, x))(variables, x))
            assert all((name in jaxpr) == expected for name in cpu_paths), conv

    @pytest.mark.parametrize("scale", [2, 4])
    def test_checkpoints_are_interchangeable(self, scale):
        plain = models.ENLCN_TINY(scale=scale, features=32)
        tuned = models.ENLCN_TINY(scale=scale, features=32, conv_general_dilated=cpu.conv_general_dilated)
        a = models.init_variables(plain, jax.random.key(0))
        b = models.init_variables(tuned, jax.random.key(0))
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # same names, shapes and initial values
        x = jnp.asarray(np.random.default_rng(0).random((1, 10, 12, 3)), jnp.float32)
        # A checkpoint of one loads into the other: the same function of the same variables.
        np.testing.assert_allclose(tuned.apply(a, x), plain.apply(a, x), atol=2e-6)
        np.testing.assert_allclose(plain.apply(b, x), tuned.apply(b, x), atol=2e-6)

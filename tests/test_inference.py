"""enlca_jax.inference: tiled (global attention), padded, self-ensemble and chop prediction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enlca_jax import attention, inference, models


class TestInference:
    def setup_method(self):
        self.model = models.ENLCN_TINY(scale=2)
        self.variables = models.init_variables(self.model, jax.random.key(0))
        self.x = np.random.default_rng(0).random((2, 19, 22, 3)).astype(np.float32)

    def test_tiled_equals_untiled(self):
        full = inference.predict(self.model, self.variables, self.x)
        tiled = inference.predict(self.model, self.variables, self.x, tile_size=8)  # 3 × 3 tiles
        np.testing.assert_allclose(tiled, full, atol=2e-6)

    def test_tiled_x4_single_image(self):
        model = models.ENLCN_TINY(scale=4)
        variables = models.init_variables(model, jax.random.key(1))
        full = inference.predict(model, variables, self.x[0])
        np.testing.assert_allclose(inference.predict_tiled(model, variables, self.x[0], 10), full, atol=2e-6)

    def test_self_ensemble_is_equivariant(self):
        # The ×8 average is exactly equivariant to flips/rotations, whatever the network.
        x = self.x[:1, :16, :16]
        out = inference.predict(self.model, self.variables, x, self_ensemble=True)
        for index in (1, 4, 6):
            moved = np.asarray(inference.dihedral(jnp.asarray(x), index))
            np.testing.assert_allclose(
                inference.predict(self.model, self.variables, moved, self_ensemble=True),
                np.asarray(inference.dihedral(jnp.asarray(out), index)),
                atol=2e-6,
            )
        symmetric = (x + x.transpose(0, 2, 1, 3)) / 2
        sym_out = inference.predict(self.model, self.variables, symmetric, self_ensemble=True)
        np.testing.assert_allclose(sym_out, sym_out.transpose(0, 2, 1, 3), atol=2e-6)

    def test_dihedral_inverse(self):
        x = jnp.asarray(self.x[:, :5, :7])
        for index in range(8):
            np.testing.assert_array_equal(inference.dihedral(inference.dihedral(x, index), index, True), x)

    def test_chop_reassembles(self):
        # Without attention and with a receptive field inside the shave, chop equals untiled.
        model = models.ENLCN_TINY(scale=3, attention_block=None)
        variables = models.init_variables(model, jax.random.key(0))
        x = np.random.default_rng(2).random((1, 41, 53, 3)).astype(np.float32)
        full = inference.predict(model, variables, x)
        np.testing.assert_allclose(inference.predict(model, variables, x, chop=True), full, atol=1e-6)
        recursive = inference.predict_chop_batch(
            model, variables, jnp.asarray(x), min_size=1000
        )  # one level of recursion
        np.testing.assert_allclose(recursive, full, atol=1e-6)

    def test_padding_with_mask_equals_unpadded(self):
        for scale in (2, 4):
            model = models.ENLCN_TINY(scale=scale)
            variables = models.init_variables(model, jax.random.key(scale))
            x = self.x[:, :13, :17]
            full = inference.predict(model, variables, x)
            padded = inference.predict(model, variables, x, pad_multiple=8)  # 13×17 → 16×24
            np.testing.assert_allclose(padded, full, atol=2e-6)
        assert inference.bucket_shape(13, 17, 8) == (16, 24)

    def test_chop_runs_each_quadrant_as_its_own_image(self):
        # The authors' forward_chop on 40×48 at ×2: quadrants of (20 + 10 shave → 32) × (24 + 10 →
        # 40), each a whole image for the attention; the output keeps each quadrant's own corner.
        x = np.random.default_rng(3).random((1, 40, 48, 3)).astype(np.float32)
        run = functools.partial(inference.predict, self.model, self.variables)
        a, b, c, d = run(x[:, :32, :40]), run(x[:, :32, 8:]), run(x[:, 8:, :40]), run(x[:, 8:, 8:])
        expected = np.concatenate(
            [np.concatenate([a[:, :40, :48], b[:, :40, 32:]], axis=2),
             np.concatenate([c[:, 24:, :48], d[:, 24:, 32:]], axis=2)], axis=1,
        )  # fmt: skip
        chopped = inference.predict_chop(self.model, self.variables, x)
        np.testing.assert_allclose(chopped, expected, atol=2e-6)
        np.testing.assert_allclose(
            inference.predict(self.model, self.variables, x[0], chop=True), expected[0], atol=2e-6
        )
        assert not np.allclose(chopped, run(x), atol=1e-4)  # attention differs from whole-image attention

    @pytest.mark.parametrize(
        "images,match",
        [
            (np.zeros((4, 4)), "shape"),
            (np.zeros((1, 2, 4, 4, 3)), "shape"),
            (np.zeros((4, 4, 1)), "colour channels"),
            (np.zeros((0, 4, 3)), "empty"),
            (np.full((4, 4, 3), np.nan), "NaN"),
            (np.array([[["a", "b", "c"]]]), "real numbers"),
            (np.full((4, 4, 3), 255.0), r"must lie in \[0, 1\] .* got values in \[255, 255\]; pass uint8"),
            (np.full((4, 4, 3), -0.5), r"got values in \[-0.5, -0.5\]"),
            (np.ones((4, 4, 3), bool), "real numbers"),
        ],
    )
    def test_bad_input(self, images, match):
        with pytest.raises(ValueError, match=match):
            inference.predict(self.model, self.variables, images)

    def test_uint8_and_uint16_images_are_scaled(self):
        pixels = np.random.default_rng(3).integers(0, 256, (2, 9, 10, 3), dtype=np.uint8)
        expected = inference.predict(self.model, self.variables, pixels.astype(np.float32) / 255)
        np.testing.assert_allclose(inference.predict(self.model, self.variables, pixels), expected, atol=1e-6)
        wide = pixels.astype(np.uint16) * 257  # 255 -> 65535
        np.testing.assert_allclose(inference.predict(self.model, self.variables, wide), expected, atol=1e-6)

    def test_non_finite_variables_are_reported(self):
        broken = jax.tree_util.tree_map(lambda a: a, self.variables)
        broken["params"]["head"]["bias"] = broken["params"]["head"]["bias"].at[0].set(jnp.nan)
        with pytest.raises(FloatingPointError, match="variables are finite"):
            inference.predict(self.model, broken, self.x)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="tile_size"):
            inference.predict(self.model, self.variables, self.x, tile_size=0)
        with pytest.raises(ValueError, match="choose one of"):
            inference.predict(self.model, self.variables, self.x, tile_size=8, chop=True)
        custom = functools.partial(attention.ENLCA, num_features=32, attention_fn=lambda q, k, v, f, **kw: v)
        with pytest.raises(ValueError, match="tiled inference needs ENLA or exact NLA"):
            inference.predict(models.ENLCN_TINY(scale=2, attention_block=custom), self.variables, self.x, tile_size=8)

    def test_tiled_nla_is_exact_global_attention(self):
        # Every tile attends to the keys of all tiles: the same as untiled NLA, and not the same as
        # ENLA with the same variables.
        model = models.ENLCN_TINY(scale=2, attention_block=functools.partial(models.NLA_BLOCK, num_features=32))
        full = inference.predict(model, self.variables, self.x)
        np.testing.assert_allclose(inference.predict(model, self.variables, self.x, tile_size=8), full, atol=2e-6)
        np.testing.assert_allclose(inference.predict(model, self.variables, self.x, pad_multiple=16), full, atol=2e-6)
        assert not np.allclose(inference.predict(self.model, self.variables, self.x), full, atol=1e-4)

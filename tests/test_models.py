"""ENLCN: parameter counts, shapes, golden import of the authors' weights, inference variants."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, load_golden

from enlca_jax import attention, checkpointing, convert, inference, models


def abstract_params(model):
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))["params"]


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

    def test_variants(self):
        x = jnp.asarray(np.random.default_rng(0).random((1, 10, 10, 3)), jnp.float32)
        variables = models.init_variables(models.ENLCN_TINY(), jax.random.key(0))
        enla = models.ENLCN_TINY().apply(variables, x)
        nla = models.ENLCN_TINY(attention_fn=attention.softmax_attention).apply(variables, x)
        plain = models.ENLCN_TINY(attention_fn=None)
        plain_vars = models.init_variables(plain, jax.random.key(0))
        assert "attention_0" not in plain_vars["params"]
        none = plain.apply(plain_vars, x)
        for y in (enla, nla, none):
            assert y.shape == (1, 40, 40, 3) and np.all(np.isfinite(y))
        assert not np.allclose(enla, nla)

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

    def test_model_from_config(self):
        model = models.model_from_config({"scale": 2, "attention": "nla", "rgb_mean": [0.5, 0.5, 0.5]})
        assert model.attention_fn is attention.softmax_attention and model.rgb_mean == (0.5, 0.5, 0.5)
        with pytest.raises(ValueError, match="unknown ENLCN fields"):
            models.model_from_config({"n_feats": 3})
        with pytest.raises(ValueError, match="attention must be"):
            models.model_from_config({"attention": "performer"})


class TestGoldenImport:
    """golden/enlcn_small.npz: the authors' ENLCN (8 ResBlocks, 32 features, ×2) with its
    state_dict, eval and train outputs, and gradients. Float64 rerun differs by 1.4e-7 on out."""

    def setup_method(self):
        self.g = load_golden("enlcn_small.npz")
        self.config, self.variables = convert.convert_state_dict(convert.load_state_dict(GOLDEN / "enlcn_small.npz"))
        self.model = models.model_from_config(self.config)
        self.x = self.g["x"].transpose(0, 2, 3, 1)

    def test_inferred_config(self):
        assert self.config["scale"] == 2 and self.config["features"] == 32
        assert self.config["num_resblocks"] == 8 and self.config["reduction"] == 4
        assert self.config["rgb_mean"] == models.DIV2K_MEAN

    def test_output(self):
        out = jax.jit(self.model.apply)(self.variables, self.x)
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), self.g["out"], atol=1e-5)
        np.testing.assert_allclose(
            inference.predict(self.model, self.variables, self.x[0]),
            self.g["out"][0].transpose(1, 2, 0),
            atol=1e-5,
        )

    def test_training_losses_and_grads(self):
        hr = self.g["hr"].transpose(0, 2, 3, 1)

        def total_loss(params):
            out, aux = self.model.apply({**self.variables, "params": params}, self.x, train=True, mutable=["losses"])
            contrastive, count = attention.sum_contrastive_losses(aux["losses"])
            return jnp.mean(jnp.abs(out - hr)) + 0.001 * jnp.mean(contrastive / count), aux

        (loss, aux), grads = jax.jit(jax.value_and_grad(total_loss, has_aux=True))(self.variables["params"])
        losses = [aux["losses"][f"attention_{j}"]["contrastive"][0][0] for j in range(2)]
        np.testing.assert_allclose(losses, self.g["contrastive_losses"], atol=1e-6)
        np.testing.assert_allclose(loss, self.g["total_loss"], atol=1e-6)
        pairs = {
            "head.0": grads["head"],
            "body.0.conv_match1.0": grads["attention_0"]["query"],
            "body.1.body.0": grads["resblocks_0"]["conv1"],
            "body.9.conv_assembly.0": grads["attention_1"]["value"],
            "body.10": grads["body_conv"],
            "tail.0.0": grads["upsampler"]["conv_0"],
            "tail.1": grads["tail"],
        }
        for name, ours in pairs.items():
            np.testing.assert_allclose(
                ours["kernel"], self.g[f"grad/{name}.weight"].transpose(2, 3, 1, 0), rtol=1e-3, atol=1e-6
            )
            np.testing.assert_allclose(ours["bias"], self.g[f"grad/{name}.bias"], rtol=1e-3, atol=1e-6)

    def test_converter_cli_and_checkpoint(self, tmp_path, capsys):
        target = tmp_path / "authors_x2"
        assert convert.main([str(GOLDEN / "enlcn_small.npz"), "--output", str(target)]) == 0
        assert "8" in capsys.readouterr().out
        model, variables = checkpointing.load_model(target)
        out = inference.predict(model, variables, self.x)
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), self.g["out"], atol=1e-5)
        assert json.loads((target / "model.json").read_text())["scale"] == 2
        # An existing checkpoint is never overwritten silently.
        assert convert.main([str(GOLDEN / "enlcn_small.npz"), "--output", str(target)]) == 2
        assert "exists" in capsys.readouterr().err

    def test_x4_tail_names(self):
        model = models.ENLCN(scale=4, num_resblocks=2, features=8, attention_every=2, num_random_features=16)
        variables = models.init_variables(model, jax.random.key(0))
        state = to_state_dict(variables, model)
        config, converted = convert.convert_state_dict(state)
        assert config["scale"] == 4
        x = jnp.asarray(np.random.default_rng(1).random((1, 6, 7, 3)), jnp.float32)
        np.testing.assert_allclose(
            models.model_from_config(config).apply(converted, x), model.apply(variables, x), atol=1e-6
        )

    def test_pt_without_torch(self, tmp_path, monkeypatch):
        path = tmp_path / "ENLCAx4.pt"
        path.write_bytes(b"not really")
        monkeypatch.setitem(sys.modules, "torch", None)
        with pytest.raises(ImportError, match="pip install torch"):
            convert.load_state_dict(path)

    def test_bad_files(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            convert.load_state_dict(tmp_path / "missing.npz")
        np.savez(tmp_path / "other.npz", weight=np.zeros(3))
        with pytest.raises(ValueError, match="head.0.weight"):
            convert.convert_state_dict(convert.load_state_dict(tmp_path / "other.npz"))
        with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
            checkpointing.load_model(tmp_path)


def to_state_dict(variables, model):
    """Our variables under the authors' state_dict names (inverse of the converter, for tests)."""
    p = variables["params"]
    state = {}

    def put(name, conv):
        state[f"{name}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
        state[f"{name}.bias"] = np.asarray(conv["bias"])

    put("head.0", p["head"])
    for index, (kind, j) in enumerate(model.layout):
        if kind == "attention":
            put(f"body.{index}.conv_match1.0", p[f"attention_{j}"]["query"])
            put(f"body.{index}.conv_match2.0", p[f"attention_{j}"]["key"])
            put(f"body.{index}.conv_assembly.0", p[f"attention_{j}"]["value"])
            state[f"body.{index}.attn_fn.projection_matrix"] = np.asarray(
                variables["random_features"][f"attention_{j}"]["projection"]
            )
        else:
            put(f"body.{index}.body.0", p[f"resblocks_{j}"]["conv1"])
            put(f"body.{index}.body.2", p[f"resblocks_{j}"]["conv2"])
    put(f"body.{len(model.layout)}", p["body_conv"])
    for s in range(len(models.upsampler_factors(model.scale))):
        put(f"tail.0.{2 * s}", p["upsampler"][f"conv_{s}"])
    put("tail.1", p["tail"])
    return state


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
        model = models.ENLCN_TINY(scale=3, attention_fn=None)
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

    def test_chop_changes_attention(self):
        x = np.random.default_rng(3).random((1, 40, 48, 3)).astype(np.float32)
        full = inference.predict(self.model, self.variables, x)
        chopped = inference.predict(self.model, self.variables, x, chop=True)
        assert chopped.shape == full.shape and not np.allclose(chopped, full, atol=1e-6)

    @pytest.mark.parametrize(
        "images,match",
        [
            (np.zeros((4, 4)), "shape"),
            (np.zeros((1, 2, 4, 4, 3)), "shape"),
            (np.zeros((4, 4, 1)), "colour channels"),
            (np.zeros((0, 4, 3)), "empty"),
            (np.full((4, 4, 3), np.nan), "NaN"),
            (np.array([[["a", "b", "c"]]]), "real numbers"),
        ],
    )
    def test_bad_input(self, images, match):
        with pytest.raises(ValueError, match=match):
            inference.predict(self.model, self.variables, images)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="tile_size"):
            inference.predict(self.model, self.variables, self.x, tile_size=0)
        with pytest.raises(ValueError, match="choose one of"):
            inference.predict(self.model, self.variables, self.x, tile_size=8, chop=True)
        nla = models.ENLCN_TINY(scale=2, attention_fn=attention.softmax_attention)
        with pytest.raises(ValueError, match="NLA"):
            inference.predict(nla, self.variables, self.x, tile_size=8)

"""enlca_jax.convert: the authors' state_dict (golden reduced ENLCN) imported and run as theirs (its train
step against their loss and gradients: test_train_step.py); every architecture make_model builds."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDEN, load_golden, random_variables

from enlca_jax import attention, checkpointing, convert, inference, models


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

    def test_converter_cli_and_checkpoint(self, tmp_path, capsys):
        target = tmp_path / "authors_x2"
        assert convert.main([str(GOLDEN / "enlcn_small.npz"), "--output", str(target)]) == 0
        out = capsys.readouterr().out
        model, variables = checkpointing.load_model(target)
        count = models.count_params(variables["params"])
        assert out.startswith(f"wrote {target}: ENLCN ") and out.rstrip().endswith(f"with {count:,} parameters")
        assert "'num_resblocks': 8" in out and "'features': 32" in out and "'scale': 2" in out
        out = inference.predict(model, variables, self.x)
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), self.g["out"], atol=1e-5)
        assert json.loads((target / "model.json").read_text())["scale"] == 2
        # An existing checkpoint is never overwritten silently.
        assert convert.main([str(GOLDEN / "enlcn_small.npz"), "--output", str(target)]) == 2
        assert "exists" in capsys.readouterr().err

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
        whole = (GOLDEN / "enlcn_small.npz").read_bytes()
        for name, data in (("truncated.npz", whole[: len(whole) // 2]), ("empty.npz", b"")):
            (tmp_path / name).write_bytes(data)
            with pytest.raises(ValueError, match="not a complete .npz file"):
                convert.load_state_dict(tmp_path / name)


def authors_body(num_resblocks, with_attention):
    """The kinds of ``body.<i>`` as the authors' make_model appends them (enlcn.py), written out
    independently of `models.body_layout`."""
    body = ["attention"] if with_attention else []
    for i in range(num_resblocks):
        body.append("resblock")
        if with_attention and (i + 1) % 8 == 0:
            body.append("attention")
    return body + ["conv"]


def authors_model(scale, num_resblocks, features, with_attention):
    block = functools.partial(attention.ENLCA, num_features=16) if with_attention else None
    return models.ENLCN(scale=scale, num_resblocks=num_resblocks, features=features, attention_every=8,
                        attention_block=block)  # fmt: skip


class TestArchitectures:
    """Exactly the architectures of the authors' make_model (and EDSR without attention)."""

    @pytest.mark.parametrize(
        "scale, num_resblocks, features, with_attention",
        [(2, 1, 8, True), (3, 7, 10, True), (4, 9, 8, True), (2, 16, 4, True), (3, 2, 8, False), (4, 1, 6, False)],
    )
    def test_converts_and_runs_as_built(self, scale, num_resblocks, features, with_attention):
        model = authors_model(scale, num_resblocks, features, with_attention)
        variables = random_variables(model, num_resblocks)
        state = to_state_dict(variables, model)
        kinds = list(convert._body_indices(state).values())
        assert kinds == authors_body(num_resblocks, with_attention)
        config, converted = convert.convert_state_dict(state)
        assert (config["scale"], config["num_resblocks"], config["features"]) == (scale, num_resblocks, features)
        assert (config.get("attention") == "none") == (not with_attention)
        x = jnp.asarray(np.random.default_rng(1).random((1, 6, 7, 3)), jnp.float32)
        np.testing.assert_allclose(
            models.model_from_config(config).apply(converted, x), model.apply(variables, x), atol=1e-5
        )

    def state(self):
        model = authors_model(2, 9, 8, True)
        return to_state_dict(random_variables(model, 0), model)

    def test_missing_resblock_in_the_middle(self):
        state = self.state()
        for key in [k for k in state if k.startswith("body.4.")]:
            del state[key]
        with pytest.raises(ValueError, match=r"lacks 'body.4.body.0.weight' .*n_resblocks=8"):
            convert.convert_state_dict(state)

    def test_extra_key(self):
        state = {**self.state(), "body.3.body.1.weight": np.zeros(3, np.float32)}
        with pytest.raises(ValueError, match=r"has 'body.3.body.1.weight' \(and 0 more entries\), not part of"):
            convert.convert_state_dict(state)

    def test_nan_weights(self):
        state = self.state()
        state["body.2.body.0.weight"] = state["body.2.body.0.weight"].copy()
        state["body.2.body.0.weight"][0, 0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="body.2.body.0.weight holds NaN"):
            convert.convert_state_dict(state)

    def test_wrong_projection_width(self):
        state = self.state()
        state["body.0.attn_fn.projection_matrix"] = np.zeros((16, 6), np.float32)
        with pytest.raises(ValueError, match=r"projection_matrix has shape \(16, 6\), but .* has \(16, 2\)"):
            convert.convert_state_dict(state)

    def test_attention_elsewhere_than_make_model_puts_it(self):
        model = models.ENLCN(scale=2, num_resblocks=4, features=8, attention_every=2,
                             attention_block=functools.partial(attention.ENLCA, num_features=16))  # fmt: skip
        state = to_state_dict(random_variables(model, 0), model)
        with pytest.raises(ValueError, match="lacks 'body.3.body.0.weight'"):
            convert.convert_state_dict(state)


def to_state_dict(variables, model):
    """Our variables under the authors' state_dict names (inverse of the converter, for tests)."""
    p = variables["params"]
    state = {}

    def put(name, conv):
        state[f"{name}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
        state[f"{name}.bias"] = np.asarray(conv["bias"])

    mean = np.asarray(model.rgb_mean, np.float32) * model.rgb_range
    state["sub_mean.weight"] = state["add_mean.weight"] = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    state["sub_mean.bias"], state["add_mean.bias"] = -mean, mean
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

"""enlca_jax.train_step: the authors' loss and gradients for a whole step, one and four devices agree,
random features as a function of the step, the full ×4 step on XLA:CPU finishes."""

import functools
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import GOLDEN, load_golden

from configs import tiny
from enlca_jax import configuration, convert, models, train_lib, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


#: golden/enlcn_small.npz conv names (PyTorch) -> their place in our parameter tree.
GOLDEN_CONVS = {
    "head.0": ("head",),
    "body.0.conv_match1.0": ("attention_0", "query"),
    "body.0.conv_match2.0": ("attention_0", "key"),
    "body.0.conv_assembly.0": ("attention_0", "value"),
    "body.1.body.0": ("resblocks_0", "conv1"),
    "body.1.body.2": ("resblocks_0", "conv2"),
    "body.9.conv_match1.0": ("attention_1", "query"),
    "body.9.conv_match2.0": ("attention_1", "key"),
    "body.9.conv_assembly.0": ("attention_1", "value"),
    "body.10": ("body_conv",),
    "tail.0.0": ("upsampler", "conv_0"),
    "tail.1": ("tail",),
}


def gradient_recorder() -> optax.GradientTransformation:
    """An optimiser whose state after a step is exactly that step's gradients (its updates are 0)."""
    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
    return optax.GradientTransformation(init=zeros, update=lambda grads, state, params=None: (zeros(grads), grads))


def test_golden_step_loss_and_every_gradient():
    # The authors' reduced ENLCN (8 ResBlocks, 32 features, ×2, 2 ENLCA blocks) through our whole
    # train step: pixels in [0, 255] scaled to [0, 1], L1 + 1e-3 · the mean over blocks of the
    # contrastive losses, gradients of that total. Their float64 rerun differs by <= 3e-8 on the loss.
    g = load_golden("enlcn_small.npz")
    model_config, variables = convert.convert_state_dict(convert.load_state_dict(GOLDEN / "enlcn_small.npz"))
    model = models.model_from_config(model_config)
    tx = gradient_recorder()
    state = train_step.TrainState(
        step=jnp.int32(0), params=variables["params"], opt_state=tx.init(variables["params"]),
        random_features=variables["random_features"], key=jax.random.key_data(jax.random.key(0)),
    )  # fmt: skip
    batch = {"lr": g["x"].transpose(0, 2, 3, 1) * 255, "hr": g["hr"].transpose(0, 2, 3, 1) * 255}
    step = functools.partial(
        train_step.train_step, model=model, tx=tx, schedule=optax.constant_schedule(1.0), contrastive_weight=1e-3,
        with_contrastive=True, axis_name=None,
    )  # fmt: skip
    new_state, metrics = jax.jit(step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], g["total_loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["l1"], g["l1"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(metrics["contrastive"], g["contrastive_mean"], rtol=1e-4)
    stored = {name for name in g if name.startswith("grad/")}
    checked = {f"grad/{conv}.{part}" for conv in GOLDEN_CONVS for part in ("weight", "bias")}
    assert stored == checked and len(checked) == 24
    for conv, path in GOLDEN_CONVS.items():
        ours = functools.reduce(lambda tree, key: tree[key], path, new_state.opt_state)
        for part, theirs in (
            ("kernel", g[f"grad/{conv}.weight"].transpose(2, 3, 1, 0)),
            ("bias", g[f"grad/{conv}.bias"]),
        ):
            scale = float(np.abs(theirs).max())
            np.testing.assert_allclose(ours[part], theirs, rtol=0, atol=2e-3 * scale, err_msg=f"{conv} {part}")
    np.testing.assert_array_equal(new_state.params["tail"]["kernel"], variables["params"]["tail"]["kernel"])


class TestStep:
    def test_one_and_four_devices_agree(self):
        assert jax.local_device_count() == 4
        config = tiny.get_config()
        model, tx = configuration.build_model(config), train_step.create_optimizer(config)
        state = train_step.create_train_state(config, model, tx)
        rng = np.random.default_rng(0)
        batches = [
            {"lr": rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8),
             "hr": rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)}
            for _ in range(3)
        ]  # fmt: skip
        step = functools.partial(
            train_step.train_step, model=model, tx=tx, schedule=train_step.learning_rate_schedule(config),
            contrastive_weight=0.001, with_contrastive=True,
        )  # fmt: skip
        results = []
        for devices in (jax.devices()[:1], jax.devices()):
            fn = jax.pmap(step, axis_name="batch", devices=devices)
            replicated = flax.jax_utils.replicate(state, devices)
            count = len(devices)
            for batch in batches:
                shaped = jax.tree_util.tree_map(lambda x, n=count: x.reshape((n, -1) + x.shape[1:]), batch)
                replicated, metrics = fn(replicated, shaped)
            results.append((jax.device_get(replicated.params), jax.device_get(metrics)))
        (p1, m1), (p4, m4) = results
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-6), p1, p4)
        np.testing.assert_allclose(m1["loss"][0], m4["loss"][0], rtol=1e-5)

    def test_features_are_a_function_of_step(self):
        config = tiny.get_config()
        model, tx = configuration.build_model(config), train_step.create_optimizer(config)
        state = train_step.create_train_state(config, model, tx)
        at = functools.partial(train_step.features_at, state.random_features, state.key, interval=3, kind="orthogonal")
        leaves = lambda tree: jax.tree_util.tree_leaves(tree)  # noqa: E731
        for a, b in zip(leaves(at(step=jnp.int32(0))), leaves(state.random_features)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(leaves(at(step=jnp.int32(4))), leaves(at(step=jnp.int32(3)))):
            np.testing.assert_array_equal(a, b)
        assert not np.allclose(leaves(at(step=jnp.int32(3)))[0], leaves(state.random_features)[0])

    def test_batch_not_divisible(self):
        with pytest.raises(ValueError, match=r"batch_size 6 does not divide over the 4 devices"):
            train_lib.check_batch_size(6)


@pytest.mark.long
def test_full_model_contrastive_step_finishes():
    # Regression: XLA:CPU deadlocks (threads idle forever) on the full ENLCN ×4 step with its default
    # flags (enlca_jax.cpu.xla_flags). Run the authors' full model, contrastive on, as train.py runs it
    # on the CPU, in a subprocess with a deadline so that a hang fails the test instead of stalling
    # the suite. With XLA's default flags this hangs at LR patch 12 (144 positions >= the 65 ranks
    # of the contrastive windows) as at 48; compiling is most of the time either way (the
    # initialisation alone is half of it, and part of the path that hung).
    code = """
from enlca_jax import cpu
conv = cpu.setup()
import functools, jax, numpy as np
from configs import enlca_x4
from enlca_jax import configuration, train_step
c = enlca_x4.get_config()
model, tx = configuration.build_model(c, conv_general_dilated=conv), train_step.create_optimizer(c)
state = train_step.create_train_state(c, model, tx)
rng = np.random.default_rng(0)
batch = {"lr": rng.integers(0, 256, (1, 12, 12, 3), dtype=np.uint8),
         "hr": rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)}
step = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx, axis_name=None, contrastive_weight=1e-3,
                                 schedule=train_step.learning_rate_schedule(c), with_contrastive=True))
state, metrics = step(state, batch)
print("contrastive", float(metrics["contrastive"]))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) > 0

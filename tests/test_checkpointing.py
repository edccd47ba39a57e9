"""enlca_jax.checkpointing: damaged checkpoints are detected, skipped with a reason, never restored;
`restore_model` gives the parameters of the checkpoint asked for."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from enlca_jax import checkpointing, configuration, train_step
from enlca_jax import workdir as workdirs


def state_at(step):
    return {"params": {"w": np.full((64, 32), step, np.float32), "b": np.arange(5, dtype=np.float32) * step},
            "step": np.int32(step)}  # fmt: skip


def saved(workdir, steps=(1, 2, 3)):
    checkpoints = checkpointing.TrainCheckpoints(workdir, keep_latest=5, keep_best=2)
    for step in steps:
        checkpoints.save(step, state_at(step), {"epoch": step})
    checkpoints.wait()
    checkpoints.close()


def restore(workdir):
    checkpoints = checkpointing.TrainCheckpoints(workdir, keep_latest=5, keep_best=2)
    try:
        return checkpoints.restore_latest(jax.eval_shape(lambda: state_at(0)))
    finally:
        checkpoints.close()


def array_files(workdir, step):
    folder = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    files = (p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 256)
    return sorted(files, key=lambda p: -p.stat().st_size)


class TestDamagedCheckpoints:
    def test_intact(self, tmp_path):
        saved(tmp_path)
        state, data = restore(tmp_path)
        assert int(state["step"]) == 3 and data == {"epoch": 3}
        np.testing.assert_array_equal(state["params"]["w"], state_at(3)["params"]["w"])

    def test_flipped_bytes_fall_back_to_the_previous_step(self, tmp_path, caplog):
        saved(tmp_path)
        target = array_files(tmp_path, 3)[0]
        raw = bytearray(target.read_bytes())
        for offset in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[offset] ^= 0xFF
        target.write_bytes(bytes(raw))
        with caplog.at_level(logging.WARNING, logger="enlca_jax.checkpointing"):
            state, data = restore(tmp_path)
        assert int(state["step"]) == 2 and data == {"epoch": 2}
        assert "skipping checkpoint 3" in caplog.text

    def test_deleted_file_falls_back(self, tmp_path, caplog):
        saved(tmp_path)
        array_files(tmp_path, 3)[0].unlink()
        with caplog.at_level(logging.WARNING, logger="enlca_jax.checkpointing"):
            state, _ = restore(tmp_path)
        assert int(state["step"]) == 2 and "skipping checkpoint 3" in caplog.text

    def test_all_damaged_is_an_error_not_a_fresh_start(self, tmp_path):
        saved(tmp_path, steps=(1,))
        target = array_files(tmp_path, 1)[0]
        target.write_bytes(target.read_bytes()[:16])
        with pytest.raises(checkpointing.CorruptCheckpointError, match="none of the checkpoints"):
            restore(tmp_path)

    def test_digest_covers_names_values_and_shapes(self):
        a = state_at(1)
        assert checkpointing.state_digest(a) == checkpointing.state_digest(state_at(1))
        assert checkpointing.state_digest(a) != checkpointing.state_digest(state_at(2))
        renamed = {"params": {"v": a["params"]["w"], "b": a["params"]["b"]}, "step": a["step"]}
        assert checkpointing.state_digest(a) != checkpointing.state_digest(renamed)
        reshaped = {**a, "params": {**a["params"], "w": a["params"]["w"].reshape(32, 64)}}
        assert checkpointing.state_digest(a) != checkpointing.state_digest(reshaped)


class TestRestoreModel:
    def test_best_latest_and_a_step_give_their_own_parameters(self, tmp_path):
        config = tiny.get_config()
        model = configuration.build_model(config)
        state = train_step.create_train_state(config, model, train_step.create_optimizer(config))
        workdirs.record_config(tmp_path, config, state.params)

        def at(step):  # distinct parameters per step
            return state.replace(step=jnp.int32(step), params=jax.tree_util.tree_map(lambda p: p * step, state.params))

        checkpoints = checkpointing.TrainCheckpoints(tmp_path, keep_latest=5, keep_best=2)
        for step, psnr in ((1, 30.0), (2, 32.0), (3, 31.0), (4, float("nan"))):
            checkpoints.save(step, at(step), {"epoch": 0})
            checkpoints.save_best(step, at(step), {"epoch": 0}, psnr)
        checkpoints.wait()
        checkpoints.close()
        for which, expected in (("best", 2), ("latest", 4), ("1", 1), (3, 3)):
            restored_model, variables, step = checkpointing.restore_model(tmp_path, which)
            assert step == expected and restored_model == model, which
            for ours, theirs in zip(jax.tree_util.tree_leaves(variables["params"]),
                                    jax.tree_util.tree_leaves(at(expected).params), strict=True):  # fmt: skip
                np.testing.assert_array_equal(ours, theirs)
            for ours, theirs in zip(jax.tree_util.tree_leaves(variables["random_features"]),
                                    jax.tree_util.tree_leaves(state.random_features), strict=True):  # fmt: skip
                np.testing.assert_array_equal(ours, theirs)
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*available: \[1, 2, 3, 4\]"):
            checkpointing.restore_model(tmp_path, "5")

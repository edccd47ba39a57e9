"""enlca_jax.train_lib: a run's outputs, exact resume (also after kill -9, on other device counts),
SIGTERM, non-finite stops, missing data, what a run compiles."""

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import override, read_tensorboard
from PIL import Image

from configs import tiny
from enlca_jax import checkpointing, cpu, inference, train_lib
from enlca_jax import train_step as train_step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    return override(config, overrides)


def train(config, workdir):
    """`train_lib.train_and_evaluate` as train.py runs it on the CPU (with `enlca_jax.cpu.setup`'s
    convolutions), so that in-process runs and train.py subprocesses round alike."""
    return train_lib.train_and_evaluate(config, workdir, conv_general_dilated=cpu.setup())


def losses(workdir):
    by_step = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    return by_step


def metric_lines(workdir, key):
    """(step, value) of every metrics.jsonl line that has ``key``, in file order (duplicates kept)."""
    lines = (json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return [(record["step"], record[key]) for record in lines if key in record]


def run_train_py(workdir, data_dir, devices, *flags):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", *flags]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(workdir, step, process, timeout=240, output=lambda process: process.stdout.read()):
    """Return once ``workdir``'s metrics reach ``step``; fail with ``output(process)`` if the
    process exits first or the step is not reached in ``timeout`` seconds (then kill it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{output(process)}")
        if (pathlib.Path(workdir) / "metrics.jsonl").exists() and max(losses(workdir), default=0) >= step:
            return
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"training did not reach step {step} in time:\n{output(process)}")


class TestTrainAndEvaluate:
    def test_run_outputs_and_exact_resume(self, data_dir, tmp_path, monkeypatch):
        # Each train-step variant is traced (and compiled) once: the state placed on the devices
        # before the first step has the sharding of the steps' outputs.
        traces = collections.Counter()
        real_step = train_step_lib.train_step

        def counted_step(*args, with_contrastive, **kwargs):
            traces[with_contrastive] += 1
            return real_step(*args, with_contrastive=with_contrastive, **kwargs)

        monkeypatch.setattr(train_step_lib, "train_step", counted_step)
        full = tmp_path / "full"
        result = train(tiny_config(data_dir), full)
        assert traces == {False: 1, True: 1}, "a train step was traced again"
        assert result["step"] == 6 and np.isfinite(result["psnr"]) and result["bicubic_psnr"] > 20
        reference = losses(full)
        assert sorted(reference) == [1, 2, 3, 4, 5, 6]
        # The contrastive term is off before contrastive.start_step (2: metrics of steps 1, 2) and on from it.
        contrastive = {step: value for step, value in metric_lines(full, "contrastive")}
        assert contrastive[1] == contrastive[2] == 0 and any(contrastive[s] > 0 for s in (3, 4, 5, 6))
        saved = json.loads((full / "config.json").read_text())
        assert saved["config"]["batch_size"] == 4 and saved["parameters"] > 0
        (sample,) = (full / "samples").rglob("*.png")  # LR bicubic | SR | HR, 4 px apart
        image = np.asarray(Image.open(sample))
        width = (image.shape[1] - 8) // 3
        assert sample.parent.name == "00000006" and image.shape[1] == 3 * width + 8
        assert (image[:, width : width + 4] == 255).all() and (image[:, 2 * width + 4 : 2 * width + 8] == 255).all()
        assert sorted(finished_checkpoints(full)) == [2, 4, 6]
        events = read_tensorboard(full / "tb")
        assert {"loss", "grad_norm", "param_norm", "val_psnr"} <= {tag for _, tag, kind in events if kind == "scalar"}
        assert [(step, kind) for step, tag, kind in events if tag.startswith("samples/")] == [(6, "image")]
        # Stop after 3 steps, resume to 6: the same losses (contrastive starts at 2, redraw at 3).
        part = tmp_path / "part"
        train(tiny_config(data_dir, num_train_steps=3), part)

        real_initializer = train_step_lib.state_initializer

        def guarded_initializer(*args):
            def initialise():
                raise AssertionError("a resumed run computed the initial state")

            initialise.eval_shape = real_initializer(*args).eval_shape
            return initialise

        monkeypatch.setattr(train_step_lib, "state_initializer", guarded_initializer)
        train(tiny_config(data_dir), part)
        assert losses(part) == reference
        model, variables, step = checkpointing.restore_model(part, "best")
        assert step == 6 and "random_features" in variables

    @pytest.mark.long
    def test_kill_minus_9_then_resume_on_other_device_counts(self, data_dir, tmp_path):
        n = 14
        reference = tmp_path / "reference"
        train(tiny_config(data_dir, num_train_steps=n, eval_every=100), reference)
        expected = losses(reference)

        killed = tmp_path / "killed"
        flags = [f"--config.num_train_steps={n + 100}", "--config.eval_every=1000", "--config.checkpoint_every=4"]
        process = run_train_py(killed, data_dir, 4, *flags)
        wait_for_step(killed, 6, process)
        deadline = time.time() + 120  # the async save of step 4 (or 8) has been committed
        while not finished_checkpoints(killed) and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        last_checkpoint = max(finished_checkpoints(killed))
        assert last_checkpoint in (4, 8)
        # Resume in this process (4 devices): exactly the uninterrupted losses.
        train(tiny_config(data_dir, num_train_steps=10, eval_every=100), killed)
        got = losses(killed)
        assert {s: got[s] for s in range(1, 11)} == {s: expected[s] for s in range(1, 11)}
        # Resume on 1 device; then SIGTERM stops it cleanly with a checkpoint of the step reached.
        process = run_train_py(killed, data_dir, 1, *flags)
        wait_for_step(killed, 12, process)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 128 + signal.SIGTERM, output
        assert "SIGTERM received" in output and "stopped by SIGTERM at step" in output
        got = losses(killed)
        steps = [step for step, _ in metric_lines(killed, "loss")]
        assert len(steps) == len(set(steps)), "a resumed run wrote some steps' metric lines twice"
        for s in range(11, 13):
            assert got[s] == pytest.approx(expected[s], rel=1e-4)  # other device count: rounding only
        assert max(finished_checkpoints(killed)) == max(got)

    def test_bfloat16_end_to_end(self, data_dir, tmp_path):
        # config.model.dtype = 'bfloat16': training computes in bfloat16 (parameters stay float32),
        # the workdir records it, and restore_model gives a bfloat16 model whose output follows
        # the float32 one's.
        steps = {"num_train_steps": 2, "eval_every": 2}
        train(tiny_config(data_dir, **steps), tmp_path / "f32")
        result = train(tiny_config(data_dir, **steps, **{"model.dtype": "bfloat16"}), tmp_path / "bf16")
        assert np.isfinite(result["psnr"])
        full, half = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
        assert sorted(half) == [1, 2] and all(half[s] == pytest.approx(full[s], rel=0.02) for s in (1, 2))
        model, variables, _ = checkpointing.restore_model(tmp_path / "bf16", "latest")
        assert model.dtype == jnp.bfloat16
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype("float32")}
        x = np.random.default_rng(0).random((12, 14, 3)).astype(np.float32)
        reference = inference.predict(model.clone(dtype=jnp.float32), variables, x)
        out = inference.predict(model, variables, x)
        assert out.shape == (24, 28, 3) and np.abs(out - reference).max() < 0.02

    def test_non_finite_stops_before_saving(self, data_dir, tmp_path):
        config = tiny_config(data_dir, learning_rate=float("nan"), checkpoint_every=1)
        with pytest.raises(train_lib.NonFiniteError, match="non-finite .* at step 0"):
            train(config, tmp_path)
        assert not finished_checkpoints(tmp_path)

    def test_missing_dataset(self, tmp_path):
        config = tiny_config(tmp_path)
        config.data.train = "sr_div2k"
        with pytest.raises(FileNotFoundError, match="python -m enlca_jax.datasets"):
            train(config, tmp_path / "w")

    def test_misspelt_validation_set_fails_before_training(self, data_dir, tmp_path):
        config = tiny_config(data_dir)
        config.data.validation = "sr_benchmark/Set15"
        with pytest.raises(ValueError, match="no set 'Set15'"):
            train(config, tmp_path / "w")
        assert not (tmp_path / "w" / "metrics.jsonl").exists()

    def test_workdir_of_another_model_is_refused_before_any_work(self, data_dir, tmp_path):
        train(tiny_config(data_dir, num_train_steps=2, eval_every=100), tmp_path)
        record = (tmp_path / "config.json").read_text()
        metrics = (tmp_path / "metrics.jsonl").read_text()
        with pytest.raises(ValueError, match=r"(?s)different config.*model features: 8 -> 16"):
            train(tiny_config(data_dir, **{"model.features": 16}), tmp_path)
        assert (tmp_path / "config.json").read_text() == record
        assert (tmp_path / "metrics.jsonl").read_text() == metrics

    def test_cli_errors_are_one_line(self, data_dir, tmp_path):
        result = subprocess.run(
            [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={tmp_path}",
             f"--config.data.data_dir={data_dir}", "--config.keep_latest=0", "--config.learning_rate=-1"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "config.keep_latest = 0: must be >= 1" in result.stderr and "config.learning_rate = -1" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "config.json").exists()


class TestReplicas:
    def test_replicate_places_under_the_step_axis_without_compiling(self):
        tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(5), "host": np.ones((2, 2, 1), np.uint32)}
        jax.block_until_ready(tree)
        compiles = []

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                compiles.append(kwargs.get("fun_name"))

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            replicated = train_lib.replicate(tree)
            back = train_lib.host_replica(replicated)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert compiles == [], f"placing or fetching replicas compiled {compiles}"
        n = jax.local_device_count()
        for key, leaf in replicated.items():
            assert leaf.shape == (n, *np.shape(tree[key])) and leaf.sharding.spec == jax.P(train_lib.AXIS_NAME)
            assert len(leaf.addressable_shards) == n
            np.testing.assert_array_equal(back[key], np.asarray(tree[key]))
            assert back[key].dtype == np.asarray(tree[key]).dtype


def finished_checkpoints(workdir):
    """Steps of committed checkpoints (orbax renames a step's folder to its number when complete)."""
    folder = pathlib.Path(workdir) / "checkpoints"
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []

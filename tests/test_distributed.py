"""Multi-process training: two train.py processes with two CPU devices each (gloo collectives)
against one process with four, kill -9 of both and resume, SIGTERM to one of them, checkpoints
across process counts."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from test_train_lib import ROOT, finished_checkpoints, losses, metric_lines, tiny_config, train, wait_for_step

from configs import tiny
from enlca_jax import checkpointing, distributed

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo collectives between local processes")


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, *flags, processes=2, devices=2):
    """``processes`` train.py processes on this host, ``devices`` CPU devices each, one job."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    logs = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}_logs"
    logs.mkdir(exist_ok=True)
    started = []
    for index in range(processes):
        command = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}",
                   f"--config.data.data_dir={data_dir}", "--config.distributed.enabled=True",
                   f"--config.distributed.coordinator_address=localhost:{port}",
                   f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={index}",
                   *flags]  # fmt: skip
        # Output to files, not pipes: a process blocked on a full pipe would stall the collectives.
        log = open(logs / f"{port}_{index}.log", "w+")  # noqa: SIM115 - closed in finish()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        process.log = log
        started.append(process)
    return started


def output_of(process):
    process.log.flush()
    process.log.seek(0)
    return process.log.read()


def finish(processes, timeout=240, returncodes=None):
    deadline = time.time() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.wait()
        raise AssertionError("the processes did not finish:\n" + "\n".join(map(output_of, processes))) from None
    outputs = [output_of(process) for process in processes]
    for process, output, code in zip(processes, outputs, returncodes or (0,) * len(processes), strict=True):
        process.log.close()
        assert process.returncode == code, output
    return outputs


def params_of(workdir, which="latest"):
    _, variables, step = checkpointing.restore_model(workdir, which)
    return step, variables["params"]


def assert_params_close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)


class TestTwoProcesses:
    @pytest.mark.long
    def test_matches_one_process_survives_kill_and_sigterm_and_moves_between_process_counts(self, data_dir, tmp_path):
        # One job, checked step by step against one uninterrupted process with four devices:
        # two processes from scratch, killed (-9, both) after a checkpoint; the two started again
        # until SIGTERM reaches one of them; one process continuing their checkpoint; two processes
        # continuing that one's. The global batch of a step is the same on any process count, so
        # every loss of the job equals the reference's.
        n, total = 10, 24
        # Contrastive term on from the start: one train-step program to compile instead of two.
        options = {"eval_every": 1000, "checkpoint_every": 4, "keep_latest": 50, "contrastive.start_step": 0}
        common = [f"--config.{key}={value}" for key, value in options.items()]
        reference = tmp_path / "reference"
        train(tiny_config(data_dir, num_train_steps=total, **options), reference)
        expected = losses(reference)

        job = tmp_path / "job"
        endless = [f"--config.num_train_steps={n + 500}", *common]
        started = launch(job, data_dir, *endless)
        try:
            wait_for_step(job, 6, started[0], output=output_of)
            deadline = time.time() + 120
            while not finished_checkpoints(job) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            for process in started:
                process.send_signal(signal.SIGKILL)
                process.wait()
                process.log.close()
        assert finished_checkpoints(job)
        # Started again, the job runs past step n until SIGTERM reaches process 1 only: both
        # processes stop, with one checkpoint of the step they reached.
        started = launch(job, data_dir, *endless)
        wait_for_step(job, n, started[0], output=output_of)
        started[1].send_signal(signal.SIGTERM)
        outputs = finish(started, returncodes=(128 + signal.SIGTERM,) * 2)
        assert "resumed from step" in outputs[0]
        assert "another process stopped" in outputs[0] and "SIGTERM received" in outputs[1]
        stopped_at = max(losses(job))
        assert n <= stopped_at <= total - 4, f"SIGTERM took until step {stopped_at} to stop the job"
        assert max(finished_checkpoints(job)) == stopped_at
        assert_params_close(params_of(job, "8")[1], params_of(reference, "8")[1])
        assert (job / "metrics.jsonl").is_file() and (job / "config.json").is_file()

        # Their checkpoint continues in one process, and that one's in two again.
        train(tiny_config(data_dir, num_train_steps=stopped_at + 2, **options), job)
        assert params_of(job)[0] == stopped_at + 2
        finish(launch(job, data_dir, f"--config.num_train_steps={stopped_at + 4}", *common))
        assert params_of(job)[0] == stopped_at + 4

        steps = [step for step, _ in metric_lines(job, "loss")]
        assert sorted(steps) == list(range(1, stopped_at + 5)), "steps missing or written twice"
        got = losses(job)
        for step in range(1, stopped_at + 5):
            assert got[step] == pytest.approx(expected[step], rel=1e-4), step


class TestLaunchConfig:
    def options(self, **fields):
        options = tiny.get_config().distributed
        for key, value in fields.items():
            options[key] = value
        return options

    def test_fields_then_environment(self, monkeypatch):
        for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
            monkeypatch.delenv(variable, raising=False)
        assert distributed.launch_arguments(self.options()) == {}
        fields = self.options(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                              local_device_ids="0,1")  # fmt: skip
        assert distributed.launch_arguments(fields) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                        "process_id": 2, "local_device_ids": [0, 1]}  # fmt: skip
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:9")
        monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
        monkeypatch.setenv("JAX_PROCESS_ID", "1")
        assert distributed.launch_arguments(self.options()) == {"coordinator_address": "host:9", "num_processes": 2,
                                                                "process_id": 1}  # fmt: skip
        monkeypatch.setenv("JAX_PROCESS_ID", "one")
        with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
            distributed.launch_arguments(self.options())

    def test_no_cluster_says_what_to_set(self, monkeypatch):
        calls = []

        def initialize(**kwargs):
            calls.append(kwargs)
            raise ValueError("Number of processes must be defined.")

        monkeypatch.setattr(jax.distributed, "initialize", initialize)
        monkeypatch.setattr(jax.config, "update", lambda *args: None)
        with pytest.raises(ValueError, match="coordinator_address=HOST:PORT.*num_processes=N.*process_id=I"):
            distributed.initialize(self.options(enabled=True))
        assert calls

    def test_gathered_bytes_are_padded_to_few_shapes(self, monkeypatch):
        # Each gathered shape compiles a program: JSON of 70 and of 100 bytes share one.
        shapes = []
        real = distributed.multihost_utils.process_allgather

        def allgather(x):
            shapes.append(np.shape(x))
            return real(x)

        monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
        for data in (b"x" * 70, b"y" * 100, b"", b"z" * 129):
            assert distributed._allgather_bytes(data) == [data]
        assert shapes[1::2] == [(128,), (128,), (64,), (256,)]

    def test_single_process_helpers_are_local(self):
        config = ml_collections.ConfigDict({"distributed": {"process_id": 0}})
        distributed.check_same_config(config)
        assert distributed.gather_json({"a": 1}) == [{"a": 1}]
        assert distributed.any_process(True) and not distributed.any_process(False)
        assert distributed.from_process_0(1.5) == 1.5

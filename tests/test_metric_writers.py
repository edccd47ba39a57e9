"""enlca_jax.metric_writers: JSON lines and TensorBoard files, and a resume that leaves no step twice."""

import json

import numpy as np
from conftest import read_tensorboard

from enlca_jax import metric_writers


def jsonl_steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_and_images(tmp_path):
    writer = metric_writers.MetricWriter(tmp_path)
    writer.write_scalars(1, {"loss": 0.5, "l1": np.float32(0.25)})
    writer.write_scalars(2, {"loss": float("nan")})
    writer.write_images(2, {"samples/a": np.zeros((4, 6, 3), np.uint8)})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "l1": 0.25}, {"step": 2, "loss": "nan"}]
    assert read_tensorboard(tmp_path / "tb") == [(1, "loss", "scalar"), (1, "l1", "scalar"), (2, "loss", "scalar"),
                                                 (2, "samples/a", "image")]  # fmt: skip


def test_resume_drops_later_lines_and_a_cut_one(tmp_path):
    writer = metric_writers.MetricWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write_scalars(step, {"loss": step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a crash in mid-line
    # Resumed from the checkpoint of step 2: steps 3 and 4 are written again by the resumed run.
    writer = metric_writers.MetricWriter(tmp_path, resume_step=2)
    for step in (3, 4):
        writer.write_scalars(step, {"loss": 10 * step})
    writer.close()
    assert jsonl_steps(tmp_path) == [1, 2, 3, 4]  # the file's lines, not a dict keyed by step
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 30, 40]
    # TensorBoard gets a purge marker at step 2 in the new file, so it drops the first run's 3 and 4.
    files = sorted((tmp_path / "tb").iterdir())
    assert len(files) == 2 and [s for s, _, _ in read_tensorboard(tmp_path / "tb")] == [1, 2, 3, 4, 3, 4]


def test_disabled_writes_nothing(tmp_path):
    writer = metric_writers.MetricWriter(tmp_path / "w", enabled=False, resume_step=3)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"a": np.zeros((2, 2, 3), np.uint8)})
    writer.close()
    assert not (tmp_path / "w").exists()

"""enlca_jax.input_pipeline: aligned paired crops, paired augmentation, determinism, resume, shards."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from conftest import random_image

from enlca_jax import input_pipeline


def coordinate_source(n=6, scale=2, seed=0):
    """Examples whose LR is HR subsampled, so crops can be checked for alignment exactly."""
    rng = np.random.default_rng(seed)
    source = []
    for i in range(n):
        hr = random_image(rng, 24 + 2 * i, 30)
        source.append({"name": f"im{i}".encode(), "hr": hr, f"lr_x{scale}": hr[::scale, ::scale][: 12 + i, :15]})
    return source


class TestPipeline:
    def test_batches_and_alignment(self):
        source = coordinate_source()
        it = iter(input_pipeline.train_dataset(source, scale=2, patch_size=8, batch_size=3, seed=0, augment=False))
        for _ in range(4):
            batch = next(it)
            assert batch["lr"].shape == (3, 8, 8, 3) and batch["hr"].shape == (3, 16, 16, 3)
            np.testing.assert_array_equal(batch["hr"][:, ::2, ::2], batch["lr"])

    def test_augment_is_paired(self):
        rng = np.random.default_rng(4)
        lr = random_image(rng, 5, 7)
        hr = np.repeat(np.repeat(lr, 3, 0), 3, 1)
        seen = set()
        for seed in range(40):
            a, b = input_pipeline.augment(lr, hr, np.random.default_rng(seed))
            np.testing.assert_array_equal(np.repeat(np.repeat(a, 3, 0), 3, 1), b)
            seen.add(a.tobytes())
        assert len(seen) == 8

    def test_deterministic_and_resumable(self):
        source = coordinate_source()

        def stream():
            return iter(input_pipeline.train_dataset(source, scale=2, patch_size=6, batch_size=2, seed=7))

        a, b = stream(), stream()
        first = [next(a)["lr"] for _ in range(5)]
        np.testing.assert_array_equal(np.stack(first), np.stack([next(b)["lr"] for _ in range(5)]))
        state = a.get_state()
        expected = [next(a)["lr"] for _ in range(4)]  # crosses the epoch boundary (6 images)
        resumed = stream()
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(expected), np.stack([next(resumed)["lr"] for _ in range(4)]))

    def test_worker_processes_give_the_same_stream_and_resume(self):
        source = coordinate_source()

        def stream(workers):
            dataset = input_pipeline.train_dataset(source, scale=2, patch_size=6, batch_size=2, seed=7,
                                                   worker_count=workers)  # fmt: skip
            return iter(dataset)

        serial, parallel = stream(0), stream(2)
        for _ in range(4):
            a, b = next(serial), next(parallel)
            np.testing.assert_array_equal(a["lr"], b["lr"])
            np.testing.assert_array_equal(a["hr"], b["hr"])
        state = parallel.get_state()
        expected = [next(serial)["hr"] for _ in range(4)]  # crosses the epoch boundary (6 images)
        resumed = stream(2)
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(expected), np.stack([next(resumed)["hr"] for _ in range(4)]))

    def test_process_shares_make_up_the_global_stream(self):
        # 8 images, global batch 4 = 2 processes × 2: within each epoch the processes get disjoint
        # images that together are all of them, and the same pairs and crops as one process gets.
        rng = np.random.default_rng(5)  # HR: noise, so that crops at different offsets differ
        lr = [np.full((10, 10, 3), i, np.uint8) for i in range(8)]
        source = [{"name": f"im{i}".encode(), "hr": random_image(rng, 20, 20), "lr_x2": lr[i]} for i in range(8)]
        common = {"scale": 2, "patch_size": 4, "seed": 3}
        single = iter(input_pipeline.train_dataset(source, batch_size=4, **common))
        shares = [iter(input_pipeline.train_dataset(source, batch_size=2, shard_index=i, shard_count=2, **common))
                  for i in range(2)]  # fmt: skip
        for _ in range(3):  # epochs
            images = [set(), set()]
            for _ in range(2):
                whole = next(single)
                parts = [next(share) for share in shares]
                for key in ("lr", "hr"):  # stream positions 0, 2 to process 0 and 1, 3 to process 1
                    np.testing.assert_array_equal(whole[key][0::2], parts[0][key])
                    np.testing.assert_array_equal(whole[key][1::2], parts[1][key])
                for index, part in enumerate(parts):
                    images[index] |= set(part["lr"][:, 0, 0, 0].tolist())
            assert not images[0] & images[1] and images[0] | images[1] == set(range(8))

    def test_start_continues_the_global_stream_on_another_process_count(self):
        # A run at step t moved from 1 process to 2 (or back): batch t onwards of each share is the
        # global batch t onwards, split as the shares split it, across epoch boundaries.
        rng = np.random.default_rng(6)
        source = [{"name": f"im{i}".encode(), "hr": random_image(rng, 20, 20), "lr_x2": random_image(rng, 10, 10)}
                  for i in range(6)]  # fmt: skip
        common = {"scale": 2, "patch_size": 4, "seed": 3}
        single = iter(input_pipeline.train_dataset(source, batch_size=4, **common))
        whole = [next(single) for _ in range(7)]
        for t in (1, 5):
            shares = [iter(input_pipeline.train_dataset(source, batch_size=2, shard_index=i, shard_count=2, start=t,
                                                        **common)) for i in range(2)]  # fmt: skip
            moved = iter(input_pipeline.train_dataset(source, batch_size=4, start=t, **common))
            for step in range(t, 7):
                parts = [next(share) for share in shares]
                again = next(moved)
                for key in ("lr", "hr"):
                    np.testing.assert_array_equal(whole[step][key][0::2], parts[0][key])
                    np.testing.assert_array_equal(whole[step][key][1::2], parts[1][key])
                    np.testing.assert_array_equal(whole[step][key], again[key])
        with pytest.raises(ValueError, match="start must be >= 0"):
            input_pipeline.train_dataset(source, batch_size=4, start=-1, **common)

    def test_errors(self):
        source = coordinate_source()
        with pytest.raises(ValueError, match=r"smaller than the patch 14 .* im0 \(12×15\)"):
            input_pipeline.train_dataset(source, scale=2, patch_size=14, batch_size=2, seed=0)
        with pytest.raises(ValueError, match="scale 4 has no LR"):
            input_pipeline.train_dataset(source, scale=4, patch_size=4, batch_size=2, seed=0)
        with pytest.raises(ValueError, match="no images"):
            input_pipeline.train_dataset([], scale=2, patch_size=4, batch_size=2, seed=0)
        with pytest.raises(ValueError, match="1 training images cannot be shared by 2 processes"):
            input_pipeline.train_dataset(
                source[:1], scale=2, patch_size=4, batch_size=1, seed=0, shard_count=2, shard_index=1
            )


WORKER_SCRIPT = """
import numpy as np, psutil, sys, time
from enlca_jax import input_pipeline
rng = np.random.default_rng(0)
source = [{"name": b"a", "hr": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
           "lr_x2": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)}]
it = iter(input_pipeline.train_dataset(source, scale=2, patch_size=8, batch_size=1, seed=0, worker_count=1))
next(it)
print(" ".join(str(c.pid) for c in psutil.Process().children(recursive=True)), flush=True)
time.sleep(120)
"""


def test_grain_workers_end_when_the_trainer_is_killed():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], cwd=root, env=env, stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert workers, "grain started no worker process"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        alive = [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        time.sleep(0.2)
    assert not alive, f"grain workers {alive} outlived the killed trainer"

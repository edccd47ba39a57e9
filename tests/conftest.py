"""Test set-up: 4 fake CPU devices and the XLA:CPU tuning (before jax initialises), shared helpers.

The suite runs on the CPU whatever the machine has, as its programs do there: `enlca_jax.cpu.setup`
adds its XLA flags (the models under test keep XLA's own convolutions unless a test passes the CPU
ones). A caller's device count is replaced: the multi-device tests need exactly 4.
"""

import os
import pathlib
import struct

_COUNT = "--xla_force_host_platform_device_count"
_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(_COUNT)]
os.environ["XLA_FLAGS"] = " ".join([*_flags, f"{_COUNT}=4"])
os.environ["JAX_PLATFORMS"] = "cpu"

from enlca_jax import cpu  # noqa: E402

cpu.setup()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"
#: The shared SR data beside a developer's checkout; a user's clone does not have it.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def override(config, fields: dict):
    """``config`` with dotted fields set, e.g. ``{"model.features": 16}``."""
    for key, value in fields.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def load_golden(name: str) -> dict:
    """Arrays of one golden file (made by the authors' PyTorch code, see golden/README.md)."""
    with np.load(GOLDEN / name) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not (SHARED_DATA / "benchmark" / "Set5" / "HR").is_dir():
        pytest.skip(f"needs the shared SR data at {SHARED_DATA} (not part of a user's clone)")
    return SHARED_DATA


def write(path, array) -> None:
    """Save an image array with PIL, creating the folder."""
    from PIL import Image  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def random_image(rng, h, w, c=3):
    """Random uint8 image [h, w, c] ([h, w] for c = 0)."""
    shape = (h, w, c) if c else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def read_tensorboard(folder) -> list[tuple[int, str, str]]:
    """(step, tag, 'scalar' | 'image') of every summary in a folder of TensorBoard event files,
    parsed with the Event protocol buffer of tensorboardX (the writer), one TFRecord at a time."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out = []
    for path in sorted(pathlib.Path(folder).iterdir()):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                out.append((event.step, value.tag, "image" if value.HasField("image") else "scalar"))
    return out

"""Test set-up: 4 fake CPU devices, the XLA:CPU tuning and a compilation cache (before jax
initialises), shared helpers.

The suite runs on the CPU whatever the machine has, as its programs do there: `enlca_jax.cpu.setup`
adds its XLA flags (the models under test keep XLA's own convolutions unless a test passes the CPU
ones). A caller's device count is replaced: the multi-device tests need exactly 4.

Compilation is most of the suite's time and many tests compile the same programs (the tiny
model's initialisation and train step, in this process and in the train.py processes it starts),
so the suite shares one JAX persistent compilation cache: a fresh folder per run, removed at the
end, handed to pytest-xdist workers and subprocesses through the environment. It changes how long
a compile takes, never what runs: a cached executable is the one XLA would compile. The suite runs
on one xdist worker per core (pyproject.toml), since compiling uses one core at a time; ``-n 0``
runs it in this process.
"""

import os
import pathlib
import shutil
import struct
import tempfile

_COUNT = "--xla_force_host_platform_device_count"
_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(_COUNT)]
os.environ["XLA_FLAGS"] = " ".join([*_flags, f"{_COUNT}=4"])
os.environ["JAX_PLATFORMS"] = "cpu"
# pytest-xdist workers (PYTEST_XDIST_WORKER) inherit the folder their controller made.
_OWNS_CACHE = "ENLCA_TEST_COMPILE_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["ENLCA_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="enlca_jax_test_compile_cache_")
_CACHE = os.environ["ENLCA_TEST_COMPILE_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

from enlca_jax import cpu  # noqa: E402

cpu.setup()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` first: with several workers they then run beside the rest of the suite
    instead of after it."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """The embedded default dataset (``sr_skimage``) in TFDS form, prepared once for the whole run."""
    from enlca_jax import datasets  # noqa: PLC0415

    directory = tmp_path_factory.mktemp("tfds")
    datasets.prepare("sr_skimage", directory)
    return directory


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


def random_variables(model, seed: int, scale: float = 0.1) -> dict:
    """Variables of ``model``'s structure and shapes filled with normal(0, scale) values, made on
    the host: for tests that need some variables, not the initialiser's (XLA:CPU takes seconds to
    compile a model's initialisation)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from enlca_jax import models  # noqa: PLC0415

    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.normal(0, scale, leaf.shape), leaf.dtype), shapes)


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

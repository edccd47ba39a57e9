"""Test set-up: 4 fake CPU devices (before jax is imported) and shared helpers."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"
#: The shared SR data beside a developer's checkout; a user's clone does not have it.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def load_golden(name: str) -> dict:
    """Arrays of one golden file (made by the authors' PyTorch code, see golden/README.md)."""
    with np.load(GOLDEN / name) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not (SHARED_DATA / "benchmark" / "Set5" / "HR").is_dir():
        pytest.skip(f"needs the shared SR data at {SHARED_DATA} (not part of a user's clone)")
    return SHARED_DATA

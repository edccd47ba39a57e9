"""`import enlca_jax` adds its XLA:CPU defaults to XLA_FLAGS unless the user named them."""

import os
import subprocess
import sys

import pytest

SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
YNN = "--xla_cpu_experimental_ynn_fusion_type"


def flags_after_import(xla_flags: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    code = "import os, enlca_jax; print(os.environ['XLA_FLAGS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_defaults_are_added():
    import enlca_jax

    flags = flags_after_import(None).split()
    assert f"{SCHEDULER}=false" in flags
    if enlca_jax._jaxlib_version() == (0, 10):
        assert f"{YNN}=" in flags
    else:  # an unknown flag would abort XLA, so other versions do not get it
        assert not any(flag.startswith(YNN) for flag in flags)


@pytest.mark.parametrize("named", [f"{SCHEDULER}=true", f"{YNN}=dot,eltwise"])
def test_a_flag_the_user_names_wins(named):
    flags = flags_after_import(f"--xla_force_host_platform_device_count=2 {named}").split()
    assert named in flags and "--xla_force_host_platform_device_count=2" in flags
    name = named.split("=")[0]
    assert [flag for flag in flags if flag.startswith(name + "=")] == [named]

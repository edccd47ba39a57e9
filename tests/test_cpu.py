"""enlca_jax.cpu: where its tuning applies (only on the CPU), what `setup` changes, and that the library
changes nothing by being imported."""

import os
import pathlib
import subprocess
import sys

import pytest

from enlca_jax import cpu
from enlca_jax.cpu import host_memory, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code, env_updates=(), remove=("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_PLATFORMS"), timeout=240):
    env = {key: value for key, value in os.environ.items() if key not in remove}
    env.update({"PYTHONPATH": str(ROOT), **dict(env_updates)})
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class TestImportHasNoSideEffects:
    def test_every_module(self):
        code = """
import os, pkgutil, importlib, json, jax
from jax._src import xla_bridge
def snapshot():
    return dict(os.environ), {name: str(jax.config.values[name]) for name in sorted(jax.config.values)}
before = snapshot()
import enlca_jax
names = [m.name for m in pkgutil.walk_packages(enlca_jax.__path__, "enlca_jax.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
after = snapshot()
changed_env = {k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k)}
changed_config = {k for k in before[1] if before[1][k] != after[1].get(k)}
print(json.dumps({"modules": len(names), "env": sorted(changed_env), "config": sorted(changed_config),
                  "backends": xla_bridge.backends_are_initialized()}))
"""
        import json

        report = json.loads(run_python(code).stdout.splitlines()[-1])
        assert report["modules"] >= 20
        assert report == {**report, "env": [], "config": [], "backends": False}


class TestWhereItApplies:
    @pytest.mark.parametrize(
        "environ,plugins,expected",
        [
            ({}, [], True),
            ({}, ["xla_cuda12"], False),  # jax[cuda12]
            ({}, ["tpu"], False),  # libtpu
            ({"JAX_PLATFORMS": "cuda"}, [], False),
            ({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"], True),  # the user asked for the CPU
            ({"JAX_PLATFORMS": "tpu,cpu"}, [], False),
            ({"JAX_PLATFORMS": "CPU, cuda"}, [], True),
        ],
    )
    def test_decision(self, environ, plugins, expected):
        assert cpu.computes_on_cpu(environ, plugins) is expected

    def test_nothing_happens_on_an_accelerator_host(self):
        # JAX_PLATFORMS names the GPU: no XLA flags, no glibc tunables, no restart, no CPU convs.
        code = """
import os
print("start", os.getpid(), flush=True)
from enlca_jax import cpu
conv = cpu.setup(restart=True, single_arena=True)
print("done", os.getpid(), conv, repr(os.environ.get("XLA_FLAGS")), repr(os.environ.get("GLIBC_TUNABLES")))
"""
        lines = run_python(code, {"JAX_PLATFORMS": "cuda"}).stdout.split("\n")
        assert [line.split()[0] for line in lines if line] == ["start", "done"]
        assert lines[1].split()[2:] == ["None", "None", "None"]

    def test_on_the_cpu_flags_restart_and_convs(self):
        code = """
import os
print("start", os.getpid(), flush=True)
from enlca_jax import cpu
conv = cpu.setup(restart=True)
print("done", os.getpid(), conv is cpu.conv_general_dilated, os.environ["XLA_FLAGS"], "|",
      os.environ.get("GLIBC_TUNABLES", ""), flush=True)
"""
        out = run_python(code, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_use_onednn=false"}).stdout
        starts = [line.split()[1] for line in out.splitlines() if line.startswith("start")]
        (done,) = [line for line in out.splitlines() if line.startswith("done")]
        assert len(starts) == 2 and starts[0] == starts[1] == done.split()[1], "restarted once, same process"
        flags, tunables = done.split(" ", 3)[3].split(" | ")
        assert flags.split()[0] == "--xla_cpu_use_onednn=false"  # the user's flags are kept
        assert f"{xla_flags.SCHEDULER}=false" in flags.split()
        if host_memory.retained_memory_environment({}) is not None:  # Linux with glibc
            assert tunables.split(":") == list(host_memory.TUNABLES)

    def test_too_late_is_an_error_naming_the_fix(self):
        code = """
import jax, jax.numpy as jnp
jnp.ones(3).block_until_ready()  # backends initialised without the flags
from enlca_jax import cpu
try:
    cpu.setup()
except RuntimeError as error:
    print(error)
"""
        assert "call it first thing" in run_python(code, {"JAX_PLATFORMS": "cpu"}).stdout


class TestFlags:
    def test_missing_flags_are_added(self):
        flags = xla_flags.with_flags("--xla_force_host_platform_device_count=2", (0, 10)).split()
        assert flags == ["--xla_force_host_platform_device_count=2", f"{xla_flags.SCHEDULER}=false",
                         f"{xla_flags.YNN_FUSIONS}="]  # fmt: skip

    def test_ynn_flag_only_on_jaxlib_0_10(self):
        # An unknown flag aborts XLA, so other jaxlib versions do not get it.
        assert xla_flags.with_flags("", (0, 11)).split() == [f"{xla_flags.SCHEDULER}=false"]

    @pytest.mark.parametrize("named", [f"{xla_flags.SCHEDULER}=true", f"{xla_flags.YNN_FUSIONS}=dot,eltwise"])
    def test_a_flag_the_user_names_wins(self, named):
        flags = xla_flags.with_flags(named, (0, 10)).split()
        assert [flag for flag in flags if flag.startswith(named.split("=")[0] + "=")] == [named]

    @pytest.mark.parametrize(
        "flags,prone",
        [
            ("", True),
            (f"{xla_flags.SCHEDULER}=true", True),
            (f"{xla_flags.SCHEDULER}=false", False),
            (f"{xla_flags.YNN_FUSIONS}=", False),
            (f"{xla_flags.YNN_FUSIONS}=dot", True),
        ],
    )
    def test_deadlock_prone(self, flags, prone):
        assert xla_flags.deadlock_prone({"XLA_FLAGS": flags}, (0, 10)) is prone
        assert not xla_flags.deadlock_prone({"XLA_FLAGS": flags}, (0, 11))


def test_full_x4_model_without_setup_runs_or_says_what_to_call():
    # A library user who follows the README's "ENLCN model and inference" without calling
    # enlca_jax.cpu.setup(): the forward runs, and a warning names the one line that makes the
    # gradient safe (it would deadlock with XLA:CPU's defaults on jaxlib 0.10).
    code = """
import warnings
import jax, numpy as np
from enlca_jax import inference, models
warnings.simplefilter("always")
model = models.ENLCN(scale=4)                 # the authors' ×4 model
variables = models.init_variables(model, jax.random.key(0))
lr = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
with warnings.catch_warnings(record=True) as caught:
    sr = inference.predict(model, variables, lr)
print(sr.shape, np.isfinite(sr).all())
print("WARNING:", " ".join(str(w.message) for w in caught))
"""
    out = run_python(code, {"JAX_PLATFORMS": "cpu"}).stdout
    assert "(96, 96, 3) True" in out
    if xla_flags.jaxlib_version() == (0, 10):
        assert "enlca_jax.cpu.setup()" in out.split("WARNING:")[1]

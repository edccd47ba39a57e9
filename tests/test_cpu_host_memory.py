"""enlca_jax.cpu.host_memory: which environment a restart gets, and that the restart keeps freed memory."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from enlca_jax.cpu import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_environment_adds_every_tunable():
    env = host_memory.retained_memory_environment({"PATH": "/bin"}, "linux", "glibc")
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"].split(":") == list(host_memory.TUNABLES)
    env = host_memory.retained_memory_environment({}, "linux", "glibc", single_arena=True)
    assert env["GLIBC_TUNABLES"].split(":") == [*host_memory.TUNABLES, host_memory.SINGLE_ARENA]
    # A user's own arena_max wins.
    env = host_memory.retained_memory_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, "linux", "glibc",
                                                  single_arena=True)  # fmt: skip
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=4", *host_memory.TUNABLES]


def test_user_tunables_win_and_ours_fill_the_rest():
    user = "glibc.malloc.mmap_max=4:glibc.cpu.x86_shstk=on"
    env = host_memory.retained_memory_environment({"GLIBC_TUNABLES": user}, "linux", "glibc")
    parts = env["GLIBC_TUNABLES"].split(":")
    assert parts[:2] == user.split(":")
    assert "glibc.malloc.mmap_max=0" not in parts
    assert set(parts[2:]) == {t for t in host_memory.TUNABLES if not t.startswith("glibc.malloc.mmap_max")}


def test_no_restart_when_set_opted_out_or_not_glibc():
    done = {"GLIBC_TUNABLES": ":".join(host_memory.TUNABLES)}
    assert host_memory.retained_memory_environment(done, "linux", "glibc") is None
    assert host_memory.retained_memory_environment(done, "linux", "glibc", single_arena=True) is not None
    both = {"GLIBC_TUNABLES": ":".join([*host_memory.TUNABLES, host_memory.SINGLE_ARENA])}
    assert host_memory.retained_memory_environment(both, "linux", "glibc", single_arena=True) is None
    assert host_memory.retained_memory_environment({"ENLCA_HOST_ALLOCATOR": "system"}, "linux", "glibc") is None
    assert host_memory.retained_memory_environment({}, "darwin", "") is None
    assert host_memory.retained_memory_environment({}, "linux", "musl") is None


def test_unknown_choice_is_an_error():
    with pytest.raises(ValueError, match="ENLCA_HOST_ALLOCATOR must be 'retain'"):
        host_memory.retained_memory_environment({"ENLCA_HOST_ALLOCATOR": "jemalloc"}, "linux", "glibc")


_SCRIPT = """
import os, resource, sys, threading
import numpy as np
print("start", os.getpid(), flush=True)
from enlca_jax.cpu import host_memory
host_memory.reexec_with_retained_memory(single_arena=os.environ.get("TEST_SINGLE_ARENA") == "1")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(2**26, np.float32); del a  # 256 MiB touched, then freed
before = faults()
b = np.ones(2**26, np.float32)  # the same size again: fresh pages, or the freed ones
main_faults = faults() - before
del b
counts = []

def in_a_thread():  # XLA:CPU allocates from its worker threads: glibc gives those their own arenas
    c = np.ones(2**26, np.float32); del c
    before = faults()
    d = np.ones(2**26, np.float32)
    counts.append(faults() - before)

thread = threading.Thread(target=in_a_thread); thread.start(); thread.join()
print("thread", counts[0], flush=True)
print("done", os.getpid(), sys.argv[1:], main_faults, os.environ.get("GLIBC_TUNABLES", ""), flush=True)
"""


def _run(extra_env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra_env}
    env.pop("GLIBC_TUNABLES", None)
    result = subprocess.run([sys.executable, "-c", _SCRIPT, "--flag", "value"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [(line + " ").split(" ", 2) for line in result.stdout.splitlines()]


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc tunables exist only on Linux with glibc")
def test_restart_keeps_pid_and_arguments_and_reuses_freed_memory():
    lines = _run({})
    starts = [pid for kind, pid, _ in lines if kind == "start"]
    (done,) = [rest for kind, _, rest in lines if kind == "done"]
    assert len(starts) == 2 and starts[0] == starts[1], "restarted exactly once, in the same process"
    assert done.startswith("['--flag', 'value'] ")
    faults, tunables = done.split("] ", 1)[1].split(" ", 1)
    assert tunables.strip().split(":") == list(host_memory.TUNABLES)
    assert int(faults) < 16, f"{faults} page faults: the freed 256 MiB were not reused"
    # glibc caps a thread arena's heap at 64 MiB and mmaps (and on free unmaps) anything bigger,
    # whatever mmap_max says: a thread's block is faulted in again (128 huge or 65536 small pages).
    (thread_faults,) = [int(count) for kind, count, _ in lines if kind == "thread"]
    assert thread_faults >= 64


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc tunables exist only on Linux with glibc")
def test_single_arena_reuses_a_threads_freed_memory_too():
    lines = _run({"TEST_SINGLE_ARENA": "1"})
    (done,) = [rest for kind, _, rest in lines if kind == "done"]
    faults, tunables = done.split("] ", 1)[1].split(" ", 1)
    assert tunables.strip().split(":") == [*host_memory.TUNABLES, host_memory.SINGLE_ARENA]
    (thread_faults,) = [int(count) for kind, count, _ in lines if kind == "thread"]
    assert int(faults) < 16 and thread_faults < 16, f"{faults}, {thread_faults} page faults: memory not reused"


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc tunables exist only on Linux with glibc")
def test_opt_out_keeps_the_system_allocator():
    lines = _run({"ENLCA_HOST_ALLOCATOR": "system"})
    assert [kind for kind, _, _ in lines] == ["start", "thread", "done"], "no restart"
    faults = int(lines[2][2].split("] ", 1)[1].split(" ", 1)[0])
    # glibc unmaps the freed block; the new one faults in 128 huge pages or 65536 small ones.
    assert faults >= 64
    assert int(lines[1][1]) >= 64

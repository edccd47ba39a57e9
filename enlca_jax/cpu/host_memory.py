"""Host-memory allocator settings that keep freed memory in the process (glibc, Linux).

XLA:CPU allocates each execution's temporaries with ``malloc`` and frees them when it returns.
glibc serves every block above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so each
train step would page-fault and zero all of its multi-GiB working set again (millions of faults
and seconds of kernel time per ×4 step). `TUNABLES` keep freed blocks on the heap for the next
call. Training runs with them and glibc's per-thread arenas; one arena for all threads
(`SINGLE_ARENA`) suits programs that run the same shapes call after call (inference), but a
training loop's single heap fragments step after step (its RSS grows). docs/performance.md has
the measurements.

One more glibc rule: a thread other than the main one allocates from its own arena, whose heaps
are at most 64 MiB, and a bigger block there is always a fresh ``mmap`` that ``free`` unmaps.
XLA:CPU allocates from its worker threads, so only `SINGLE_ARENA` makes its big buffers reusable.

glibc reads its tunables only when a process starts, so `reexec_with_retained_memory` restarts
the running program once with them (``os.execve``: same process id, same interpreter options and
arguments). `enlca_jax.cpu.setup` does this for programs that compute on the CPU; set
``ENLCA_HOST_ALLOCATOR=system`` to keep glibc's defaults (memory is then returned to the system
after each step, at the cost above).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

OPT_OUT_VARIABLE = "ENLCA_HOST_ALLOCATOR"
TUNABLES = (
    "glibc.malloc.hugetlb=1",  # madvise(MADV_HUGEPAGE) on the heap: 2 MiB pages, 512× fewer faults
    "glibc.malloc.mmap_max=0",  # large blocks come from the heap, not from fresh mmaps
    f"glibc.malloc.trim_threshold={2**40}",  # the freed top of the heap is never returned
)
#: One heap for all threads, for programs that run the same shapes call after call (inference).
SINGLE_ARENA = "glibc.malloc.arena_max=1"


def retained_memory_environment(
    environ: Mapping[str, str], system: str = sys.platform, libc: str | None = None, single_arena: bool = False
) -> dict[str, str] | None:
    """The environment to restart with, or None when the process needs no restart.

    None when not on Linux with glibc, when ``ENLCA_HOST_ALLOCATOR=system``, or when
    ``GLIBC_TUNABLES`` already sets every tunable of `TUNABLES` (and `SINGLE_ARENA` with
    ``single_arena``; the user's values win: ours are appended only for the names they do not set).
    """
    if system != "linux" or (libc if libc is not None else platform.libc_ver()[0]) != "glibc":
        return None
    choice = environ.get(OPT_OUT_VARIABLE, "retain")
    if choice == "system":
        return None
    if choice != "retain":
        raise ValueError(f"{OPT_OUT_VARIABLE} must be 'retain' (default) or 'system', got {choice!r}.")
    current = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in current}
    wanted = TUNABLES + ((SINGLE_ARENA,) if single_arena else ())
    missing = [t for t in wanted if t.split("=", 1)[0] not in names]
    if not missing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(current + missing)}


def reexec_with_retained_memory(single_arena: bool = False) -> None:
    """Restart this program with `TUNABLES` in ``GLIBC_TUNABLES`` unless it already runs with them.

    Call it first thing in a script's ``__main__`` block (before any large allocation; state
    built before the call is lost). Returns without restarting where `retained_memory_environment`
    gives None. ``single_arena`` adds `SINGLE_ARENA` (inference: see the module docstring).
    """
    env = retained_memory_environment(os.environ, single_arena=single_arena)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

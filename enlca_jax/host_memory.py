"""Host-memory allocator settings that keep freed memory in the process (glibc, Linux).

XLA:CPU allocates each execution's temporaries with ``malloc`` and frees them when it returns.
glibc serves every block above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so each
train step page-faults and zeroes all of its multi-GiB working set again. Measured on the 2-core
CPU machine (2026-11-27), ×4 ENLCN train step (batch 16, LR patch 48), glibc defaults: 2.6–2.9 M
minor page faults and 16–21 s of kernel CPU time per step, 84.9–91.6 s per step. With `TUNABLES`
plus ``arena_max=1``, after the first step (which fills the heap): 0–258 faults, 0.3–1.5 s of
kernel time, 77.5–78.2 s. `benchmarks/train_step.py`, consecutive runs: glibc defaults 90.2 s,
peak RSS 9.3 GiB; `TUNABLES` + ``arena_max=1`` 77.4 s but 15.8 GiB (the one heap fragments, so
``arena_max`` is left alone); `TUNABLES` 81.0 s, 9.4 GiB. ENLA forward+backward (N = 96²,
batch 4): 32 k faults per call with the defaults, 94–4.7 k with `TUNABLES`.

One more glibc rule: a thread other than the main one allocates from its own arena, whose heaps
are at most 64 MiB, and a bigger block there is always a fresh ``mmap`` (``mmap_max`` does not
apply) that ``free`` unmaps. XLA:CPU allocates from its worker threads, so its big buffers are
still faulted in on every call. `SINGLE_ARENA` (``arena_max=1``: every thread on the main heap)
ends that, and the heap then lies almost entirely in transparent huge pages. Measured 2026-11-27
(later), glibc arenas → one arena: LR 128² ×4 inference 9.3–9.9 → 8.4–8.5 s per call (kernel time
1.1–1.4 → 0.02–0.04 s), 256² 34.4–35.6 → 34.0–34.5 s, peak RSS unchanged (1.2 and 1.6 GiB);
ENLA forward+backward (N = 96², batch 4) 114–121 → 108–110 ms. It does not suit training: step
after step the one heap fragments (×4 train loop, batch 16: RSS 7.8, 14.1, 14.1, 14.1, 20.5,
20.5 GiB after steps 0–5 with the state donated, 8.3, 14.6, 14.6, 21.0 GiB without; steps 71–72 s
where the heap did not grow, against 78.5 s and 9.1 GiB peak in `benchmarks/train_step.py` with
glibc's arenas), and so can exact attention's 1.4 GiB buffers. So ``eval.py`` and the inference
benchmarks ask for it (``single_arena=True``; ``benchmarks/attention.py`` with
``--single_arena``); ``train.py`` does not.

glibc reads its tunables only when a process starts, so `reexec_with_retained_memory` restarts
the running program once with them (``os.execve``: same process id, same interpreter options and
arguments). ``train.py``, ``eval.py`` and the benchmarks call it before they start; a library user
can call it at the top of their own script, or set ``GLIBC_TUNABLES`` themselves. Set
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

"""Shared benchmark helpers: machine facts, timing, the float32 matmul reference, JSON output."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enlca_jax.cpu import conv


def on_accelerator() -> bool:
    """True when jax's default backend is a GPU or TPU (not the CPU)."""
    return jax.default_backend() != "cpu"


def machine_info() -> dict[str, Any]:
    device = jax.devices()[0]
    limit = device_memory().get("device_limit_gib")
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "device_memory_gib": limit,  # what XLA's allocator may use on an accelerator; None on the CPU
        # Precision of float32 products for the benchmarks and the matmul reference alike (None:
        # XLA's default, which on NVIDIA GPUs may use TF32 tensor cores).
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
        "matmul_size": matmul_size(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # enlca_jax.cpu.host_memory
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_memory() -> dict[str, float]:
    """Accelerator memory of device 0 in GiB: in use now, the peak so far (over the whole process)
    and the allocator's limit; empty where the backend keeps no such statistics (the CPU)."""
    stats = jax.devices()[0].memory_stats() if on_accelerator() else None
    if not stats:
        return {}
    names = {"bytes_in_use": "device_in_use_gib", "peak_bytes_in_use": "device_peak_gib",
             "bytes_limit": "device_limit_gib"}  # fmt: skip
    return {name: stats[key] / 2**30 for key, name in names.items() if key in stats}


def _timed_group(fn: Callable[[], Any], calls: int) -> float:
    """Wall seconds per call of ``calls`` calls dispatched back to back, blocked on the last."""
    start = time.perf_counter()
    for _ in range(calls - 1):
        fn()
    jax.block_until_ready(fn())
    return (time.perf_counter() - start) / calls


def time_fn(
    fn: Callable[[], Any],
    repeats: int = 3,
    warmup: int = 1,
    min_seconds: float = 0.0,
    group_seconds: float | None = None,
) -> float:
    """Median wall seconds of ``fn()`` (its result blocked on), after ``warmup`` calls.

    Times at least ``repeats`` calls and, for calls shorter than ``min_seconds / repeats``, as many
    as fill ``min_seconds`` (estimated from the first timed call): single short calls on a shared
    2-core machine vary by up to 2× from moment to moment, and the first few after compilation are
    slower while the allocator's heap grows.

    Calls shorter than ``group_seconds`` are timed in groups dispatched back to back and blocked on
    once, each sample being the group's time per call: on an accelerator a lone blocked call of
    a few microseconds to milliseconds would mostly time the launch and the host's wait for the
    result, where a training loop keeps the device busy. ``None`` means 10 ms on an accelerator and
    0 (every call blocked on alone) on the CPU, whose calls the benchmarks keep long.
    """
    if group_seconds is None:
        group_seconds = 0.01 if on_accelerator() else 0.0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    calls = 1
    if group_seconds > 0:
        probe = _timed_group(fn, 1)
        if probe < group_seconds:
            calls = math.ceil(group_seconds / max(probe, 1e-7))
    times = []
    target = repeats
    while len(times) < target:
        times.append(_timed_group(fn, calls))
        if len(times) == 1 and min_seconds > 0:
            target = max(repeats, int(min_seconds / max(times[0] * calls, 1e-6)))
    return float(np.median(times))


def matmul_size() -> int:
    """Side of the reference matmul: 2048 on the CPU; 8192 on an accelerator, whose 2048² product
    (≈ 17 GFLOP) would take tens of microseconds and time the launch rather than the chip."""
    return 8192 if on_accelerator() else 2048


def matmul_gflops(size: int | None = None, repeats: int = 5, min_seconds: float = 3.0) -> float:
    """Achieved float32 GFLOP/s of a jitted size×size matmul (the machine's reference figure).

    ``size`` defaults to `matmul_size`. The median over at least ``repeats`` calls and
    ``min_seconds`` of calls (`time_fn`).
    """
    size = size or matmul_size()
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    fn = jax.jit(lambda a, b: a @ b)
    seconds = time_fn(lambda: fn(a, b), repeats=repeats, min_seconds=min_seconds)
    return 2 * size**3 / seconds / 1e9


def reference_matmul(before: float) -> float:
    """The higher of the matmul figure measured ``before`` a long benchmark and one measured now.

    Long benchmarks (minutes) outlast the machine's slow and fast spells; ratios against the
    higher of the two are the conservative ones.
    """
    return max(before, matmul_gflops())


def add_matmul_ratios(rows: list[dict[str, Any]], before: float, where: Callable[[dict], bool] | None = None) -> float:
    """Set ``row["of_matmul"]`` (GFLOP/s over the `reference_matmul`) on the rows with a GFLOP/s
    figure (and ``where(row)``, if given); returns that reference."""
    matmul = reference_matmul(before)
    for row in rows:
        if row.get("gflops_per_s") and (where is None or where(row)):
            row["of_matmul"] = row["gflops_per_s"] / matmul
    return matmul


def describe_matmul(matmul: float, before: float) -> str:
    """The reference as the benchmarks print it: its size, the figure used and the one before."""
    return f"float32 matmul {matmul_size()}²: {matmul:.1f} GFLOP/s (before: {before:.1f}; the higher is used)"


def add_conv_flags(parser: argparse.ArgumentParser) -> None:
    """``--xla_convs`` and ``--unchunked``: the baselines of the XLA:CPU convolutions."""
    parser.add_argument(
        "--xla_convs", action="store_true",
        help="XLA's own convolutions even on the CPU (where enlca_jax.cpu's are the default)",
    )  # fmt: skip
    add_unchunked_flag(parser)


def model_conv(args: argparse.Namespace, conv_general_dilated: Any) -> Any:
    """The models' ``conv_general_dilated`` for a run: `enlca_jax.cpu.setup`'s unless ``--xla_convs``;
    applies ``--unchunked``."""
    apply_unchunked_flag(args)
    return None if args.xla_convs else conv_general_dilated


def add_unchunked_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unchunked", action="store_true", help="one XLA call per convolution (no chunking), for comparison"
    )


def apply_unchunked_flag(args: argparse.Namespace) -> None:
    """With ``--unchunked``, `enlca_jax.cpu.conv` runs every convolution as one XLA call (the baseline)."""
    if args.unchunked:
        conv.MAX_CHUNK_IMAGES = conv.MAX_CHUNK_PIXELS = 2**62


def _flops(cost: Any) -> float | None:
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return float(flops) if flops else None


def counted_flops(fn: Callable, *args: Any) -> float | None:
    """XLA's FLOP count of ``jax.jit(fn)(*args)``: cost analysis of its HLO lowered for the CPU
    (no compile), so that every machine counts the same program the same way; None where XLA
    gives no count. (jax 0.11.2's cost analysis of the HLO lowered for an NVIDIA GPU has no FLOP
    count: the first H100 run's convolutional rows read 0 GFLOP/s.)

    XLA counts a loop body once whatever its trip count, so a function that runs its convolutions
    in chunks (`enlca_jax.cpu.conv.chunked_conv`) must be counted through an equivalent loop-free
    version: the benchmarks pass the same model with XLA's own convolutions here.
    """
    return _flops(jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis())


def cpu_compiled_flops(fn: Callable, *args: Any) -> float | None:
    """XLA:CPU's FLOP count of ``jax.jit(fn)(*args)`` compiled for the CPU (on any machine; nothing
    runs): the work left after XLA's simplifications, as the CPU benchmarks count it.

    On an NVIDIA GPU (jax 0.11.2, H100) XLA's count of the compiled executable leaves out work that
    runs in library calls or fused kernels: exact attention's forward at N = 96², batch 4, counted
    1.4 GFLOP of its 218, and ENLA's forward+backward 14.7 of 17.1; so accelerator runs count here.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
    return _flops(jax.jit(fn).lower(*specs).compile().cost_analysis())


def rate(flops: float | None, seconds: float) -> dict[str, float]:
    """``gflop`` and ``gflops_per_s`` of a row; empty where no FLOP count is known."""
    return {"gflop": flops / 1e9, "gflops_per_s": flops / seconds / 1e9} if flops else {}


def compiled_cost(
    fn: Callable, *args: Any, flops_fn: Callable | None = None, count: bool = True
) -> tuple[Any, float | None, dict[str, float]]:
    """(compiled executable, counted FLOPs or None, memory analysis in bytes) of ``jax.jit(fn)(*args)``.

    FLOPs are XLA:CPU's count on every machine: of the executable (`cpu_compiled_flops` on an
    accelerator), or `counted_flops` of ``flops_fn`` (same arguments) when that is given; None
    without counting when ``count`` is False (the caller knows them).
    """
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        if not count:
            flops = None
        elif flops_fn is not None:
            flops = counted_flops(flops_fn, *args)
        elif on_accelerator():
            flops = cpu_compiled_flops(fn, *args)
        else:
            flops = _flops(compiled.cost_analysis())
    except RuntimeError as error:  # no CPU backend on an accelerator, e.g. JAX_PLATFORMS=cuda
        print(f"no FLOP count (XLA:CPU counts them; add cpu to JAX_PLATFORMS): {error}", file=sys.stderr)
        flops = None
    memory = compiled.memory_analysis()
    mem = {}
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            mem[name] = float(getattr(memory, name, 0))
    return compiled, flops, mem


def write_json(path: str | os.PathLike | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

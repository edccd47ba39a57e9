"""ENLA versus exact non-local attention: time and memory against the number of positions N.

    python benchmarks/attention.py --json benchmarks/results/attention_cpu.json \
        --plot benchmarks/results/attention_cpu.png
    python benchmarks/attention.py --sizes 96 --json OUT.json          # one size
    python benchmarks/attention.py --single_arena --json OUT.json      # one malloc arena, as eval.py
    python benchmarks/attention.py --min_seconds 1 --max_exact_gib 20 \
        --json benchmarks/results/attention_h100.json                  # on a GPU
    python benchmarks/attention.py --replot benchmarks/results/attention_h100.json \
        --plot attention_h100.png                                     # plot a run's JSON again

For N = s² (s in --sizes), embedding 64, value width 256, m = 128 and --batch images, it times the
forward and forward+backward of `efficient_attention`, of exact attention `softmax_attention` (in
blocks, every N) and of its dense N×N form (where the scores fit in --max_exact_gib; speed-ups are
reported against both), and of a whole ENLCA block (256
channels) in training mode without and with the contrastive term (once per --contrastive_methods,
`enlca_jax.contrastive`). ENLA's forward+backward is also
timed --loop times over inside one call (per repetition), as it runs inside a model's step (ENLCN's
5 blocks share one allocation per step): a standalone call allocates its buffers afresh each time,
and on the CPU glibc gives XLA's worker threads blocks above 64 MiB as fresh mappings, which the
kernel faults in and zeroes on every call (each row reports the minor page faults and kernel CPU
seconds per call). Each time is the median over at least --repeats calls and --min_seconds of calls
after one warm-up, as for the matmul (on a GPU or TPU, calls under 10 ms are timed in back-to-back
groups: `benchmarks.common.time_fn`). Memory is XLA's compiled memory analysis (arguments + outputs
+ temporaries), and the process RSS after the case (on an accelerator also the device allocator's
in-use and peak-so-far bytes). Also reports ENLA's achieved GFLOP/s (XLA-counted FLOPs / time) next
to a float32 matmul measured in the same run (before and after; the higher is used; 2048² on the
CPU, 8192² on an accelerator).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import resource
import sys

import jax
import jax.numpy as jnp
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import attention, cpu, exact_attention  # noqa: E402
from enlca_jax.cpu import host_memory  # noqa: E402

#: The case name of ENLA fwd+bwd timed inside a loop in one call (`in_one_call`).
LOOPED = "ENLA fwd+bwd, looped in one call"


def _dense(fn):
    """``fn(q, k, v)`` with the calling convention of the attention functions (F ignored)."""
    return lambda q, k, v, f=None: fn(q, k, v)


def _loss(fn):
    return lambda q, k, v, f: jnp.sum(fn(q, k, v, f) ** 2)


def in_one_call(grad_fn, times):
    """``grad_fn(q, k, v, f) -> (dq, dk, dv)`` run ``times`` times inside one executable; returns dv.

    Each repetition starts from ``q + 1e-30·dq`` and ``k + 1e-30·dk`` of the one before, so XLA can
    neither hoist the work out of the loop nor drop a repetition (those two [..., N, D] updates are
    timed with it, not counted in its FLOPs). This is how ENLA runs inside a model: its buffers are
    part of the step's, allocated once per step, where a standalone call allocates (and, with
    glibc's per-thread arenas, page-faults and zeroes) its own on every call.
    """

    def run(q, k, v, f):
        def body(_, carry):
            q, k, _ = carry
            dq, dk, dv = grad_fn(q, k, v, f)
            return q + 1e-30 * dq, k + 1e-30 * dk, dv

        return jax.lax.fori_loop(0, times, body, (q, k, jnp.zeros_like(v)))[2]

    return run


def measure(name, fn, args, repeats, min_seconds, flops_fn=None, repetitions=1, flops=None):
    """One row: seconds, GFLOP/s, XLA memory, RSS, and the host's minor page faults and kernel CPU
    seconds per call. With ``repetitions`` > 1, ``fn`` runs the case that many times per call
    (`in_one_call`) and times are per repetition; ``flops`` (of one repetition, if given) replaces
    XLA's count, so that a looped case is rated on the count of its standalone row."""
    compiled, counted, memory = common.compiled_cost(fn, *args, flops_fn=flops_fn, count=flops is None)
    flops = counted if flops is None else flops
    calls = 0

    def call():
        nonlocal calls
        calls += 1
        return compiled(*args)

    jax.block_until_ready(call())  # warm-up, outside the counters
    before, calls = resource.getrusage(resource.RUSAGE_SELF), 0
    # Timed as the matmul reference is: the median over at least `repeats` calls and
    # `min_seconds` of calls.
    seconds = common.time_fn(call, repeats=repeats, warmup=0, min_seconds=min_seconds) / repetitions
    after = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(memory.values()) / 2**20
    return {
        "case": name, "seconds": seconds, **common.rate(flops, seconds), "xla_mib": total,
        "rss_gib": psutil.Process().memory_info().rss / 2**30, **common.device_memory(),
        "repetitions_per_call": repetitions, "minor_faults_per_call": (after.ru_minflt - before.ru_minflt) / calls,
        "kernel_seconds_per_call": (after.ru_stime - before.ru_stime) / calls,
    }  # fmt: skip


def block_case(size, batch, contrastive, repeats, min_seconds, conv_general_dilated=None, method="select"):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 256))
    variables = attention.ENLCA().init(jax.random.key(1), x)

    def loss_of(block):
        def loss(params, x):
            out, aux = block.apply({**variables, "params": params}, x, train=contrastive, mutable=["losses"])
            total, count = attention.sum_contrastive_losses(aux.get("losses", {}))
            return jnp.sum(out**2) + (jnp.mean(total) / max(count, 1) if contrastive else 0.0)

        return jax.grad(loss)

    name = f"ENLCA block fwd+bwd{f' + contrastive ({method})' if contrastive else ''}"
    # FLOPs counted with XLA's own convolutions: chunked ones are loops (common.counted_flops).
    flops_fn = loss_of(attention.ENLCA())
    block = attention.ENLCA(conv_general_dilated=conv_general_dilated, contrastive_method=method)
    return measure(name, loss_of(block), (variables["params"], x), repeats, min_seconds, flops_fn=flops_fn)


def main(argv=None, conv_general_dilated=None) -> int:
    # No abbreviations: `__main__` looks for the exact --single_arena before argparse runs.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sizes", default="32,48,64,96,128,192", help="comma-separated sides s (N = s²)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed calls per case")
    parser.add_argument(
        "--min_seconds", type=float, default=3.0, help="and at least this many seconds of timed calls per case"
    )
    parser.add_argument(
        "--loop",
        type=int,
        default=5,
        help=f"also time ENLA fwd+bwd run this many times inside one call ('{LOOPED}', per repetition), as in a "
        "train step of ENLCN, whose 5 ENLCA blocks share the step's buffers, allocated once per step; 0 or 1: skip",
    )
    parser.add_argument(
        "--max_exact_gib", type=float, default=6.0, help="skip the dense form of exact attention above this"
    )
    parser.add_argument("--max_contrastive_n", type=int, default=96**2, help="skip the contrastive term above N")
    parser.add_argument(
        "--contrastive_methods", default="select,top_k", help="time the block + contrastive term with each method"
    )
    parser.add_argument("--blocks_only", action="store_true", help="time only the ENLCA block rows")
    parser.add_argument(
        "--single_arena",
        action="store_true",
        help="run with one glibc malloc arena, as eval.py (enlca_jax.cpu.host_memory); by default glibc's arenas, as "
        "train.py. ENLA is faster with one arena, but exact attention's 1.4 GiB buffers fragment that one heap "
        "(RSS and time then vary from call to call), so speed-ups against exact attention are not comparable",
    )
    common.add_conv_flags(parser)
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write a log-log plot of time and memory versus N")
    parser.add_argument("--replot", metavar="JSON", help="run nothing: plot this earlier run's JSON to --plot")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH (where to write the plot)")
        plot(json.loads(pathlib.Path(args.replot).read_text()), args.plot)
        return 0

    conv = common.model_conv(args, conv_general_dilated)
    matmul = common.matmul_gflops()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        n = size * size
        keys = jax.random.split(jax.random.key(size), 4)
        q = attention.l2_normalize(jax.random.normal(keys[0], (args.batch, n, 64))) * math.sqrt(6)
        k = attention.l2_normalize(jax.random.normal(keys[1], (args.batch, n, 64))) * math.sqrt(6)
        v = jax.random.normal(keys[2], (args.batch, n, 256))
        f = attention.orthogonal_random_matrix(keys[3], 128, 64)
        grad = functools.partial(jax.grad, argnums=(0, 1, 2))
        dense = exact_attention.dense_softmax_attention
        # (name, function, loop-free twin that XLA counts the FLOPs of, or None: the function itself)
        cases = [("ENLA fwd", attention.efficient_attention, None),
                 ("ENLA fwd+bwd", grad(_loss(attention.efficient_attention)), None),
                 # Exact attention in blocks (any N), rated on the dense form's FLOPs: the useful
                 # work (its backward recomputes the score blocks, twice the dense form's FLOPs).
                 ("exact fwd", attention.softmax_attention, _dense(dense)),
                 ("exact fwd+bwd", grad(_loss(attention.softmax_attention)), grad(_loss(_dense(dense))))]  # fmt: skip
        if 3 * args.batch * n * n * 4 / 2**30 <= args.max_exact_gib:  # scores, softmax and their gradient
            cases += [("exact dense fwd", _dense(dense), None),
                      ("exact dense fwd+bwd", grad(_loss(_dense(dense))), None)]  # fmt: skip
        if args.blocks_only:
            cases = []
        for name, fn, flops_fn in cases:
            # One timed call where a call takes minutes (exact attention at large N).
            repeats = 1 if name.startswith("exact") and n > 96**2 else args.repeats
            row = measure(name, fn, (q, k, v, f), repeats, args.min_seconds, flops_fn=flops_fn)
            rows.append({"n": n, "side": size, **row})
            print(rows[-1], flush=True)
            if name == "ENLA fwd+bwd" and args.loop > 1:
                # Rated on the standalone row's count: XLA's count of the unoptimised HLO is ≈ 7 % higher.
                flops = row["gflop"] * 1e9 if row.get("gflop") else None
                looped = in_one_call(fn, args.loop)
                row = measure(LOOPED, looped, (q, k, v, f), args.repeats, args.min_seconds, None, args.loop, flops)
                rows.append({"n": n, "side": size, **row})
                print(rows[-1], flush=True)
        methods = [None] + ([] if n > args.max_contrastive_n else args.contrastive_methods.split(","))
        for method in methods:
            case = block_case(size, args.batch, method is not None, args.repeats, args.min_seconds, conv,
                              method or "select")  # fmt: skip
            rows.append({"n": n, "side": size, **case})
            print(rows[-1], flush=True)
    # Ratios for the attention functions; the blocks' 1×1 convs and contrastive term are not ENLA.
    matmul_before, matmul = (
        matmul,
        common.add_matmul_ratios(rows, matmul, where=lambda row: not row["case"].startswith("ENLCA block")),
    )
    print(f"\nbatch {args.batch}, D 64, Cv 256, m 128; {common.describe_matmul(matmul, matmul_before)}")
    memory = "device_peak_gib" if common.on_accelerator() else "rss_gib"
    common.print_table(
        rows,
        ["n", "case", "seconds", "gflops_per_s", "of_matmul", "xla_mib", memory, "minor_faults_per_call",
         "kernel_seconds_per_call"],
    )  # fmt: skip
    ratios = {}
    for n in sorted({r["n"] for r in rows}):
        by = {r["case"]: r for r in rows if r["n"] == n}
        for exact, key in (("exact fwd+bwd", ""), ("exact dense fwd+bwd", "_dense")):
            if exact in by and "ENLA fwd+bwd" in by:
                ratios.setdefault(n, {}).update({
                    f"speedup_fwd_bwd{key}": by[exact]["seconds"] / by["ENLA fwd+bwd"]["seconds"],
                    f"memory_ratio_fwd_bwd{key}": by[exact]["xla_mib"] / by["ENLA fwd+bwd"]["xla_mib"],
                })  # fmt: skip
                print(f"N = {n}: ENLA fwd+bwd {ratios[n][f'speedup_fwd_bwd{key}']:.1f}× faster, "
                      f"{ratios[n][f'memory_ratio_fwd_bwd{key}']:.1f}× less memory than {exact[:-8]}")  # fmt: skip
        if LOOPED in by and by[LOOPED].get("of_matmul") and by["ENLA fwd+bwd"].get("of_matmul"):
            alone, looped = by["ENLA fwd+bwd"], by[LOOPED]
            print(f"N = {n}: ENLA fwd+bwd at {alone['of_matmul']:.1%} of matmul per standalone call "
                  f"({alone['minor_faults_per_call']:.0f} page faults, {alone['kernel_seconds_per_call'] * 1e3:.1f} ms "
                  f"kernel time per call), {looped['of_matmul']:.1%} looped in one call")  # fmt: skip
    payload = {"benchmark": "attention", "machine": common.machine_info(), "batch": args.batch,
               "single_arena": host_memory.SINGLE_ARENA in os.environ.get("GLIBC_TUNABLES", "").split(":"),
               "matmul_gflops_per_s": matmul, "matmul_before_gflops_per_s": matmul_before, "rows": rows,
               "exact_over_enla": ratios}  # fmt: skip
    common.write_json(args.json, payload)
    if args.plot:
        plot(payload, args.plot)
    return 0


def plot(payload, path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cases = ["ENLA fwd+bwd", LOOPED, "exact fwd+bwd", "exact dense fwd+bwd", "ENLCA block fwd+bwd"]
    cases += sorted({r["case"] for r in payload["rows"] if r["case"].startswith("ENLCA block fwd+bwd + ")})
    for case in cases:
        points = [r for r in payload["rows"] if r["case"] == case]
        if points:
            left.loglog([p["n"] for p in points], [p["seconds"] for p in points], "o-", label=case)
            right.loglog([p["n"] for p in points], [p["xla_mib"] for p in points], "o-", label=case)
    for ax, label in ((left, "seconds"), (right, "XLA memory (MiB)")):
        ax.set_xlabel("positions N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"batch {payload['batch']}, {payload['machine']['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(conv_general_dilated=cpu.setup(restart=True, single_arena="--single_arena" in sys.argv[1:])))

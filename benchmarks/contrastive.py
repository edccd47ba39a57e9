"""The contrastive term alone: exact order statistics (``method='select'``) against ``lax.top_k``.

    python benchmarks/contrastive.py --json benchmarks/results/contrastive_cpu.json
    python benchmarks/contrastive.py --cases 16x48 --block_rows 64,256,1024   # block size sweep

For each case BxS (batch B, N = L = S² positions, D 64, q and k L2-normalised and scaled by √6 as
in an ENLCA block) and each method, times the forward and the forward+backward of the mean
per-example loss with the authors' counts (15, 50, 15) and, with --paper, the paper's fractions
(2 %, 8 % of N). Each time is the median over at least --repeats calls and --min_seconds of calls
after one warm-up (`benchmarks.common.time_fn`). Reports XLA's temporaries and the speed-up of
'select' over 'top_k'.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import attention, contrastive, cpu  # noqa: E402


def inputs(batch: int, side: int, dim: int = 64) -> tuple[jax.Array, jax.Array]:
    """q, k [batch, side², dim], normalised and amplified as ENLCA's (k = 6)."""
    keys = jax.random.split(jax.random.key(side), 2)
    n = side * side
    q = attention.l2_normalize(jax.random.normal(keys[0], (batch, n, dim))) * math.sqrt(6)
    k = attention.l2_normalize(jax.random.normal(keys[1], (batch, n, dim))) * math.sqrt(6)
    return q, k


def measure(fn, args, repeats: int, min_seconds: float) -> dict:
    compiled, _, memory = common.compiled_cost(fn, *args, count=False)
    seconds = common.time_fn(lambda: compiled(*args), repeats=repeats, min_seconds=min_seconds)
    return {"seconds": seconds, "temp_mib": memory.get("temp_size_in_bytes", 0) / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="16x48,4x96", help="comma-separated BATCHxSIDE")
    parser.add_argument("--methods", default="select,top_k")
    parser.add_argument(
        "--block_rows", default="", help="comma-separated block sizes for 'select' (default: the backend's default)"
    )
    parser.add_argument("--paper", action="store_true", help="also the paper's fractional counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min_seconds", type=float, default=2.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    rows = []
    for case in args.cases.split(","):
        batch, side = (int(x) for x in case.split("x"))
        q, k = inputs(batch, side)
        count_sets = [("authors (15, 50, 15)", (15, 50, 15))]
        if args.paper:
            count_sets.append(("paper (2 %, 8 %)", contrastive.contrastive_counts(side * side)))
        for counts_name, (p, s, c) in count_sets:
            variants = [("top_k", None)] if "top_k" in args.methods.split(",") else []
            if "select" in args.methods.split(","):
                sizes = [int(b) for b in args.block_rows.split(",") if b] or [contrastive.default_block_rows()]
                variants += [("select", b) for b in sizes]
            for method, block in variants:
                options = {"method": method} if block is None else {"method": method, "block_rows": block}
                loss = functools.partial(
                    contrastive.contrastive_loss, num_positive=p, negative_start=s, num_negative=c, **options
                )
                fwd = measure(lambda q, k, loss=loss: jnp.mean(loss(q, k)), (q, k), args.repeats, args.min_seconds)
                grad = jax.grad(lambda q, k, loss=loss: jnp.mean(loss(q, k)), (0, 1))
                both = measure(grad, (q, k), args.repeats, args.min_seconds)
                row = {"batch": batch, "side": side, "counts": counts_name, "method": method, "block_rows": block,
                       "fwd_seconds": fwd["seconds"], "fwd_bwd_seconds": both["seconds"],
                       "fwd_bwd_temp_mib": both["temp_mib"]}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    for row in rows:
        base = next((r for r in rows if r["method"] == "top_k" and (r["batch"], r["side"], r["counts"]) ==
                     (row["batch"], row["side"], row["counts"])), None)  # fmt: skip
        if base is not None:
            row["speedup_fwd_bwd_over_top_k"] = base["fwd_bwd_seconds"] / row["fwd_bwd_seconds"]
    common.print_table(rows, ["batch", "side", "counts", "method", "block_rows", "fwd_seconds", "fwd_bwd_seconds",
                              "speedup_fwd_bwd_over_top_k", "fwd_bwd_temp_mib"])  # fmt: skip
    common.write_json(args.json, {"benchmark": "contrastive", "machine": common.machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    cpu.setup(restart=True)
    sys.exit(main())

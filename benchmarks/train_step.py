"""Full ENLCN train-step throughput against the machine's float32 matmul figure, with a breakdown.

    python benchmarks/train_step.py                       # ×4, LR patch 48, batch 16
    python benchmarks/train_step.py --batch 4 --json out/train_step.json
    python benchmarks/train_step.py --no-breakdown --unchunked     # baseline: one call per conv
    python benchmarks/train_step.py --no-breakdown --xla_convs     # baseline: XLA's convolutions

Times one jitted train step (Adam, L1 + 0.001·contrastive, 5 ENLCA blocks) and, for the
breakdown, the same step without the contrastive term, without attention (plain EDSR) and the
optimiser update alone. Achieved GFLOP/s = XLA's counted FLOPs of the step (counted on the same
step with XLA's own convolutions, which are not loops) / its time. Reports them next to
a float32 matmul (2048² on the CPU, 8192² on an accelerator) measured in the same run (before
and after the steps; the higher is used).
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from configs import enlca_x4  # noqa: E402
from enlca_jax import configuration, cpu, train_step  # noqa: E402


def synthetic_batch(batch: int, patch: int, scale: int) -> dict[str, np.ndarray]:
    """Random uint8 LR [batch, patch, patch, 3] and HR [batch, scale·patch, scale·patch, 3] patches."""
    rng = np.random.default_rng(0)
    return {
        "lr": rng.integers(0, 256, (batch, patch, patch, 3), dtype=np.uint8),
        "hr": rng.integers(0, 256, (batch, patch * scale, patch * scale, 3), dtype=np.uint8),
    }


def step_fn(config, with_contrastive: bool, conv_general_dilated=None):
    """(train_step with everything but state and batch bound, its model, its optimiser)."""
    model = configuration.build_model(config, conv_general_dilated=conv_general_dilated)
    tx = train_step.create_optimizer(config)
    fn = functools.partial(
        train_step.train_step, model=model, tx=tx, schedule=train_step.learning_rate_schedule(config),
        contrastive_weight=config.contrastive.weight, with_contrastive=with_contrastive, axis_name=None,
    )  # fmt: skip
    return fn, model, tx


def step_case(config, batch, with_contrastive: bool, attention: str, repeats: int, conv_general_dilated=None):
    config = config.copy_and_resolve_references()
    config.model.attention = attention
    fn, model, tx = step_fn(config, with_contrastive, conv_general_dilated)
    state = train_step.create_train_state(config, model, tx)
    # FLOPs of the same step with XLA's own convolutions: chunked convolutions are loops, which
    # XLA's cost analysis counts once (common.counted_flops). Same state: the parameters agree.
    flops_fn, _, _ = step_fn(config, with_contrastive)
    compiled, flops, memory = common.compiled_cost(fn, state, batch, flops_fn=flops_fn)
    seconds = common.time_fn(lambda: compiled(state, batch), repeats=repeats)
    return seconds, flops, memory, state, tx


def main(argv=None, conv_general_dilated=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per step (authors: 16)")
    parser.add_argument("--patch", type=int, default=48, help="LR patch size (authors: 48)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (median)")
    parser.add_argument("--no-breakdown", action="store_true", help="time only the full step")
    parser.add_argument(
        "--contrastive_method", default="select", choices=("select", "top_k"), help="config.contrastive.method"
    )
    common.add_conv_flags(parser)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    config = enlca_x4.get_config()
    config.data.patch_size = args.patch
    config.contrastive.method = args.contrastive_method
    conv = common.model_conv(args, conv_general_dilated)
    batch = synthetic_batch(args.batch, args.patch, config.model.scale)
    matmul = common.matmul_gflops()
    rows = []
    cases = [("full step (L1 + contrastive)", True, "enla")]
    if not args.no_breakdown:
        cases += [("without contrastive term", False, "enla"), ("without attention (EDSR)", False, "none")]
    for name, contrastive, attention in cases:
        seconds, flops, memory, state, tx = step_case(config, batch, contrastive, attention, args.repeats, conv)
        rows.append({
            "case": name, "seconds": seconds, "steps_per_s": 1 / seconds, "images_per_s": args.batch / seconds,
            **common.rate(flops, seconds),
            "temp_gib": memory.get("temp_size_in_bytes", 0) / 2**30,
        })  # fmt: skip
        print(rows[-1], flush=True)
    matmul_before, matmul = matmul, common.add_matmul_ratios(rows, matmul)
    if not args.no_breakdown:
        grads = jax.tree_util.tree_map(lambda p: p * 1e-3, state.params)
        update = jax.jit(lambda g, o, p: tx.update(g, o, p))
        seconds = common.time_fn(lambda: update(grads, state.opt_state, state.params), repeats=5)
        rows.append({"case": "optimiser update alone", "seconds": seconds})
        full, no_contrastive, edsr = (r["seconds"] for r in rows[:3])
        breakdown = {
            "convolutions (EDSR step incl. optimiser)": edsr / full,
            "attention blocks (ENLA, fwd+bwd)": (no_contrastive - edsr) / full,
            "contrastive term (fwd+bwd)": (full - no_contrastive) / full,
            "optimiser update (part of the conv share)": seconds / full,
        }
    else:
        breakdown = {}
    print(f"\nENLCN ×4 train step, batch {args.batch}, LR patch {args.patch}; "
          f"{common.describe_matmul(matmul, matmul_before)}")  # fmt: skip
    common.print_table(rows, ["case", "seconds", "images_per_s", "gflop", "gflops_per_s", "of_matmul", "temp_gib"])
    for key, value in breakdown.items():
        print(f"  {key}: {100 * value:.1f} % of the full step")
    print(f"peak RSS {common.peak_rss_gib():.2f} GiB")
    common.write_json(args.json, {
        "benchmark": "train_step", "machine": common.machine_info(), "batch": args.batch, "patch": args.patch,
        "xla_convs": conv is None, "chunked": not args.unchunked, "contrastive_method": args.contrastive_method,
        "matmul_gflops_per_s": matmul, "matmul_before_gflops_per_s": matmul_before, "cases": rows,
        "breakdown_fraction": breakdown,
        "peak_rss_gib": common.peak_rss_gib(),
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(conv_general_dilated=cpu.setup(restart=True)))

"""Full ENLCN ×4 inference: seconds, megapixels/s, memory; untiled versus tiled global attention.

    python benchmarks/inference.py --json benchmarks/results/inference_cpu.json
    python benchmarks/inference.py --sizes 128,256 --modes untiled,tiled
    python benchmarks/inference.py --sizes 512 --modes untiled --unchunked   # one XLA call per conv
    python benchmarks/inference.py --sizes 1024 --modes untiled --warmup 0   # one call of ≈ 10 minutes
    python benchmarks/inference.py --sizes 256 --attention nla --json benchmarks/results/inference_nla_cpu.json

For each LR side s (s×s input, batch 1) and mode ('untiled': one jitted forward; 'tiled':
`inference.predict` with --tile LR tiles and global attention), with the blocks' ENLA or, with
--attention nla, exact softmax attention, it reports seconds, LR and SR megapixels per second,
XLA's counted FLOPs and GFLOP/s next to a float32 matmul of the same run (untiled; the matmul is
measured before and after, the higher is used; 2048² on the CPU, 8192² on an accelerator), and the
process's peak RSS (on a GPU or TPU also the device allocator's peak so far). An untiled size is
compiled first and skipped when XLA's memory analysis of it (arguments, outputs and temporaries)
exceeds --max_untiled_gib.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import attention, cpu, exact_attention, inference, models  # noqa: E402


def _dense_nla(q, k, v, projection=None, *, mask=None, precision=None):
    """Exact attention with the N×L scores formed, in the calling convention of an attention_fn."""
    del projection
    return exact_attention.dense_softmax_attention(q, k, v, mask=mask, precision=precision).astype(v.dtype)


def main(argv=None, conv_general_dilated=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256,512,1024")
    parser.add_argument("--modes", default="untiled,tiled")
    parser.add_argument(
        "--attention", choices=("enla", "nla"), default="enla", help="the blocks' attention: ENLA or exact (NLA)"
    )
    parser.add_argument("--tile", type=int, default=128, help="LR tile side for the tiled mode")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (untiled)")
    parser.add_argument(
        "--max_untiled_gib",
        type=float,
        help="skip untiled sizes that need more (default: 16 on the CPU, on a GPU/TPU what its allocator may use)",
    )
    common.add_conv_flags(parser)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    conv = common.model_conv(args, conv_general_dilated)
    if args.max_untiled_gib is None:
        args.max_untiled_gib = common.device_memory().get("device_limit_gib", 16.0)

    block = models.NLA_BLOCK if args.attention == "nla" else attention.ENLCA
    model = models.ENLCN(scale=4, attention_block=block, conv_general_dilated=conv)
    # FLOPs are counted on a loop-free program (see common.counted_flops): XLA's convolutions and,
    # for NLA, the dense form of exact attention in place of its loop over blocks (only lowered).
    loop_free_block = functools.partial(attention.ENLCA, attention_fn=_dense_nla) if args.attention == "nla" else block
    loop_free = models.ENLCN(scale=4, attention_block=loop_free_block)
    variables = models.init_variables(model, jax.random.key(0))
    matmul = common.matmul_gflops()
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        x = jax.random.uniform(jax.random.key(side), (1, side, side, 3))
        for mode in args.modes.split(","):
            row = {"side": side, "mode": mode, "attention": args.attention}
            if mode == "untiled":
                compiled, flops, memory = common.compiled_cost(
                    lambda v, x: model.apply(v, x), variables, x, flops_fn=lambda v, x: loop_free.apply(v, x)
                )
                xla_gib = sum(memory.values()) / 2**30
                if xla_gib > args.max_untiled_gib:
                    print(f"skip untiled {side}²: XLA needs {xla_gib:.1f} GiB > --max_untiled_gib "
                          f"{args.max_untiled_gib}", flush=True)  # fmt: skip
                    continue
                call = functools.partial(compiled, variables, x)
                seconds = common.time_fn(call, repeats=args.repeats, warmup=args.warmup)
                row.update(**common.rate(flops, seconds), xla_gib=xla_gib)
            else:
                inference.predict_tiled(model, variables, jnp.zeros((1, side, side, 3)), args.tile)  # compile
                start = time.perf_counter()
                inference.predict_tiled(model, variables, x, args.tile)
                seconds = time.perf_counter() - start
            rss = psutil.Process().memory_info().rss / 2**30
            row.update(seconds=seconds, lr_mpix_per_s=side * side / 1e6 / seconds,
                       sr_mpix_per_s=16 * side * side / 1e6 / seconds, peak_rss_gib=common.peak_rss_gib(),
                       rss_gib=rss, **common.device_memory())  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    matmul_before, matmul = matmul, common.add_matmul_ratios(rows, matmul)
    reference = common.describe_matmul(matmul, matmul_before)
    print(f"\nENLCN ×4 inference ({args.attention}), batch 1, tile {args.tile}; {reference}")
    memory = "device_peak_gib" if common.on_accelerator() else "peak_rss_gib"
    common.print_table(rows, ["side", "mode", "seconds", "sr_mpix_per_s", "gflops_per_s", "of_matmul", "xla_gib",
                              memory])  # fmt: skip
    common.write_json(args.json, {"benchmark": "inference", "machine": common.machine_info(), "tile": args.tile,
                                  "chunked": not args.unchunked, "xla_convs": conv is None,
                                  "matmul_gflops_per_s": matmul, "matmul_before_gflops_per_s": matmul_before,
                                  "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(conv_general_dilated=cpu.setup(restart=True, single_arena=True)))  # as eval.py

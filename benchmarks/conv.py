"""The ENLCN ×4 convolutions, forward + both gradients: XLA's kernel gradient versus tap matmuls.

    python benchmarks/conv.py --json benchmarks/results/conv_cpu.json

For each 3×3 convolution shape of the ×4 train step (batch 16, LR patch 48): trunk 256→256 at 48²,
upsampler 256→1024 at 48² and 96², tail 256→3 at 192², head 3→256 at 48²), times forward, the input
gradient and the kernel gradient alone, and the whole fwd+bwd with ``jax.lax.conv_general_dilated``
('xla') and `enlca_jax.cpu.conv.conv_general_dilated` ('tap_matmul'), next to a float32
matmul (2048², 8192² on an accelerator) measured in the same run. GFLOP/s are the direct
convolution's 2·B·H·W·Ci·Co·9 per pass.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import cpu  # noqa: E402
from enlca_jax.cpu import conv  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
SHAPES = {  # name: (side, in channels, out channels) at batch 16
    "trunk 256→256 @48²": (48, 256, 256),
    "upsampler 256→1024 @48²": (48, 256, 1024),
    "upsampler 256→1024 @96²": (96, 256, 1024),
    "tail 256→3 @192²": (192, 256, 3),
    "head 3→256 @48²": (48, 3, 256),
}
IMPLS = {"xla": jax.lax.conv_general_dilated, "tap_matmul": conv.conv_general_dilated}


def conv_fn(impl):
    return lambda x, w: IMPLS[impl](x, w, (1, 1), "SAME", dimension_numbers=NHWC)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    matmul = common.matmul_gflops()
    rows = []
    for name, (side, cin, cout) in SHAPES.items():
        x = jax.random.normal(jax.random.key(0), (args.batch, side, side, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.02
        dy = jax.random.normal(jax.random.key(2), (args.batch, side, side, cout))
        flop = 2 * args.batch * side * side * cin * cout * 9
        for impl in IMPLS:
            f = conv_fn(impl)
            passes = {
                "forward": (jax.jit(f), (x, w), 1),
                "input grad": (jax.jit(lambda x, w, dy, f=f: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]), (x, w, dy), 1),
                "kernel grad": (jax.jit(lambda x, w, dy, f=f: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]), (x, w, dy), 1),
                "fwd+bwd": (jax.jit(jax.grad(lambda x, w, f=f: 0.5 * jnp.sum(f(x, w) ** 2), (0, 1))), (x, w), 3),
            }
            for part, (fn, fn_args, count) in passes.items():
                seconds = common.time_fn(lambda fn=fn, fn_args=fn_args: fn(*fn_args), repeats=args.repeats)
                gflops = count * flop / seconds / 1e9
                rows.append({"conv": name, "impl": impl, "pass": part, "seconds": seconds,
                             "gflops_per_s": gflops, "of_matmul": gflops / matmul})  # fmt: skip
                print(rows[-1], flush=True)
    print(f"\nbatch {args.batch}; float32 matmul {common.matmul_size()}²: {matmul:.1f} GFLOP/s")
    common.print_table(rows, ["conv", "impl", "pass", "seconds", "gflops_per_s", "of_matmul"])
    common.write_json(args.json, {"benchmark": "conv", "machine": common.machine_info(), "batch": args.batch,
                                  "matmul_gflops_per_s": matmul, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    cpu.setup(restart=True)
    sys.exit(main())

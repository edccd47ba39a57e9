"""Train an ENLCN: ``python train.py --config configs/enlca_x4.py --workdir DIR``.

Only parses flags and calls `enlca_jax.train_lib.train_and_evaluate`. Running again with the same
--workdir resumes from its latest checkpoint. Override config fields with --config.FIELD=VALUE
(e.g. --config.batch_size=32); a misspelt field is an error.

On Linux with glibc it first restarts itself once with malloc tunables that keep freed host
memory for the next step (`enlca_jax.host_memory`: ≈ 10 % faster CPU steps);
ENLCA_HOST_ALLOCATOR=system keeps glibc's defaults.
"""

from enlca_jax import host_memory

if __name__ == "__main__":  # first: the imports below would otherwise run again after the restart
    host_memory.reexec_with_retained_memory()

import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from enlca_jax import train_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file, e.g. configs/enlca_x4.py (':paper' selects the paper variant).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if "psnr" in result:
        print(
            f"step {result['step']}: validation Y-PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
            f"(MATLAB bicubic: {result['bicubic_psnr']:.2f} dB, {result['bicubic_ssim']:.4f})"
        )


if __name__ == "__main__":
    app.run(main)

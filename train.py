"""Train an ENLCN: ``python train.py --config configs/enlca_x4.py --workdir DIR``.

Only parses flags and calls `enlca_jax.train_lib.train_and_evaluate`. Running again with the same
--workdir resumes from its latest checkpoint. Override config fields with --config.FIELD=VALUE
(e.g. --config.batch_size=32); a misspelt field is an error.

A mistake in the config or the workdir (an out-of-range field, a workdir holding a run with a
different model, a workdir in use) stops the run before any work with one line saying what to
change (exit 2); ENLCA_TRACEBACK=1 shows the traceback. SIGTERM or SIGINT stops it with a
checkpoint (exit 128 + the signal number); the same command resumes it.

Where jax computes on the CPU, it first applies `enlca_jax.cpu.setup` (XLA:CPU flags; on Linux
with glibc one restart with malloc tunables that keep freed host memory for the next step, which
ENLCA_HOST_ALLOCATOR=system turns off; faster CPU convolutions). On a GPU or TPU host nothing of
that happens.
"""

from enlca_jax import cpu

if __name__ == "__main__":  # first: the imports below would otherwise run again after the restart
    CONV = cpu.setup(restart=True)

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from enlca_jax import train_lib, workdir  # noqa: E402
from enlca_jax.checkpointing import CorruptCheckpointError  # noqa: E402
from enlca_jax.train_lib import NonFiniteError  # noqa: E402

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
    try:
        result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, conv_general_dilated=CONV)
    except (ValueError, FileNotFoundError, workdir.WorkdirBusyError, CorruptCheckpointError, NonFiniteError) as error:
        if os.environ.get("ENLCA_TRACEBACK"):
            raise
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if "ssim" in result:  # process 0 (the one that validates)
        print(
            f"step {result['eval_step']}: validation Y-PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
            f"(MATLAB bicubic: {result['bicubic_psnr']:.2f} dB, {result['bicubic_ssim']:.4f})"
        )
    if result["stopped_by"]:
        print(f"stopped by {result['stopped_by']} at step {result['step']} with a checkpoint; run the same command "
              "to resume.")  # fmt: skip
        sys.exit(128 + signal.Signals[result["stopped_by"]].value)


if __name__ == "__main__":
    app.run(main)

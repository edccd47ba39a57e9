"""Evaluate an SR model on benchmark sets, or upscale your own images.

    python eval.py --config configs/enlca_x4.py --workdir runs/enlca_x4 [--checkpoint best|latest|STEP]
    python eval.py --workdir checkpoints/enlcn_x4_authors --data_dir ~/data/benchmark --datasets Set5,Set14
    python eval.py --model bicubic --scale 4 --data_dir ~/data/benchmark --datasets Set5,Set14
    python eval.py --workdir runs/enlca_x4 --input photos/ --output upscaled/

Prints a table of Y-PSNR/SSIM per set and writes results.json and results.csv into --output.
With --input, files that cannot be read are skipped with a message and the exit status is 1;
a mistake in the flags stops it before any work with one line (exit 2; ENLCA_TRACEBACK=1 shows
the traceback).
Only parses flags and calls `enlca_jax.eval_lib`; runs in one process (multi-host evaluation is
not supported). Where jax computes on the CPU it first applies `enlca_jax.cpu.setup` (XLA:CPU
flags; on Linux with glibc one restart with malloc tunables that keep freed host memory for reuse,
all threads sharing one heap, which ENLCA_HOST_ALLOCATOR=system turns off; faster CPU
convolutions). On a GPU or TPU host nothing of that happens.
Needs the ``eval`` extra when installed with pip: ``pip install "enlca_jax[eval]"``.
"""

from enlca_jax import cpu

if __name__ == "__main__":  # first: the imports below would otherwise run again after the restart
    CONV = cpu.setup(restart=True, single_arena=True)

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from enlca_jax import checkpointing, eval_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config; its eval.* fields give the default datasets and options.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Training workdir, or a checkpoint made by python -m enlca_jax.convert.")
flags.DEFINE_string("checkpoint", "best", "'best' (highest validation PSNR), 'latest' or a step (training workdirs).")
flags.DEFINE_enum("model", "enlcn", ["enlcn", "bicubic"], "'bicubic' evaluates MATLAB-exact bicubic (no checkpoint).")
flags.DEFINE_integer("scale", None, "Scale for --model bicubic (checked against the model otherwise).")
flags.DEFINE_list("datasets", None, "Sets to evaluate, e.g. Set5,Set14,B100,Urban100 (default: config.eval.datasets).")
flags.DEFINE_string("data_dir", None, "Root of sets in the EDSR layout (<Set>/HR, <Set>/LR_bicubic/X<s>); "
                    "without it the prepared TFDS sets in --tfds_data_dir are used.")  # fmt: skip
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir (default: config.data.data_dir or ~/tensorflow_datasets).")
flags.DEFINE_string("output", "eval_results", "Folder for results.json, results.csv, images and upscaled files.")
flags.DEFINE_bool("self_ensemble", None, "Average over the 8 flips/rotations.")
flags.DEFINE_integer("tile_size", None, "LR tile size for tiled inference with global attention (0 = off).")
flags.DEFINE_bool("chop", None, "The authors' --chop quadrants (reproduces their test protocol).")
flags.DEFINE_integer("pad_multiple", 32, "Pad images to multiples of this (masked), so few shapes compile.")
flags.DEFINE_bool("save_images", False, "Also write the SR images as PNG.")
flags.DEFINE_string("input", None, "Upscale this image file or folder of images into --output instead.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = FLAGS.config
    defaults = config.eval if config is not None else None

    def pick(flag, field, fallback):
        value = getattr(FLAGS, flag)
        if value is not None:
            return value
        return defaults[field] if defaults is not None else fallback

    options = eval_lib.Options(
        model=FLAGS.model,
        workdir=FLAGS.workdir,
        checkpoint=FLAGS.checkpoint,
        scale=FLAGS.scale,
        datasets=tuple(pick("datasets", "datasets", ("Set5", "Set14"))),
        data_dir=FLAGS.data_dir,
        tfds_data_dir=FLAGS.tfds_data_dir or (config.data.data_dir if config is not None else "~/tensorflow_datasets"),
        output=FLAGS.output,
        self_ensemble=bool(pick("self_ensemble", "self_ensemble", False)),
        tile_size=int(pick("tile_size", "tile_size", 0)),
        chop=bool(pick("chop", "chop", False)),
        pad_multiple=FLAGS.pad_multiple,
        save_images=FLAGS.save_images,
        conv_general_dilated=CONV,
    )
    try:
        checkpointing.check_choice(options.checkpoint, "--checkpoint")
        if options.scale is not None and options.scale < 1:
            raise ValueError(f"--scale must be a positive integer, got {options.scale}.")
        if FLAGS.input:
            written, skipped = eval_lib.run_upscale(options, FLAGS.input)
            for path in written:
                print(f"wrote {path}")
            if skipped:
                print(f"error: {len(skipped)} of {len(written) + len(skipped)} images could not be read and were "
                      "skipped (listed above).", file=sys.stderr)  # fmt: skip
                return 1
        else:
            eval_lib.run_evaluation(options)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        if os.environ.get("ENLCA_TRACEBACK"):
            raise
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)

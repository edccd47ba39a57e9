"""``python -m enlca_jax.datasets``: prepare SR datasets from local folders (nothing is downloaded)."""

import argparse
import logging
import pathlib
import sys

from enlca_jax.datasets import BENCHMARK_LAYOUT, BENCHMARK_SETS, DIV2K_LAYOUT, detect, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enlca_jax.datasets",
        description="Prepare SR datasets (TFDS array_record) from local folders. Nothing is downloaded.",
    )
    parser.add_argument("--source", help="folder with the images (see the layouts in the module docstring)")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--folder", help="prepare --source as a plain folder of HR images named FOLDER")
    parser.add_argument("--skimage", action="store_true", help="prepare the embedded scikit-image photographs")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        if args.skimage:
            names = ["sr_skimage"]
        elif args.source is None:
            raise ValueError("--source DIR is required (or --skimage).")
        elif args.folder:
            names = [f"sr_folder/{args.folder}"]
        else:
            names = detect(pathlib.Path(args.source))
            if not names:
                raise FileNotFoundError(
                    f"nothing to prepare in {args.source}: expected {BENCHMARK_LAYOUT} "
                    f"(sets {', '.join(BENCHMARK_SETS)}) or {DIV2K_LAYOUT}; "
                    "for any other folder pass --folder NAME."
                )
        for name in names:
            builder = prepare(name, args.data_dir, args.source)
            sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
            print(f"{name}: {sizes} in {builder.data_dir}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Input pipeline throughput (patches/s) on DIV2K-sized images, next to what a train step consumes.

    python benchmarks/input_pipeline.py --json out/input_pipeline.json
    python benchmarks/input_pipeline.py --data_dir ~/tensorflow_datasets --dataset sr_div2k
    python benchmarks/input_pipeline.py --step_json out/train_step.json   # consumption from that run

Without a prepared DIV2K it writes synthetic 2040×1356 PNGs (smooth fields plus texture, so PNG
decoding costs about what it does on photographs) and prepares them as ``sr_folder/div2k_like``.
Consumption: batch / seconds of the full train step, measured by benchmarks/train_step.py (pass
its JSON) or, with ``--measure_step``, here at the given batch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from enlca_jax import datasets, image_io, input_pipeline  # noqa: E402


def synthetic_div2k(folder: pathlib.Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = 1356, 2040
    yy, xx = np.mgrid[0:h, 0:w] / 200.0
    for index in range(count):
        phases = rng.uniform(0, 2 * np.pi, (3, 3))
        image = np.stack(
            [np.sin(xx * (1 + c) + phases[c, 0]) * np.cos(yy * (1.5 + c) + phases[c, 1]) for c in range(3)], axis=-1
        )
        image = (image * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        image_io.write_png(folder / f"{index + 1:04d}.png", image)


def measure(source, scale, patch, batch, workers, batches) -> float:
    dataset = input_pipeline.train_dataset(
        source, scale=scale, patch_size=patch, batch_size=batch, seed=0, worker_count=workers, check=False
    )
    iterator = iter(dataset)
    next(iterator)  # start-up (workers, first decode)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="TFDS data_dir holding --dataset (default: a temporary synthetic one)")
    parser.add_argument("--dataset", default="sr_div2k")
    parser.add_argument("--images", type=int, default=8, help="synthetic images to generate")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per setting")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts to try")
    parser.add_argument("--step_json", help="benchmarks/train_step.py JSON to read the step time from")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            source = datasets.load_split(args.dataset, "train", args.data_dir, scale=args.scale)
            dataset_name = args.dataset
        else:
            synthetic_div2k(pathlib.Path(tmp) / "images", args.images)
            datasets.prepare("sr_folder/div2k_like", pathlib.Path(tmp) / "tfds", pathlib.Path(tmp) / "images")
            source = datasets.load_split("sr_folder/div2k_like", "train", pathlib.Path(tmp) / "tfds", scale=args.scale)
            dataset_name = f"synthetic 2040×1356 PNGs ({args.images})"
        start = time.perf_counter()
        input_pipeline.check_source(source, args.scale, args.patch)  # PNG headers only
        check_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for index in range(len(source)):  # what the check cost when it decoded every example
            source[index]
        decode_seconds = time.perf_counter() - start
        startup = {"images": len(source), "check_source_s": check_seconds, "decode_all_s": decode_seconds}
        print(f"start-up check of {len(source)} images: {check_seconds:.3f} s from PNG headers "
              f"(decoding them all: {decode_seconds:.2f} s)", flush=True)  # fmt: skip
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            rate = measure(source, args.scale, args.patch, args.batch, workers, args.batches)
            rows.append({"workers": workers, "patches_per_s": rate})
            print(rows[-1], flush=True)
    consumption = None
    if args.step_json:
        step = json.loads(pathlib.Path(args.step_json).read_text())
        full = step["cases"][0]
        consumption = {"source": args.step_json, "device_kind": step["machine"]["device_kind"],
                       "patches_per_s": full["images_per_s"], "batch": step["batch"]}  # fmt: skip
    print(f"\ninput pipeline, {dataset_name}, ×{args.scale}, LR patch {args.patch}, batch {args.batch}")
    common.print_table(rows, ["workers", "patches_per_s"])
    if consumption:
        best = max(r["patches_per_s"] for r in rows)
        print(f"train step consumes {consumption['patches_per_s']:.3g} patches/s on {consumption['device_kind']}: "
              f"the pipeline supplies {best / consumption['patches_per_s']:.1f}× that")  # fmt: skip
    common.write_json(args.json, {
        "benchmark": "input_pipeline", "machine": common.machine_info(), "dataset": dataset_name,
        "scale": args.scale, "patch": args.patch, "batch": args.batch, "rows": rows, "train_step": consumption,
        "startup_check": startup,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

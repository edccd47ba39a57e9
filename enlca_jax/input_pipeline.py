"""grain input pipelines: paired random crops for training, whole images for evaluation.

Training batches are ``{'lr': [B, p, p, 3] uint8, 'hr': [B, p·s, p·s, 3] uint8}`` (the train step
scales them to [0, 1]). The pipeline is deterministic given its seed: a seeded shuffle reshuffled
every epoch, a per-example random crop and one of the 8 flips/transposes (the authors' hflip,
vflip and transpose, each with probability 1/2, applied identically to LR and HR). Its iterator
state (`get_state` / `set_state`) goes into the training checkpoint, so a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from enlca_jax import datasets


def crop_hr(hr: np.ndarray, lr: np.ndarray, scale: int) -> np.ndarray:
    """HR cropped to LR·s from the top left (== modcrop for LR = ⌊HR/s⌋)."""
    return hr[: lr.shape[0] * scale, : lr.shape[1] * scale]


def augment(lr: np.ndarray, hr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """hflip, vflip and transpose, each with probability 1/2, on both images (authors' augment)."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    for flag, fn in (
        (hflip, lambda x: x[:, ::-1]),
        (vflip, lambda x: x[::-1]),
        (transpose, lambda x: x.swapaxes(0, 1)),
    ):
        if flag:
            lr, hr = fn(lr), fn(hr)
    return np.ascontiguousarray(lr), np.ascontiguousarray(hr)


@dataclasses.dataclass(frozen=True)
class PairedCrop(grain.transforms.RandomMap):
    """Random LR patch p×p and the matching HR patch p·s×p·s, then a random flip/transpose."""

    scale: int
    patch_size: int
    augment: bool = True

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        lr = example[datasets.lr_key(self.scale)]
        hr = crop_hr(example["hr"], lr, self.scale)
        p, s = self.patch_size, self.scale
        if lr.shape[0] < p or lr.shape[1] < p:
            name = datasets.decode_name(example.get("name", "?"))
            raise ValueError(f"image {name}: LR {lr.shape[0]}×{lr.shape[1]} is smaller than the patch {p}.")
        top = int(rng.integers(0, lr.shape[0] - p + 1))
        left = int(rng.integers(0, lr.shape[1] - p + 1))
        lr = lr[top : top + p, left : left + p]
        hr = hr[top * s : (top + p) * s, left * s : (left + p) * s]
        if self.augment:
            lr, hr = augment(lr, hr, rng)
        return {"lr": lr, "hr": hr}


def check_source(source: Sequence[dict[str, Any]], scale: int, patch_size: int | None = None) -> None:
    """Fail early, naming the images, on an empty source, a missing scale or images below the patch."""
    if len(source) == 0:
        raise ValueError("the training source has no images; check the dataset folder and its layout.")
    first = source[0]
    key = datasets.lr_key(scale)
    if key not in first:
        have = sorted(k for k in first if k.startswith("lr_x"))
        raise ValueError(f"scale {scale} has no LR images in this dataset (it has {have}).")
    if patch_size is None:
        return
    lr_shape = getattr(source, "lr_shape", None)  # datasets.SplitSource: PNG headers, no decoding
    small = []
    for index in range(len(source)):
        height, width = lr_shape(index, scale) if lr_shape is not None else source[index][key].shape[:2]
        if height < patch_size or width < patch_size:
            small.append(f"{datasets.decode_name(source[index]['name'])} ({height}×{width})")
    if small:
        raise ValueError(
            f"{len(small)} image(s) have an LR side smaller than the patch {patch_size} at ×{scale}: "
            f"{', '.join(small[:10])}. Use a smaller patch_size or remove them."
        )


def train_dataset(
    source: Sequence[dict[str, Any]],
    *,
    scale: int,
    patch_size: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    augment: bool = True,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 4,
    check: bool = True,
    start: int = 0,
) -> grain.IterDataset:
    """An endless, checkpointable stream of training batches for this process.

    Args:
      source: random-access examples (e.g. `datasets.load_split(...)`).
      scale, patch_size: LR patch p, HR patch p·s.
      batch_size: batch for this process (the global batch divided by the process count).
      seed: shuffle and crop seed.
      shard_index, shard_count: this process's share (``jax.process_index()``,
        ``jax.process_count()``): every ``shard_count``-th element of the shuffled stream, so
        the processes' batches together are the single-process global batch.
      augment: random flips/transposes.
      worker_count: > 0 runs decoding and cropping in that many worker processes.
      read_threads, prefetch: background threads and batches read ahead in this process, so
        decoding overlaps the train step (grain's defaults, 16 threads and 500 elements, would
        hog a small machine's cores and memory).
      check: scan the source first (`check_source`) for clear errors before training starts.
      start: begin at this process's batch ``start`` (0: the beginning). Batch t of every
        process's share holds that process's part of the global batch t whatever the process
        count, so ``start = t`` continues a run at step t on any number of processes.

    Returns:
      grain IterDataset of ``{'lr': [B, p, p, 3], 'hr': [B, ps, ps, 3]}`` uint8 batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    if check:
        check_source(source, scale, patch_size)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must lie in [0, {shard_count}), got {shard_index}.")
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} training images cannot be shared by {shard_count} processes.")
    dataset = grain.MapDataset.source(source)
    # One global stream (an epoch-wise shuffle, then crops seeded by stream position) dealt
    # round-robin to the processes: within an epoch each image goes to exactly one process, and
    # the global batch holds the same pairs whatever the process count.
    dataset = dataset.shuffle(seed=seed).repeat(None)
    dataset = dataset.random_map(PairedCrop(scale, patch_size, augment), seed=seed)
    if shard_count > 1:
        dataset = dataset[shard_index::shard_count]
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if start:
        dataset = dataset[start:]
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=exit_with_parent
        )
    return iter_dataset


def exit_with_parent(worker_index: int, worker_count: int) -> None:  # noqa: ARG001 - grain's signature
    """In a grain worker: end it when the process that started it dies (even by kill -9, when
    grain's own shutdown never runs), so that no orphaned worker keeps decoding images."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclasses.dataclass(frozen=True)
class EvalImage:
    """One evaluation image: LR [h, w, 3] uint8, HR cropped to [h·s, w·s, 3] uint8."""

    name: str
    lr: np.ndarray
    hr: np.ndarray
    greyscale: bool = False


def eval_examples(source: Sequence[dict[str, Any]], scale: int) -> Iterator[EvalImage]:
    """Whole images of a split, in name order."""
    check_source(source, scale)
    names = [(datasets.decode_name(source[i]["name"]), i) for i in range(len(source))]
    for name, index in sorted(names):
        example = source[index]
        lr = example[datasets.lr_key(scale)]
        greyscale = bool(example.get("greyscale", False))
        yield EvalImage(name, lr, crop_hr(example["hr"], lr, scale), greyscale)

"""Validation during training: Y-PSNR/SSIM on whole images next to MATLAB bicubic, and sample images."""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from enlca_jax import configuration, datasets, eval_lib, image_io, input_pipeline, models


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images [H, W, 3] uint8 of one height in a row, ``gap`` white columns apart: [H, ΣW + gaps, 3]."""
    height = images[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts = []
    for image in images:
        parts += [image, spacer]
    return np.concatenate(parts[:-1], axis=1)


class Validator:
    """Y-PSNR/SSIM of a model next to MATLAB bicubic on the config's validation split.

    The split is read and decoded, and bicubic's scores and images computed, once (at
    construction); each call runs only the model. Each call also returns the first
    ``config.num_sample_images`` samples as ``LR bicubic | SR | HR`` side by side ([H, 3W + 8, 3]
    uint8, by image name) and writes them to ``<workdir>/samples/<step>/<name>.png``.
    """

    def __init__(self, config: ml_collections.ConfigDict, scale: int, workdir: pathlib.Path):
        data = config.data
        source = datasets.load_split(
            data.validation, data.validation_split, configuration.data_dir(config), scale=scale
        )
        self.images = list(input_pipeline.eval_examples(source, scale))
        if data.validation_images > 0:
            self.images = self.images[: data.validation_images]
        self.scale = scale
        self.samples_dir = workdir / "samples"
        self._bicubic_samples: dict[str, np.ndarray] = {}
        num_samples = config.num_sample_images

        def keep(image, sr):
            if len(self._bicubic_samples) < num_samples:
                self._bicubic_samples[image.name] = sr

        self.bicubic = eval_lib.evaluate(eval_lib.bicubic_upscaler(scale), self.images, scale, keep)

    def __call__(
        self, model: models.ENLCN, variables: Any, step: int
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(metrics: psnr, ssim, bicubic_psnr, bicubic_ssim; samples by image name)."""
        samples: dict[str, np.ndarray] = {}

        def keep(image, sr):
            if image.name in self._bicubic_samples:
                samples[image.name] = side_by_side(self._bicubic_samples[image.name], sr, image.hr)

        ours = eval_lib.evaluate(eval_lib.model_upscaler(model, variables), self.images, self.scale, keep)
        for name, sample in samples.items():
            image_io.write_png(self.samples_dir / f"{step:08d}" / f"{name}.png", sample)
        bicubic = self.bicubic
        metrics = {"psnr": ours.psnr, "ssim": ours.ssim, "bicubic_psnr": bicubic.psnr, "bicubic_ssim": bicubic.ssim}
        return metrics, samples

"""Evaluation of an SR model on whole images: Y-PSNR/SSIM per image and per set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from enlca_jax import imresize, inference, metrics, models
from enlca_jax.input_pipeline import EvalImage


@dataclasses.dataclass
class ImageResult:
    name: str
    psnr: float
    ssim: float


@dataclasses.dataclass
class SetResult:
    """Per-image results of one set at one scale; ``psnr``/``ssim`` are the per-image means."""

    images: list[ImageResult]

    @property
    def psnr(self) -> float:
        return float(np.mean([r.psnr for r in self.images])) if self.images else float("nan")

    @property
    def ssim(self) -> float:
        return float(np.mean([r.ssim for r in self.images])) if self.images else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "images": [dataclasses.asdict(r) for r in self.images]}


def model_upscaler(model: models.ENLCN, variables: Any, **predict_kwargs: Any) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 LR [h, w, 3] → uint8 SR [s·h, s·w, 3] with the model (quantised as the authors)."""

    def upscale(lr: np.ndarray) -> np.ndarray:
        sr = inference.predict(model, variables, lr.astype(np.float32) / 255.0 * model.rgb_range, **predict_kwargs)
        return metrics.quantize(sr, model.rgb_range)

    return upscale


def bicubic_upscaler(scale: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 LR → uint8 SR with MATLAB-exact bicubic (the baseline row of SR tables)."""
    return lambda lr: imresize.imresize(lr, scale)


def evaluate(
    upscale: Callable[[np.ndarray], np.ndarray],
    images: Iterable[EvalImage],
    scale: int,
    on_image: Callable[[EvalImage, np.ndarray], None] | None = None,
) -> SetResult:
    """Y-PSNR/SSIM (border = scale) of ``upscale`` on every image; ``on_image(image, sr)`` sees each SR."""
    results = []
    for image in images:
        sr = upscale(image.lr)
        if sr.shape != image.hr.shape:
            raise ValueError(f"{image.name}: SR {sr.shape} does not match HR {image.hr.shape}.")
        results.append(
            ImageResult(
                image.name,
                metrics.psnr_y(sr, image.hr, scale, greyscale=image.greyscale),
                metrics.ssim_y(sr, image.hr, scale, greyscale=image.greyscale),
            )
        )
        if on_image is not None:
            on_image(image, sr)
    if not results:
        raise ValueError("no images to evaluate: the set is empty (check its folder layout).")
    return SetResult(results)

"""SR metrics as the literature computes them: Y channel (BT.601), border crop, PSNR and SSIM.

Protocol (the authors' and EDSR's): SR output clipped and quantised to 8 bit; Y from MATLAB's
``rgb2ycbcr`` (``16 + (65.481 R + 128.553 G + 24.966 B) / 255`` for 8-bit RGB); ``scale`` pixels
cropped from every border; HR cropped to LR size × scale; metrics per image, averaged over a set.
Y is kept in floating point (EDSR's ``calc_psnr``); ``round_y=True`` gives the variant of MATLAB
scripts that call ``rgb2ycbcr`` on uint8 images and get a rounded uint8 Y. Greyscale files
(Set14's ``bridge``; not ``man``, which is stored as RGB) are compared on their grey values,
without the Y conversion, as the MATLAB scripts behind the published bicubic tables do; this
variant reproduces those tables within
0.02 dB and 0.002 SSIM on Set5 and Set14 (tests/test_metrics.py).

SSIM is the reference MATLAB ``ssim_index`` of Wang et al. (2004): 11×11 Gaussian window
(σ = 1.5), K1 = 0.01, K2 = 0.03, L = 255, 'valid' filtering, mean of the SSIM map, on Y.
"""

from __future__ import annotations

import math

import numpy as np


def quantize(image: np.ndarray, rgb_range: float = 1.0) -> np.ndarray:
    """Float image in [0, rgb_range] → uint8 (clip, round half up), as the authors' ``quantize``."""
    return np.floor(np.clip(np.asarray(image, np.float64) * (255.0 / rgb_range), 0.0, 255.0) + 0.5).astype(np.uint8)


def rgb_to_y(image: np.ndarray, round_y: bool = False) -> np.ndarray:
    """[..., H, W, 3] 8-bit RGB (uint8 or float in [0, 255]) → [..., H, W] float64 Y in [16, 235]."""
    x = np.asarray(image, np.float64)
    if x.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects [..., 3] RGB, got shape {x.shape}.")
    y = 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0
    return np.floor(y + 0.5) if round_y else y


def grey_values(image: np.ndarray) -> np.ndarray:
    """[H, W, 1] → its channel; [H, W, 3] → BT.601 luma without offset (equals v where R = G = B = v)."""
    x = np.asarray(image, np.float64)
    if x.shape[-1] == 1:
        return x[..., 0]
    return (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 219.0


def _prepare(
    sr: np.ndarray, hr: np.ndarray, border: int, round_y: bool, greyscale: bool
) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR {sr.shape} and HR {hr.shape} differ; crop HR to LR size × scale first.")
    if sr.ndim != 3 or sr.shape[-1] not in (1, 3):
        raise ValueError(f"expected [H, W, 3] or [H, W, 1] images, got {sr.shape}.")
    if sr.shape[0] <= 2 * border or sr.shape[1] <= 2 * border:
        raise ValueError(f"image {sr.shape[:2]} is too small for a border of {border} pixels.")
    if sr.shape[-1] == 1 or greyscale:
        # A greyscale file is compared on its grey values, as MATLAB scripts do (they convert
        # only 3-channel images with rgb2ycbcr); grey SR output keeps its value.
        sr_y, hr_y = grey_values(sr), grey_values(hr)
    else:
        sr_y, hr_y = rgb_to_y(sr, round_y), rgb_to_y(hr, round_y)
    if border:
        sr_y, hr_y = sr_y[border:-border, border:-border], hr_y[border:-border, border:-border]
    return sr_y, hr_y


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int, round_y: bool = False, greyscale: bool = False) -> float:
    """PSNR (dB) on Y of 8-bit images [H, W, 3] with ``border`` pixels cropped (border = scale).

    ``greyscale=True`` (the HR file had one channel) compares grey values instead of Y.
    """
    sr_y, hr_y = _prepare(sr, hr, border, round_y, greyscale)
    mse = float(np.mean((sr_y - hr_y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    # MATLAB fspecial('gaussian', 11, 1.5): separable, normalised to sum 1.
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """2-D 'valid' correlation with the separable window ``taps ⊗ taps`` (MATLAB filter2 'valid')."""
    windows = np.lib.stride_tricks.sliding_window_view(image, taps.size, axis=0)
    rows = windows @ taps  # [H - n + 1, W]
    windows = np.lib.stride_tricks.sliding_window_view(rows, taps.size, axis=1)
    return windows @ taps


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int, round_y: bool = False, greyscale: bool = False) -> float:
    """SSIM on Y of 8-bit images, Wang et al.'s MATLAB reference (window 11, σ 1.5, K 0.01/0.03)."""
    a, b = _prepare(sr, hr, border, round_y, greyscale)
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11×11 pixels after the border crop, got {a.shape}.")
    taps = _gaussian_window()
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(np.mean(ssim_map))

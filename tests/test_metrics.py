"""PSNR/SSIM on Y against hand-computed values, scikit-image, and the published bicubic tables."""

import math

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from enlca_jax import image_io, imresize, metrics


def random_pair(seed=0, shape=(40, 44, 3), noise=12):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, shape).astype(np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return sr, hr


class TestY:
    def test_matlab_rgb2ycbcr_points(self):
        # MATLAB rgb2ycbcr: black -> 16, white -> 235, pure red -> 16 + 65.481 = 81.481.
        np.testing.assert_allclose(
            metrics.rgb_to_y(np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0]])), [16.0, 235.0, 81.481]
        )

    def test_quantize(self):
        np.testing.assert_array_equal(metrics.quantize(np.array([-0.1, 0.5, 1.2, 2.5 / 255])), [0, 128, 255, 3])


class TestPSNR:
    def test_hand_computed(self):
        hr = np.full((20, 20, 3), 100, np.uint8)
        sr = hr + np.uint8(10)  # every channel +10 -> Y differs by 10 * 219/255 everywhere
        expected = 10 * math.log10(255**2 / (10 * 219 / 255) ** 2)
        assert metrics.psnr_y(sr, hr, border=2) == pytest.approx(expected, abs=1e-9)
        # Border pixels are ignored: corrupt them and nothing changes.
        sr2 = sr.copy()
        sr2[:2] = 0
        assert metrics.psnr_y(sr2, hr, border=2) == pytest.approx(expected, abs=1e-9)

    def test_greyscale_files_use_grey_values(self):
        hr = np.full((20, 20, 3), 100, np.uint8)
        expected = 10 * math.log10(255**2 / 10**2)
        assert metrics.psnr_y(hr + np.uint8(10), hr, 1, greyscale=True) == pytest.approx(expected, abs=1e-9)

    def test_identical_is_inf(self):
        _, hr = random_pair()
        assert metrics.psnr_y(hr, hr, 4) == math.inf

    def test_errors(self):
        sr, hr = random_pair()
        with pytest.raises(ValueError, match="differ"):
            metrics.psnr_y(sr[:-1], hr, 2)
        with pytest.raises(ValueError, match="too small"):
            metrics.psnr_y(sr[:4, :4], hr[:4, :4], 2)


class TestSSIM:
    def test_matches_scikit_image_reference(self):
        # skimage with gaussian_weights, sigma 1.5, population covariance, L = 255 is Wang et al.'s
        # MATLAB ssim_index (its mean excludes the 5-pixel border, the 'valid' region of the 11×11 window).
        for seed in range(3):
            sr, hr = random_pair(seed, noise=30)
            ours = metrics.ssim_y(sr, hr, border=3)
            a, b = metrics.rgb_to_y(sr)[3:-3, 3:-3], metrics.rgb_to_y(hr)[3:-3, 3:-3]
            ref = structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
            )
            assert ours == pytest.approx(ref, abs=1e-9)

    def test_identical_is_one(self):
        _, hr = random_pair()
        assert metrics.ssim_y(hr, hr, 2) == pytest.approx(1.0)


# Published bicubic results (Y channel): Kim et al., VDSR (CVPR 2016) Table 3, reproduced in
# EDSR, RCAN and most SR papers: Set5 33.66/30.39/28.42, 0.9299/0.8682/0.8104;
# Set14 30.24/27.55/26.00, 0.8688/0.7742/0.7027.
PUBLISHED = {
    ("Set5", 2): (33.66, 0.9299), ("Set5", 3): (30.39, 0.8682), ("Set5", 4): (28.42, 0.8104),
    ("Set14", 2): (30.24, 0.8688), ("Set14", 3): (27.55, 0.7742), ("Set14", 4): (26.00, 0.7027),
}  # fmt: skip


@pytest.mark.parametrize("name,scale", sorted(PUBLISHED))
def test_bicubic_baseline_reproduces_published(shared_data, name, scale):
    psnrs, ssims = [], []
    for hr_path in sorted((shared_data / "benchmark" / name / "HR").glob("*.png")):
        lr = image_io.read_image(hr_path.parents[1] / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png")
        hr = image_io.read_image(hr_path)[: lr.shape[0] * scale, : lr.shape[1] * scale]
        sr = imresize.imresize(lr, scale)
        grey = Image.open(hr_path).mode == "L"
        psnrs.append(metrics.psnr_y(sr, hr, scale, greyscale=grey))
        ssims.append(metrics.ssim_y(sr, hr, scale, greyscale=grey))
    psnr, ssim = PUBLISHED[(name, scale)]
    assert np.mean(psnrs) == pytest.approx(psnr, abs=0.02)
    assert np.mean(ssims) == pytest.approx(ssim, abs=0.002)

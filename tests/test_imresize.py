"""MATLAB-exact bicubic imresize."""

import numpy as np
import pytest
from PIL import Image

from enlca_jax import imresize


class TestAgainstMatlab:
    def test_reproduces_every_matlab_lr_file(self, shared_data):
        # ../shared/data: LR = MATLAB imresize(modcrop(HR, s), 1/s, 'bicubic'), made by MATLAB.
        checked = 0
        for hr_path in sorted((shared_data / "benchmark").glob("*/HR/*.png")):
            hr = np.asarray(Image.open(hr_path))
            for scale in (2, 3, 4):
                lr_path = hr_path.parents[1] / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png"
                expected = np.asarray(Image.open(lr_path))
                ours = imresize.bicubic_downscale(hr, scale)
                assert ours.dtype == np.uint8 and ours.shape == expected.shape, lr_path
                np.testing.assert_array_equal(ours, expected, err_msg=str(lr_path))
                checked += 1
        assert checked == 57


class TestKernel:
    def test_cubic_values(self):
        # Keys (a = -0.5): k(0) = 1, k(±1) = k(±2) = 0, k(0.5) = 0.5625, k(1.5) = -0.0625.
        np.testing.assert_allclose(
            imresize.cubic(np.array([0, 1, 2, -1, 0.5, 1.5, -1.5, 3])),
            [1, 0, 0, 0, 0.5625, -0.0625, -0.0625, 0],
        )

    def test_rows_sum_to_one(self):
        for n, m, s in [(12, 3, 0.25), (10, 30, 3.0), (9, 3, 1 / 3)]:
            np.testing.assert_allclose(imresize.resize_matrix(n, m, s).sum(1), 1.0)

    def test_upscale_by_one_is_identity(self):
        x = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
        np.testing.assert_array_equal(imresize.imresize(x, 1.0), x)

    def test_constant_image_stays_constant(self):
        x = np.full((20, 24), 77, np.uint8)
        np.testing.assert_array_equal(imresize.imresize(x, 0.25), np.full((5, 6), 77))
        np.testing.assert_array_equal(imresize.imresize(x, 3), np.full((60, 72), 77))

    def test_float_input(self):
        x = np.random.default_rng(1).random((16, 12)).astype(np.float32)
        y = imresize.imresize(x, 0.5)
        assert y.dtype == np.float32 and y.shape == (8, 6)

    def test_hand_computed_upscale_interior(self):
        # ×2 upscale of a ramp: MATLAB maps output x to u = x/2 + 0.25; a linear ramp stays linear
        # in the interior (cubic convolution reproduces linear functions).
        x = np.tile(np.arange(10, dtype=np.float64) * 10, (4, 1))
        y = imresize.imresize(x, output_shape=(4, 20))
        u = np.arange(1, 21) / 2 + 0.25  # 1-based input coordinates
        np.testing.assert_allclose(y[0, 4:16], (u[4:16] - 1) * 10, atol=1e-4)

    @pytest.mark.parametrize(
        "args,match",
        [
            ((np.zeros((2, 2, 2, 2)), 0.5), "expects"),
            ((np.zeros((0, 4)), 0.5), "empty"),
            ((np.zeros((4, 4)), -1.0), "> 0"),
            ((np.zeros((3, 3), np.uint8), 0.25), "too small"),
            ((np.zeros((4, 4), np.int32), 0.5), "dtype"),
        ],
    )
    def test_bad_input(self, args, match):
        with pytest.raises(ValueError, match=match):
            imresize.imresize(*args)

"""enlca_jax.image_io: any common image file as 8-bit RGB, and clear errors for bad files."""

import numpy as np
import pytest
from conftest import random_image, write
from PIL import Image

from enlca_jax import image_io


class TestImageIO:
    def test_conversions(self, tmp_path):
        rng = np.random.default_rng(3)
        write(tmp_path / "g.png", random_image(rng, 4, 5, c=0))
        write(tmp_path / "rgba.png", random_image(rng, 4, 5, c=4))
        Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "w16.png")
        grey = image_io.read_image(tmp_path / "g.png")
        assert grey.shape == (4, 5, 3) and np.all(grey[..., 0] == grey[..., 2])
        assert image_io.read_image(tmp_path / "rgba.png").shape == (4, 5, 3)
        np.testing.assert_array_equal(image_io.read_image(tmp_path / "w16.png"), 255)

    def test_bad_files(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            image_io.read_image(tmp_path / "none.png")
        (tmp_path / "x.png").write_bytes(b"hello")
        with pytest.raises(ValueError, match="x.png"):
            image_io.read_image(tmp_path / "x.png")

    def test_exif_orientation_is_applied(self, tmp_path):
        pixels = np.zeros((4, 6, 3), np.uint8)
        pixels[0, 0] = 255  # a white corner: top left as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display"
        Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
        shown = image_io.read_image(tmp_path / "turned.png")
        assert shown.shape == (6, 4, 3)  # as a viewer shows it
        assert shown[0, -1].min() == 255 and shown[0, 0].max() == 0
        with_alpha = np.dstack([pixels, np.arange(24, dtype=np.uint8).reshape(4, 6)])
        Image.fromarray(with_alpha).save(tmp_path / "turned_rgba.png", exif=exif)
        assert image_io.read_alpha(tmp_path / "turned_rgba.png").shape == (6, 4)

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

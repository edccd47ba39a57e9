"""Image files at the boundary: read any common image as 8-bit RGB, write PNG, with clear errors."""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File extensions treated as images when listing folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """An image array as [H, W, 3] uint8.

    Greyscale is repeated over three channels, an alpha channel is dropped, 16-bit data is scaled
    by 255/65535 (rounded), bool becomes 0/255, float data is taken as [0, 1].
    """
    x = np.asarray(array)
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    elif x.dtype == np.uint16 or (np.issubdtype(x.dtype, np.integer) and x.max(initial=0) > 255):
        x = np.floor(x.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        x = np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        x = x.astype(np.uint8)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{name}: expected an H×W or H×W×{{1,2,3,4}} image, got shape {x.shape}.")
    if x.shape[-1] in (2, 4):  # grey+alpha or RGBA: drop alpha
        x = x[..., :-1]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if 0 in x.shape:
        raise ValueError(f"{name}: empty image of shape {x.shape}.")
    return np.ascontiguousarray(x)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as [H, W, 3] uint8 RGB, turned as its EXIF orientation says (as viewers
    show it); a missing file raises FileNotFoundError, a corrupt or truncated one ValueError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image).astype(np.uint16 if image.mode.startswith("I;16") else np.int64)
            elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1", "F"):
                array = np.asarray(image.convert("RGB"))
            else:
                array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: corrupt, truncated or not an image ({error}).") from None
    return to_rgb_uint8(array, str(path))


def read_alpha(path: str | os.PathLike) -> np.ndarray | None:
    """The 8-bit alpha channel [H, W] of an image file (EXIF orientation applied), or None."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if "A" not in image.getbands():
            return None
        alpha = np.asarray(image.getchannel("A"))
    return alpha if alpha.dtype == np.uint8 else None


def is_greyscale_file(path: str | os.PathLike) -> bool:
    """True when the file stores a single grey channel (with or without alpha)."""
    with Image.open(path) as image:
        return image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an [H, W, 3] (or [H, W]) uint8 image; ``compress_level`` 0-9 is zlib's (PIL's
    default 6). The pixels decode the same at every level."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write [H, W, 3] uint8 (or float in [0, 1], rounded) as PNG, atomically."""
    path = pathlib.Path(path)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.floor(np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(array))
    os.replace(tmp, path)


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = pathlib.Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

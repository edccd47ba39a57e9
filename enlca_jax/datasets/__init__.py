"""SR datasets as tensorflow-datasets builders that write ``array_record`` (no TensorFlow needed).

Every example is ``{'name': str, 'greyscale': bool, 'hr': [H, W, 3] uint8, 'lr_x2', 'lr_x3', 'lr_x4': [⌊H/s⌋, ⌊W/s⌋, 3]
uint8}``. HR is stored as found (not cropped); readers crop it to LR·s from the top left, which is
``modcrop``. LR images come from the source folders when present (they must be exactly
⌊H/s⌋ × ⌊W/s⌋) and are otherwise made with the MATLAB-exact bicubic (`enlca_jax.imresize`).
Images are normalised to 8-bit RGB (greyscale repeated, alpha dropped, 16-bit scaled).

Builders (each read back with `load_split`, always ``download=False``; nothing is downloaded):

| name | source layout (``--source DIR``) | splits |
|---|---|---|
| ``sr_benchmark/<Set>`` | ``<Set>/HR/<name>.png``, ``<Set>/LR_bicubic/X<s>/<name>x<s>.png`` | test |
| ``sr_div2k`` | ``DIV2K_{train,valid}_HR/``, optional ``DIV2K_{train,valid}_LR_bicubic/X<s>/`` | train, val. |
| ``sr_folder/<name>`` | any folder of HR images (or ``<folder>/HR``) | train |
| ``sr_skimage`` | none: photographs shipped inside scikit-image (the embedded default) | train, validation |
| ``div2k/bicubic_x<s>`` | TFDS's own ``div2k`` dataset, if you prepared it with TFDS (see below) | train, val. |

TFDS's official ``div2k`` (configs ``bicubic_x2/3/4``, ``unknown_x2/3/4``, ``realistic_*_x4``) is
read as it is when it was prepared in ``array_record`` format. Prepared in TFDS's default
``tfrecord`` format, its shards are copied once into ``array_record`` files beside the originals
(same serialized examples; no TensorFlow needed). Its examples have only the config's LR scale
and no file names (they are named ``<split>_<index>``).

Prepare from the command line (once)::

    python -m enlca_jax.datasets --source ~/data/benchmark --data_dir ~/tensorflow_datasets
    python -m enlca_jax.datasets --source ~/data/DIV2K --data_dir ~/tensorflow_datasets
    python -m enlca_jax.datasets --source ~/photos --folder myphotos --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from enlca_jax import image_io, imresize

SCALES = (2, 3, 4)
BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
BENCHMARK_LAYOUT = "<source>/<Set>/HR/<name>.png and optionally <source>/<Set>/LR_bicubic/X<s>/<name>x<s>.png"
DIV2K_LAYOUT = "<source>/DIV2K_train_HR/0001.png … and <source>/DIV2K_valid_HR/0801.png …"
#: scikit-image's bundled photographs (no download): training and validation images.
SKIMAGE_TRAIN = (
    "astronaut", "brick", "camera", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "clock", "page", "text",
)  # fmt: skip
SKIMAGE_VALIDATION = ("chelsea", "rocket")


def lr_key(scale: int) -> str:
    return f"lr_x{scale}"


def _features() -> tfds.features.FeaturesDict:
    image = {lr_key(s): tfds.features.Image(shape=(None, None, 3), encoding_format="png") for s in SCALES}
    return tfds.features.FeaturesDict(
        {
            "name": tfds.features.Text(),
            "greyscale": tfds.features.Scalar(dtype=np.bool_),
            "hr": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            **image,
        }
    )


#: zlib level of the stored PNGs: encoding at 1 is about 3x faster than PIL's default 6 (most of
#: the time a dataset takes to prepare) for files about 13 % larger; decoding takes the same time.
PNG_COMPRESS_LEVEL = 1


def make_example(
    name: str, hr: np.ndarray, lrs: dict[int, np.ndarray | None], origin: str, greyscale: bool = False
) -> dict[str, Any]:
    """An example with PNG bytes; missing LR images are made with MATLAB bicubic.

    ``greyscale`` records that the source file had one channel (metrics then compare grey values).

    Raises ValueError naming ``origin`` when an LR image is not exactly ⌊H/s⌋ × ⌊W/s⌋.
    """
    greyscale = greyscale or np.ndim(hr) == 2
    hr = image_io.to_rgb_uint8(hr, origin)
    example: dict[str, Any] = {"name": name, "greyscale": greyscale, "hr": image_io.encode_png(hr, PNG_COMPRESS_LEVEL)}
    for scale in SCALES:
        example[lr_key(scale)] = image_io.encode_png(checked_lr(hr, lrs.get(scale), scale, origin), PNG_COMPRESS_LEVEL)
    return example


def checked_lr(hr: np.ndarray, lr: np.ndarray | None, scale: int, origin: str) -> np.ndarray:
    """``lr`` if it is exactly ⌊H/s⌋ × ⌊W/s⌋ of ``hr``, MATLAB bicubic of ``hr`` if it is None.

    Raises ValueError naming ``origin`` for an LR of another size or an HR smaller than the scale.
    """
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    if min(expected) < 1:
        raise ValueError(f"{origin}: HR {hr.shape[:2]} is smaller than the scale {scale}.")
    if lr is None:
        return imresize.bicubic_downscale(hr, scale)
    if lr.shape[:2] != expected:
        raise ValueError(
            f"{origin}: LR ×{scale} is {lr.shape[0]}×{lr.shape[1]} but HR {hr.shape[0]}×{hr.shape[1]} "
            f"needs exactly {expected[0]}×{expected[1]} (floor(HR/{scale}))."
        )
    return lr


def find_lr(folder: pathlib.Path, name: str, scale: int) -> pathlib.Path | None:
    for suffix in (f"{name}x{scale}", name):
        for extension in image_io.IMAGE_EXTENSIONS:
            candidate = folder / f"X{scale}" / f"{suffix}{extension}"
            if candidate.is_file():
                return candidate
    return None


def paired_examples(hr_dir: pathlib.Path, lr_root: pathlib.Path | None, layout: str) -> Iterator[tuple[str, dict]]:
    """Examples from a folder of HR images and an optional ``LR_bicubic``-style folder."""
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"missing folder {hr_dir}; expected layout: {layout}.")
    paths = image_io.list_images(hr_dir)
    if not paths:
        raise ValueError(f"no images in {hr_dir}; expected layout: {layout}.")
    for path in paths:
        lrs = {}
        for scale in SCALES:
            lr_path = find_lr(lr_root, path.stem, scale) if lr_root is not None else None
            lrs[scale] = image_io.read_image(lr_path) if lr_path is not None else None
        hr = image_io.read_image(path)
        yield path.stem, make_example(path.stem, hr, lrs, str(path), image_io.is_greyscale_file(path))


def _manual_dir(dl_manager: Any, builder: str) -> pathlib.Path:
    directory = getattr(dl_manager, "_manual_dir", None)
    if not directory:
        raise FileNotFoundError(f"{builder} is made from local files: pass --source DIR (the manual_dir).")
    return pathlib.Path(os.fspath(directory))


class SrConfig(tfds.core.BuilderConfig):
    """A builder config; for ``sr_folder`` the name is the user's dataset name."""


class SrBenchmark(tfds.core.GeneratorBasedBuilder):
    """SR benchmark sets in the EDSR layout (HR + bicubic LR ×2/×3/×4)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SrConfig(name=name, description=f"{name} benchmark set") for name in BENCHMARK_SETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Lay the sets out as {BENCHMARK_LAYOUT}."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(), description="SR benchmark set")

    def _split_generators(self, dl_manager):
        root = _manual_dir(dl_manager, "sr_benchmark") / self.builder_config.name
        if not root.is_dir():
            raise FileNotFoundError(f"missing folder {root}; expected layout: {BENCHMARK_LAYOUT}.")
        return {"test": paired_examples(root / "HR", root / "LR_bicubic", BENCHMARK_LAYOUT)}

    def _generate_examples(self, examples):  # pragma: no cover - examples come ready-made
        yield from examples


class SrDiv2k(tfds.core.GeneratorBasedBuilder):
    """DIV2K from the user's downloaded folders (800 train, 100 validation)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download DIV2K yourself and lay it out as {DIV2K_LAYOUT}."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(), description="DIV2K")

    def _split_generators(self, dl_manager):
        root = _manual_dir(dl_manager, "sr_div2k")
        splits = {}
        for split, part in (("train", "train"), ("validation", "valid")):
            lr_root = root / f"DIV2K_{part}_LR_bicubic"
            splits[split] = paired_examples(
                root / f"DIV2K_{part}_HR", lr_root if lr_root.is_dir() else None, DIV2K_LAYOUT
            )
        return splits

    def _generate_examples(self, examples):  # pragma: no cover
        yield from examples


class SrFolder(tfds.core.GeneratorBasedBuilder):
    """Any folder of HR images (LR made with MATLAB bicubic); name it with a config."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SrConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder of HR images (or a folder with HR/ and LR_bicubic/X<s>/)."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(), description="folder of HR images")

    def _split_generators(self, dl_manager):
        root = _manual_dir(dl_manager, "sr_folder")
        hr_dir = root / "HR" if (root / "HR").is_dir() else root
        lr_root = root / "LR_bicubic" if (root / "LR_bicubic").is_dir() else None
        return {"train": paired_examples(hr_dir, lr_root, "a folder of HR images, or <folder>/HR/")}

    def _generate_examples(self, examples):  # pragma: no cover
        yield from examples


class SrSkimage(tfds.core.GeneratorBasedBuilder):
    """The embedded default: photographs inside the scikit-image wheel (nothing is downloaded)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=_features(), description="scikit-image photographs")

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(SKIMAGE_TRAIN),
            "validation": self._generate_examples(SKIMAGE_VALIDATION),
        }

    def _generate_examples(self, names):
        from skimage import data  # noqa: PLC0415  (only needed to prepare)

        for name in names:
            yield name, make_example(name, getattr(data, name)(), {}, f"skimage.data.{name}")


BUILDERS = {"sr_benchmark": SrBenchmark, "sr_div2k": SrDiv2k, "sr_folder": SrFolder, "sr_skimage": SrSkimage}


def get_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Our builder for ``'sr_benchmark/Set5'``, ``'sr_div2k'``, ``'sr_folder/NAME'``, ``'sr_skimage'``."""
    builder_name, _, config = name.partition("/")
    if builder_name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)} (e.g. 'sr_benchmark/Set5').")
    cls = BUILDERS[builder_name]
    kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
    if builder_name == "sr_folder":
        kwargs["config"] = SrConfig(name=config or "default")
    elif config:
        names = [c.name for c in cls.BUILDER_CONFIGS]
        if config not in names:
            raise ValueError(f"{builder_name} has no set {config!r}; known: {names}.")
        kwargs["config"] = config
    return cls(**kwargs)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return (pathlib.Path(os.fspath(builder.data_dir)) / "dataset_info.json").is_file()


#: Written beside a prepared dataset made from a source folder: what that folder held.
SOURCE_RECORD = "source_files.json"


def source_fingerprint(source: str | os.PathLike) -> dict[str, list[int]]:
    """{relative path: [size, mtime in ns]} of every file under ``source`` (not read, only stat-ed)."""
    root = pathlib.Path(source)
    return {
        str(path.relative_to(root)): [path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _build(builder: tfds.core.DatasetBuilder, manual: str | None) -> None:
    config = tfds.download.DownloadConfig(
        manual_dir=manual, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(download_config=config)


def prepare(
    name: str, data_dir: str | os.PathLike, source: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """Build a dataset into ``data_dir`` from local files (never downloads).

    A dataset already prepared from ``source`` is rebuilt when the folder's files changed since
    (added, removed, resized or modified: `source_fingerprint`), so it never serves stale data;
    the old copy is kept until the new one is complete.
    """
    manual = os.fspath(source) if source is not None else None
    if manual is not None and not pathlib.Path(manual).is_dir():
        raise FileNotFoundError(f"source folder {manual} does not exist.")
    builder = get_builder(name, data_dir)
    version_dir = pathlib.Path(os.fspath(builder.data_dir))
    fingerprint = source_fingerprint(manual) if manual is not None else None
    if is_prepared(builder):
        record = version_dir / SOURCE_RECORD
        if fingerprint is None or (record.is_file() and json.loads(record.read_text()) == fingerprint):
            return builder
        print(f"{name}: the source folder {manual} changed since {version_dir} was prepared; rebuilding it.",
              flush=True)  # fmt: skip
        stale = version_dir.with_name(f".{version_dir.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        version_dir.rename(stale)
        try:
            builder = get_builder(name, data_dir)
            _build(builder, manual)
        except BaseException:
            shutil.rmtree(version_dir, ignore_errors=True)
            stale.rename(version_dir)
            raise
        shutil.rmtree(stale, ignore_errors=True)
    else:
        _build(builder, manual)
    if fingerprint is not None:
        (version_dir / SOURCE_RECORD).write_text(json.dumps(fingerprint))
    return builder


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_shape(data: bytes) -> tuple[int, int] | None:
    """(height, width) read from a PNG header without decoding; None if ``data`` is not a PNG."""
    if len(data) >= 24 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    return None


class SplitSource:
    """A prepared split: ``len`` and ``[i]`` give decoded examples; `lr_shape` reads image headers only.

    ``raw`` is the same split read with every image left encoded (PNG bytes), so checks over the
    whole split (`input_pipeline.check_source`) cost no decoding: 800 DIV2K HR images would take
    about half a minute to decode.
    """

    def __init__(self, decoded: Any, raw: Any):
        self.decoded, self.raw = decoded, raw

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.decoded[index]

    def lr_shape(self, index: int, scale: int) -> tuple[int, int]:
        key = lr_key(scale)
        shape = png_shape(self.raw[index][key])
        return shape if shape is not None else tuple(self.decoded[index][key].shape[:2])


#: The official TFDS DIV2K builder's name and the configs whose LR scale we can train on.
OFFICIAL_DIV2K = "div2k"
OFFICIAL_DIV2K_CONFIG = re.compile(r"(bicubic|unknown)_x([234])|realistic_(mild|difficult|wild)_x(4)")


class OfficialDiv2kSource:
    """TFDS's ``div2k`` examples ``{'lr', 'hr'}`` as our ``{'name', 'greyscale', 'hr', 'lr_x<s>'}``."""

    def __init__(self, source: Any, scale: int, split: str):
        self.source, self.scale, self.split = source, scale, split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[index]
        return {
            "name": f"{self.split}_{index:04d}",
            "greyscale": False,
            "hr": example["hr"],
            lr_key(self.scale): example["lr"],
        }


def tfrecord_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The records of a TFRecord file, read without TensorFlow (length-prefixed framing; CRCs are
    not checked: a corrupt image fails later at PNG decoding, naming the dataset)."""
    with open(path, "rb") as handle:
        while header := handle.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated TFRecord file (partial record header).")
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            if len(data) < length or len(handle.read(4)) < 4:
                raise ValueError(f"{path}: truncated TFRecord file (a record is cut short).")
            yield data


def convert_tfrecord_to_array_record(builder: tfds.core.DatasetBuilder) -> None:
    """Rewrite a prepared TFDS dataset's tfrecord shards as array_record beside them (no TensorFlow).

    Both formats hold the same serialized examples; each shard is written under a temporary name
    and renamed when complete (shards already copied are skipped), then ``array_record`` is added
    to the builder's file formats (in memory: TFDS's own files are left as they are).
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    version_dir = pathlib.Path(os.fspath(builder.data_dir))
    shards = sorted(version_dir.glob("*.tfrecord-*-of-*"))
    if not shards:
        raise FileNotFoundError(f"no tfrecord shards in {version_dir}; prepare the dataset again with TFDS.")
    for shard in shards:
        target = shard.with_name(shard.name.replace(".tfrecord-", ".array_record-"))
        if target.exists():
            continue
        partial = target.with_name(f".{target.name}.partial")
        writer = ArrayRecordWriter(os.fspath(partial), "group_size:1")
        for record in tfrecord_records(shard):
            writer.write(record)
        writer.close()
        os.replace(partial, target)
    builder.info.add_alternative_file_format(tfds.core.FileFormat.ARRAY_RECORD)


def load_official_div2k(name: str, split: str, data_dir: str | os.PathLike, scale: int | None = None) -> Any:
    """TFDS's own ``div2k/<config>`` (prepared by TFDS in ``data_dir``) as a random-access source."""
    config = name.partition("/")[2]
    match = OFFICIAL_DIV2K_CONFIG.fullmatch(config)
    if match is None:
        raise ValueError(
            f"{name!r}: use one of TFDS's div2k configs with a ×2/×3/×4 LR set, e.g. 'div2k/bicubic_x4' "
            "(bicubic_x2/3/4, unknown_x2/3/4, realistic_mild/difficult/wild_x4)."
        )
    config_scale = int(match.group(2) or match.group(4))
    if scale is not None and scale != config_scale:
        raise ValueError(f"{name} holds ×{config_scale} LR images, but scale {scale} was asked for.")
    dataset_dir = pathlib.Path(os.fspath(data_dir)) / OFFICIAL_DIV2K / config
    if not any(dataset_dir.glob("*/dataset_info.json")):
        raise FileNotFoundError(
            f"TFDS's {name} is not prepared in {data_dir} (enlca_jax never downloads). Either prepare it with "
            f"TFDS yourself (`tfds build div2k --config {config} --data_dir {data_dir}`; this needs TensorFlow "
            "and downloads DIV2K), or prepare our sr_div2k from your DIV2K folders: python -m enlca_jax.datasets "
            f"--source DIR --data_dir {data_dir}   ({DIV2K_LAYOUT})"
        )
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
        if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
            raise ValueError(
                f"TFDS's {name} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
                "enlca_jax reads array_record and converts tfrecord. Prepare it again in one of them."
            )
        convert_tfrecord_to_array_record(builder)
    _check_split(builder, name, split)
    array_record = tfds.core.FileFormat.ARRAY_RECORD
    source = builder.as_data_source(split=split, file_format=array_record)
    raw = builder.as_data_source(
        split=split,
        file_format=array_record,
        decoders={"lr": tfds.decode.SkipDecoding(), "hr": tfds.decode.SkipDecoding()},
    )
    return SplitSource(OfficialDiv2kSource(source, config_scale, split), OfficialDiv2kSource(raw, config_scale, split))


def _check_split(builder: tfds.core.DatasetBuilder, name: str, split: str) -> None:
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name} has splits {list(builder.info.splits)}, not {split!r}.")


def load_split(name: str, split: str, data_dir: str | os.PathLike, scale: int | None = None) -> Any:
    """A random-access source (``len`` and ``[i]`` → example dict of numpy arrays) of a prepared split.

    With ``scale`` set, only that scale's LR image is decoded (the others stay PNG bytes), which
    saves decoding time in training.

    ``sr_skimage`` is prepared on first use (it needs no files); every other dataset must have
    been prepared, else FileNotFoundError says the command that prepares it. ``div2k/<config>``
    reads TFDS's own DIV2K (`load_official_div2k`).
    """
    if name.partition("/")[0] == OFFICIAL_DIV2K:
        return load_official_div2k(name, split, data_dir, scale)
    builder = get_builder(name, data_dir)
    if not is_prepared(builder):
        if name == "sr_skimage":
            builder = prepare(name, data_dir)
        else:
            folder = f" --folder {name.partition('/')[2]}" if name.startswith("sr_folder") else ""
            layout = BUILDERS[name.partition("/")[0]].MANUAL_DOWNLOAD_INSTRUCTIONS
            raise FileNotFoundError(
                f"dataset {name} is not prepared in {data_dir} (nothing is downloaded). Prepare it with: "
                f"python -m enlca_jax.datasets --source DIR --data_dir {data_dir}{folder}   ({layout})"
            )
    _check_split(builder, name, split)
    decoders = None
    if scale is not None:
        if scale not in SCALES:
            raise ValueError(f"scale {scale} has no LR images in {name} (it has scales {SCALES}).")
        decoders = {lr_key(s): tfds.decode.SkipDecoding() for s in SCALES if s != scale}
    raw = {key: tfds.decode.SkipDecoding() for key in ("hr", *(lr_key(s) for s in SCALES))}
    return SplitSource(
        builder.as_data_source(split=split, decoders=decoders), builder.as_data_source(split=split, decoders=raw)
    )


def decode_name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect(source: pathlib.Path) -> list[str]:
    """Dataset names that a source folder can prepare."""
    found = []
    if (source / "DIV2K_train_HR").is_dir() or (source / "DIV2K_valid_HR").is_dir():
        found.append("sr_div2k")
    found += [f"sr_benchmark/{s}" for s in BENCHMARK_SETS if (source / s / "HR").is_dir()]
    return found

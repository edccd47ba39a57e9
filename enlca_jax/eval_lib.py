"""Evaluation of an SR model on whole images: Y-PSNR/SSIM per image and per set."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from enlca_jax import checkpointing, datasets, image_io, imresize, inference, input_pipeline, metrics, models
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


# ---------------------------------------------------------------------------------------------
# Benchmark sets from TFDS or from EDSR-layout folders
# ---------------------------------------------------------------------------------------------

EDSR_LAYOUT = "<data_dir>/<Set>/HR/<name>.png and <data_dir>/<Set>/LR_bicubic/X<s>/<name>x<s>.png"


def folder_images(set_dir: str | os.PathLike, scale: int) -> list[EvalImage]:
    """A benchmark set read straight from an EDSR-layout folder (LR made with MATLAB bicubic if absent).

    Raises FileNotFoundError / ValueError naming the expected layout for a missing or empty set.
    """
    set_dir = pathlib.Path(set_dir)
    hr_dir = set_dir / "HR"
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"missing folder {hr_dir}; expected layout: {EDSR_LAYOUT}.")
    paths = image_io.list_images(hr_dir)
    if not paths:
        raise ValueError(f"no images in {hr_dir}; expected layout: {EDSR_LAYOUT}.")
    images = []
    for path in paths:
        hr = image_io.read_image(path)
        lr_path = datasets.find_lr(set_dir / "LR_bicubic", path.stem, scale)
        lr = image_io.read_image(lr_path) if lr_path is not None else None
        lr = datasets.checked_lr(hr, lr, scale, str(lr_path or path))
        greyscale = image_io.is_greyscale_file(path)
        images.append(EvalImage(path.stem, lr, input_pipeline.crop_hr(hr, lr, scale), greyscale))
    return images


def tfds_images(name: str, split: str, data_dir: str | os.PathLike, scale: int) -> list[EvalImage]:
    """A prepared TFDS benchmark set (``sr_benchmark/Set5`` or just ``Set5``)."""
    if "/" not in name and name in datasets.BENCHMARK_SETS:
        name = f"sr_benchmark/{name}"
    source = datasets.load_split(name, split, data_dir, scale=scale)
    return list(input_pipeline.eval_examples(source, scale))


def write_results(output: str | os.PathLike, results: dict[str, dict[int, SetResult]], meta: dict[str, Any]) -> None:
    """``results.json`` (per set and scale: means and per-image values) and ``results.csv``."""
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "sets": {
            name: {f"x{scale}": r.to_json() for scale, r in by_scale.items()} for name, by_scale in results.items()
        },
    }
    checkpointing.write_json_atomic(output / "results.json", payload)
    rows = ["set,scale,image,psnr,ssim"]
    for name, by_scale in results.items():
        for scale, result in by_scale.items():
            rows += [f"{name},{scale},{r.name},{r.psnr:.4f},{r.ssim:.6f}" for r in result.images]
            rows.append(f"{name},{scale},MEAN,{result.psnr:.4f},{result.ssim:.6f}")
    tmp = output / ".results.csv.tmp"
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, output / "results.csv")


def format_table(results: dict[str, dict[int, SetResult]]) -> str:
    lines = [f"{'set':<12} {'scale':>5} {'images':>6} {'PSNR (dB)':>10} {'SSIM':>7}"]
    for name, by_scale in results.items():
        for scale, r in by_scale.items():
            lines.append(f"{name:<12} {'x' + str(scale):>5} {len(r.images):>6} {r.psnr:>10.2f} {r.ssim:>7.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Upscaling user images
# ---------------------------------------------------------------------------------------------


def output_names(files: list[pathlib.Path], scale: int) -> dict[pathlib.Path, str]:
    """``<stem>_x<s>.png`` for each file; files that share a stem (``a.png``, ``a.jpg``) get their
    extension in the name too (``a_png_x2.png``, ``a_jpg_x2.png``), so no result overwrites another."""
    stems: dict[str, int] = {}
    for path in files:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {
        path: f"{path.stem}_x{scale}.png" if stems[path.stem] == 1 else f"{path.stem}_{path.suffix[1:]}_x{scale}.png"
        for path in files
    }


def upscale_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    upscale: Callable[[np.ndarray], np.ndarray],
    scale: int,
    name: str | None = None,
) -> pathlib.Path:
    """Upscale one image file to ``<output_dir>/<name>`` (default ``<stem>_x<s>.png``).

    The EXIF orientation is applied first (`image_io.read_image`). Greyscale files give greyscale
    output; an alpha channel is upscaled with MATLAB bicubic.
    """
    path = pathlib.Path(path)
    rgb = image_io.read_image(path)
    alpha = image_io.read_alpha(path)
    sr = upscale(rgb)
    if image_io.is_greyscale_file(path):
        out = np.floor(metrics.grey_values(sr) + 0.5).clip(0, 255).astype(np.uint8)
    else:
        out = sr
    if alpha is not None:
        out = np.dstack([out if out.ndim == 3 else out[..., None], imresize.imresize(alpha, scale)])
    target = pathlib.Path(output_dir) / (name or f"{path.stem}_x{scale}.png")
    image_io.write_png(target, out)
    return target


def writable_folder(folder: str | os.PathLike, flag: str = "--output") -> pathlib.Path:
    """``folder``, created if needed, after checking that files can be written into it."""
    folder = pathlib.Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file; name a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"cannot write into {flag} {folder}: {error.strerror}; choose another folder.") from None
    return folder


# ---------------------------------------------------------------------------------------------
# The programs behind eval.py
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """What eval.py was asked for (see its --help)."""

    model: str = "enlcn"  # 'enlcn' or 'bicubic'
    workdir: str | None = None  # training workdir or converted model checkpoint
    checkpoint: str = "best"  # 'best', 'latest' or a step
    scale: int | None = None  # required for bicubic; checked against the model otherwise
    datasets: tuple[str, ...] = ()
    data_dir: str | None = None  # EDSR-layout root; None reads TFDS sets from tfds_data_dir
    tfds_data_dir: str = "~/tensorflow_datasets"
    output: str = "eval_results"
    self_ensemble: bool = False
    tile_size: int = 0
    chop: bool = False
    pad_multiple: int = 32
    save_images: bool = False
    #: How the model's convolutions run (`enlca_jax.cpu.setup` gives the XLA:CPU one); None: XLA's.
    conv_general_dilated: Callable[..., Any] | None = None


def make_upscaler(options: Options) -> tuple[Callable[[np.ndarray], np.ndarray], int, dict[str, Any]]:
    """(uint8 LR → uint8 SR, scale, description) for the options."""
    if options.model == "bicubic":
        if options.scale is None:
            raise ValueError("--model bicubic needs --scale.")
        return bicubic_upscaler(options.scale), options.scale, {"model": "bicubic (MATLAB-exact)"}
    if options.model != "enlcn":
        raise ValueError(f"--model must be 'enlcn' or 'bicubic', got {options.model!r}.")
    if not options.workdir:
        raise ValueError("--workdir (a training workdir or a converted checkpoint) is required for --model enlcn.")
    model, variables, step = checkpointing.restore_model(
        options.workdir, options.checkpoint, conv_general_dilated=options.conv_general_dilated
    )
    if options.scale is not None and options.scale != model.scale:
        raise ValueError(f"--scale {options.scale} but the checkpoint is a ×{model.scale} model.")
    kwargs: dict[str, Any] = {"self_ensemble": options.self_ensemble}
    if options.chop:
        kwargs["chop"] = True
    elif options.tile_size:
        kwargs["tile_size"] = options.tile_size
    elif options.pad_multiple:
        kwargs["pad_multiple"] = options.pad_multiple
    description = {"model": "enlcn", "workdir": str(options.workdir), "checkpoint_step": step, **kwargs}
    return model_upscaler(model, variables, **kwargs), model.scale, description


def run_evaluation(options: Options) -> dict[str, dict[int, SetResult]]:
    """Evaluate every set in ``options.datasets``; print the table, write results.json/.csv (+ PNGs)."""
    if not options.datasets:
        raise ValueError("no datasets to evaluate: pass --datasets Set5,Set14 (or set config.eval.datasets).")
    output = writable_folder(options.output)
    upscale, scale, description = make_upscaler(options)
    results: dict[str, dict[int, SetResult]] = {}
    for name in options.datasets:
        if options.data_dir:
            images = folder_images(pathlib.Path(options.data_dir).expanduser() / name.split("/")[-1], scale)
        else:
            images = tfds_images(name, "test", os.path.expanduser(options.tfds_data_dir), scale)
        short = name.split("/")[-1]

        def save(image: EvalImage, sr: np.ndarray, short=short) -> None:
            if options.save_images:
                image_io.write_png(output / "images" / short / f"x{scale}" / f"{image.name}.png", sr)

        results[short] = {scale: evaluate(upscale, images, scale, save)}
        print(format_table({short: results[short]}).splitlines()[-1], flush=True)
    protocol = (
        "Y (BT.601, MATLAB rgb2ycbcr, float), border = scale, 8-bit quantised SR, "
        "SSIM Wang et al. 11x11 Gaussian sigma 1.5; greyscale files on grey values"
    )
    meta = {**description, "scale": scale, "protocol": protocol}
    write_results(output, results, meta)
    print()
    print(format_table(results))
    print(f"\nwrote {output / 'results.json'} and {output / 'results.csv'}")
    return results


def run_upscale(options: Options, inputs: str | os.PathLike) -> tuple[list[pathlib.Path], dict[pathlib.Path, str]]:
    """Upscale an image file or every image in a folder into ``options.output`` (PNG).

    Returns (files written, {input file: why it was skipped}): a file that cannot be read is
    skipped with its reason and the others are still upscaled. Checks before any work that
    ``options.output`` is a writable folder other than the input folder.
    """
    inputs = pathlib.Path(inputs).expanduser()
    if inputs.is_dir():
        files = image_io.list_images(inputs)
        if not files:
            raise ValueError(f"no image files in {inputs} (looked for {', '.join(image_io.IMAGE_EXTENSIONS)}).")
        if pathlib.Path(options.output).expanduser().resolve() == inputs.resolve():
            raise ValueError(
                f"--output is the --input folder {inputs}: a later run would upscale these results again; choose "
                "another --output folder."
            )
    elif inputs.is_file():
        files = [inputs]
    else:
        raise FileNotFoundError(f"--input {inputs} does not exist.")
    output = writable_folder(options.output)
    if options.model == "enlcn" and not options.tile_size and not options.chop:
        options = dataclasses.replace(options, tile_size=256)  # bounded memory for any image size
    upscale, scale, _ = make_upscaler(options)
    names = output_names(files, scale)
    written, skipped = [], {}
    from tqdm import tqdm  # noqa: PLC0415

    for path in tqdm(files, unit="image", disable=len(files) < 2):
        try:
            written.append(upscale_file(path, output, upscale, scale, names[path]))
        except ValueError as error:
            skipped[path] = str(error)
            print(f"skipped {path}: {error}", file=sys.stderr, flush=True)
    return written, skipped

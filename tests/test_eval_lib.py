"""eval.py and eval_lib: benchmark evaluation, bicubic baseline, padding buckets, user images."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import GOLDEN
from PIL import Image

from enlca_jax import checkpointing, convert, datasets, eval_lib, imresize, inference, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def authors_x2(tmp_path_factory):
    """The golden reduced ENLCN (×2) converted into a model checkpoint."""
    target = tmp_path_factory.mktemp("ckpt") / "authors_x2"
    assert convert.main([str(GOLDEN / "enlcn_small.npz"), "--output", str(target)]) == 0
    return target


def make_set(root, name="Set5", sizes=((30, 36), (27, 41)), seed=0):
    rng = np.random.default_rng(seed)
    for index, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        hr = 127 + 60 * np.sin(xx / 3.0 + index)[..., None] * np.cos(yy / 4.0)[..., None] + rng.normal(0, 5, (h, w, 3))
        path = root / name / "HR" / f"im{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(hr.clip(0, 255).astype(np.uint8)).save(path)
    return root


class TestEvaluation:
    def test_bicubic_on_shared_set5(self, shared_data, tmp_path):
        options = eval_lib.Options(model="bicubic", scale=4, datasets=("Set5",),
                                   data_dir=str(shared_data / "benchmark"), output=str(tmp_path))  # fmt: skip
        results = eval_lib.run_evaluation(options)
        assert results["Set5"][4].psnr == pytest.approx(28.42, abs=0.02)  # published bicubic (VDSR table)
        saved = json.loads((tmp_path / "results.json").read_text())
        assert len(saved["sets"]["Set5"]["x4"]["images"]) == 5
        csv = (tmp_path / "results.csv").read_text().splitlines()
        assert csv[0] == "set,scale,image,psnr,ssim" and csv[-1].startswith("Set5,4,MEAN,28.4")

    def test_model_checkpoint_padding_equals_unpadded(self, authors_x2, tmp_path):
        root = make_set(tmp_path / "data")
        common = {"workdir": str(authors_x2), "datasets": ("Set5",), "data_dir": str(root)}
        padded = eval_lib.run_evaluation(eval_lib.Options(**common, output=str(tmp_path / "a"), pad_multiple=16,
                                                          save_images=True))  # fmt: skip
        plain = eval_lib.run_evaluation(eval_lib.Options(**common, output=str(tmp_path / "b"), pad_multiple=0))
        for a, b in zip(padded["Set5"][2].images, plain["Set5"][2].images, strict=True):
            assert a.psnr == pytest.approx(b.psnr, abs=1e-6) and a.ssim == pytest.approx(b.ssim, abs=1e-8)
        assert len(list((tmp_path / "a" / "images" / "Set5" / "x2").glob("*.png"))) == 2

    def test_tfds_sets_equal_their_folders(self, tmp_path):
        # The same Set5 read from its EDSR folder and from its prepared TFDS form ("Set5" names
        # sr_benchmark/Set5): the same images, pixel for pixel, and the same scores.
        root = make_set(tmp_path / "data", sizes=((30, 36), (27, 41), (20, 24)))
        datasets.prepare("sr_benchmark/Set5", tmp_path / "tfds", root)
        for scale in (2, 3):
            folder = eval_lib.folder_images(root / "Set5", scale)
            prepared = eval_lib.tfds_images("Set5", "test", tmp_path / "tfds", scale)
            assert [image.name for image in prepared] == [image.name for image in folder] == ["im0", "im1", "im2"]
            for a, b in zip(prepared, folder, strict=True):
                np.testing.assert_array_equal(a.lr, b.lr)
                np.testing.assert_array_equal(a.hr, b.hr)
        common = {"model": "bicubic", "scale": 3, "datasets": ("Set5",)}
        from_tfds = eval_lib.run_evaluation(eval_lib.Options(**common, tfds_data_dir=str(tmp_path / "tfds"),
                                                             output=str(tmp_path / "a")))  # fmt: skip
        from_folder = eval_lib.run_evaluation(
            eval_lib.Options(**common, data_dir=str(root), output=str(tmp_path / "b"))
        )
        assert from_tfds["Set5"][3].psnr == from_folder["Set5"][3].psnr

    def test_upscaler_options_reach_the_prediction(self, authors_x2):
        model, variables = checkpointing.load_model(authors_x2)
        lr = np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # chop: 4 quadrants
        x = lr.astype(np.float32) / 255

        def upscaled(**kwargs):
            upscale, scale, description = eval_lib.make_upscaler(eval_lib.Options(workdir=str(authors_x2), **kwargs))
            assert scale == 2 and description["checkpoint_step"] == 0
            return upscale(lr).astype(int), description

        plain = inference.predict(model, variables, x)
        # Self-ensemble: the mean over the 8 flips and transposes, each undone.
        views = [np.rot90(v, r) for v in (x, x.transpose(1, 0, 2)) for r in range(4)]
        outputs = [inference.predict(model, variables, np.ascontiguousarray(v)) for v in views]
        undone = [np.rot90(o, -(i % 4)) for i, o in enumerate(outputs)]
        undone = undone[:4] + [u.transpose(1, 0, 2) for u in undone[4:]]
        ensemble, description = upscaled(self_ensemble=True)
        assert description["self_ensemble"] is True
        assert np.abs(ensemble - metrics.quantize(np.mean(undone, axis=0))).max() <= 1
        # Tiles: global attention, so the untiled result (up to rounding at .5).
        tiled, description = upscaled(tile_size=8)
        assert description["tile_size"] == 8 and np.abs(tiled - metrics.quantize(plain)).max() <= 1
        # Chop: the authors' quadrants, which change the result.
        chopped, description = upscaled(chop=True)
        assert description["chop"] is True
        np.testing.assert_array_equal(chopped, metrics.quantize(inference.predict_chop(model, variables, x)))
        assert (chopped != metrics.quantize(plain)).any()  # distinguishable from whole-image inference

    def test_scale_mismatch(self, authors_x2):
        with pytest.raises(ValueError, match="×2 model"):
            eval_lib.make_upscaler(eval_lib.Options(workdir=str(authors_x2), scale=4))

    def test_missing_and_empty_sets(self, tmp_path):
        options = eval_lib.Options(model="bicubic", scale=2, datasets=("Urban100",), data_dir=str(tmp_path))
        with pytest.raises(FileNotFoundError, match=r"Urban100/HR.*expected layout"):
            eval_lib.run_evaluation(options)
        (tmp_path / "Urban100" / "HR").mkdir(parents=True)
        with pytest.raises(ValueError, match="no images"):
            eval_lib.run_evaluation(options)

    def test_cli_errors_are_clear(self, tmp_path):
        result = subprocess.run(
            [sys.executable, "eval.py", "--model", "bicubic", "--scale", "2", "--datasets", "B100",
             f"--data_dir={tmp_path}", f"--output={tmp_path / 'out'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2 and "B100/HR" in result.stderr


class TestUpscale:
    def test_grey_rgba_and_folder(self, authors_x2, tmp_path):
        rng = np.random.default_rng(1)
        inputs = tmp_path / "in"
        inputs.mkdir()
        Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8)).save(inputs / "grey.png")
        Image.fromarray(rng.integers(0, 256, (10, 7, 4), dtype=np.uint8)).save(inputs / "rgba.png")
        options = eval_lib.Options(workdir=str(authors_x2), output=str(tmp_path / "out"))
        written, skipped = eval_lib.run_upscale(options, inputs)
        assert skipped == {}
        grey = Image.open(tmp_path / "out" / "grey_x2.png")
        rgba = Image.open(tmp_path / "out" / "rgba_x2.png")
        assert len(written) == 2
        assert grey.mode == "L" and grey.size == (22, 18)
        assert rgba.mode == "RGBA" and rgba.size == (14, 20)
        alpha = np.asarray(Image.open(inputs / "rgba.png").getchannel("A"))
        np.testing.assert_array_equal(np.asarray(rgba.getchannel("A")), imresize.imresize(alpha, 2))
        # The values: the model's output quantised (round half up); grey files get its BT.601 luma.
        model, variables = checkpointing.load_model(authors_x2)

        def expected(rgb):
            sr = inference.predict(model, variables, rgb.astype(np.float32) / 255)
            return np.floor(np.clip(sr.astype(np.float64) * 255, 0, 255) + 0.5)

        colour = np.asarray(Image.open(inputs / "rgba.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(rgba)[..., :3], expected(colour))
        grey_in = np.asarray(Image.open(inputs / "grey.png"))
        rgb_out = expected(np.repeat(grey_in[..., None], 3, axis=-1))
        luma = (65.481 * rgb_out[..., 0] + 128.553 * rgb_out[..., 1] + 24.966 * rgb_out[..., 2]) / 219
        np.testing.assert_array_equal(np.asarray(grey), np.floor(luma + 0.5))

    def test_same_stem_bad_files_and_output_checks(self, tmp_path, capsys):
        rng = np.random.default_rng(2)
        inputs = tmp_path / "in"
        inputs.mkdir()
        png, jpg = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8), rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(png).save(inputs / "a.png")
        Image.fromarray(jpg).save(inputs / "a.jpg", quality=95)
        (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        options = eval_lib.Options(model="bicubic", scale=2, output=str(tmp_path / "out"))
        written, skipped = eval_lib.run_upscale(options, inputs)
        assert sorted(p.name for p in written) == ["a_jpg_x2.png", "a_png_x2.png"]
        assert Image.open(tmp_path / "out" / "a_png_x2.png").size == (18, 16)
        assert Image.open(tmp_path / "out" / "a_jpg_x2.png").size == (10, 12)
        assert list(skipped) == [inputs / "broken.png"] and "corrupt" in skipped[inputs / "broken.png"]
        assert "skipped" in capsys.readouterr().err
        with pytest.raises(ValueError, match="--output is the --input folder"):
            eval_lib.run_upscale(eval_lib.Options(model="bicubic", scale=2, output=str(inputs)), inputs)
        (tmp_path / "file").write_text("")
        with pytest.raises(ValueError, match="is a file; name a folder"):
            eval_lib.run_upscale(eval_lib.Options(model="bicubic", scale=2, output=str(tmp_path / "file")), inputs)

    def test_cli_exit_status_and_flag_errors(self, tmp_path):
        inputs = tmp_path / "in"
        inputs.mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(inputs / "ok.png")
        (inputs / "bad.png").write_bytes(b"nope")
        base = [sys.executable, "eval.py", "--model", "bicubic", "--scale", "2"]

        def run(*flags):
            return subprocess.run([*base, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)

        result = run(f"--input={inputs}", f"--output={tmp_path / 'out'}")
        assert result.returncode == 1 and "1 of 2 images could not be read" in result.stderr
        assert (tmp_path / "out" / "ok_x2.png").is_file()
        result = run("--checkpoint=foo", f"--input={inputs}")
        assert result.returncode == 2 and "--checkpoint must be 'best', 'latest' or a step" in result.stderr
        assert "Traceback" not in result.stderr

    def test_missing_input(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            eval_lib.run_upscale(eval_lib.Options(model="bicubic", scale=2), tmp_path / "none.png")

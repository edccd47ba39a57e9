"""enlca_jax.datasets: TFDS builders (array_record, no TensorFlow), TFDS's own div2k, the CLI."""

import importlib.util
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_image, write
from PIL import Image

from enlca_jax import datasets, image_io, imresize, input_pipeline
from enlca_jax.datasets import __main__ as prepare_cli


@pytest.fixture
def benchmark_dir(tmp_path):
    """A tiny EDSR-layout set 'Set5' with LR ×2 given and ×3/×4 missing (to be generated)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for name, (h, w) in {"a": (40, 50), "b": (37, 61), "c": (48, 48)}.items():
        hr = random_image(rng, h, w)
        write(root / "Set5" / "HR" / f"{name}.png", hr)
        write(root / "Set5" / "LR_bicubic" / "X2" / f"{name}x2.png", imresize.bicubic_downscale(hr, 2))
    return root


class TestBuilders:
    def test_prepare_and_read_without_tensorflow(self, benchmark_dir, tmp_path):
        assert prepare_cli.main(["--source", str(benchmark_dir), "--data_dir", str(tmp_path / "tfds")]) == 0
        source = datasets.load_split("sr_benchmark/Set5", "test", tmp_path / "tfds")
        assert len(source) == 3
        assert "tensorflow" not in sys.modules
        by_name = {datasets.decode_name(source[i]["name"]): source[i] for i in range(3)}
        hr = np.asarray(Image.open(benchmark_dir / "Set5" / "HR" / "b.png"))
        np.testing.assert_array_equal(by_name["b"]["hr"], hr)
        for scale in (2, 3, 4):
            np.testing.assert_array_equal(by_name["b"][f"lr_x{scale}"], imresize.bicubic_downscale(hr, scale))

    def test_patch_check_reads_png_headers_not_pixels(self, benchmark_dir, tmp_path, monkeypatch):
        datasets.prepare("sr_benchmark/Set5", tmp_path, benchmark_dir)
        every_scale = datasets.load_split("sr_benchmark/Set5", "test", tmp_path)
        for index in range(len(every_scale)):
            for scale in (2, 3, 4):
                assert every_scale.lr_shape(index, scale) == every_scale[index][f"lr_x{scale}"].shape[:2]
        source = datasets.load_split("sr_benchmark/Set5", "test", tmp_path, scale=2)
        decoded = []
        original = datasets.SplitSource.__getitem__
        monkeypatch.setattr(datasets.SplitSource, "__getitem__", lambda self, i: decoded.append(i) or original(self, i))
        input_pipeline.check_source(source, 2, patch_size=18)  # the smallest LR ×2 is b, 18×30
        assert decoded == [0]  # only the first example, to see which scales exist
        with pytest.raises(ValueError, match=r"smaller than the patch 19 at ×2: b \(18×30\)"):
            input_pipeline.check_source(source, 2, patch_size=19)
        assert datasets.png_shape(b"GIF89a" + bytes(30)) is None

    def test_shared_set5_uses_matlab_lr_files(self, shared_data, tmp_path):
        builder = datasets.prepare("sr_benchmark/Set5", tmp_path, shared_data / "benchmark")
        source = builder.as_data_source(split="test")
        names = [image.name for image in input_pipeline.eval_examples(source, 4)]
        assert names == ["baby", "bird", "butterfly", "head", "woman"]
        for image in input_pipeline.eval_examples(source, 3):
            path = shared_data / "benchmark/Set5/LR_bicubic/X3" / f"{image.name}x3.png"
            np.testing.assert_array_equal(image.lr, np.asarray(Image.open(path)))
            assert image.hr.shape == (image.lr.shape[0] * 3, image.lr.shape[1] * 3, 3)
            assert not image.greyscale

    def test_folder_and_embedded_default(self, tmp_path):
        rng = np.random.default_rng(1)
        write(tmp_path / "photos" / "x.png", random_image(rng, 30, 30))
        write(tmp_path / "photos" / "grey.png", random_image(rng, 25, 33, c=0))
        argv = ["--source", str(tmp_path / "photos"), "--folder", "mine", "--data_dir", str(tmp_path / "d")]
        assert prepare_cli.main(argv) == 0
        source = datasets.load_split("sr_folder/mine", "train", tmp_path / "d")
        assert len(source) == 2 and all(source[i]["hr"].shape[-1] == 3 for i in range(2))
        grey = {datasets.decode_name(source[i]["name"]): bool(source[i]["greyscale"]) for i in range(2)}
        assert grey == {"grey": True, "x": False}
        skimage = datasets.load_split("sr_skimage", "validation", tmp_path / "d")  # prepared on first use
        assert len(skimage) == len(datasets.SKIMAGE_VALIDATION)

    def test_changed_source_is_rebuilt(self, tmp_path, capsys):
        rng = np.random.default_rng(2)
        photos = tmp_path / "photos"
        write(photos / "a.png", random_image(rng, 30, 30))
        argv = ["--source", str(photos), "--folder", "mine", "--data_dir", str(tmp_path / "d")]
        assert prepare_cli.main(argv) == 0
        assert prepare_cli.main(argv) == 0  # unchanged: reused
        assert "rebuilding" not in capsys.readouterr().out
        write(photos / "b.png", random_image(rng, 24, 28))
        assert prepare_cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "changed since" in out and "{'train': 2}" in out
        assert len(datasets.load_split("sr_folder/mine", "train", tmp_path / "d")) == 2
        (photos / "a.png").unlink()
        (photos / "b.png").unlink()
        write(photos / "c.png", random_image(rng, 20, 20))
        assert prepare_cli.main(argv) == 0
        source = datasets.load_split("sr_folder/mine", "train", tmp_path / "d")
        assert [datasets.decode_name(source[i]["name"]) for i in range(len(source))] == ["c"]
        argv[1] = str(tmp_path / "gone")
        assert prepare_cli.main(argv) == 2
        assert "does not exist" in capsys.readouterr().err

    def test_not_prepared_says_how(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="python -m enlca_jax.datasets --source"):
            datasets.load_split("sr_benchmark/Set14", "test", tmp_path)

    def test_missing_folder(self, tmp_path, capsys):
        assert prepare_cli.main(["--source", str(tmp_path / "nope"), "--data_dir", str(tmp_path)]) == 2
        assert "HR" in capsys.readouterr().err

    def test_set_without_images_names_layout(self, tmp_path):
        (tmp_path / "src" / "Set5" / "HR").mkdir(parents=True)
        with pytest.raises(ValueError, match=r"no images in .*Set5/HR.*expected layout"):
            datasets.prepare("sr_benchmark/Set5", tmp_path / "d", tmp_path / "src")

    def test_corrupt_image_names_file(self, benchmark_dir, tmp_path):
        path = benchmark_dir / "Set5" / "HR" / "b.png"
        path.write_bytes(path.read_bytes()[:200])  # truncated
        with pytest.raises(ValueError, match=r"b\.png.*corrupt"):
            datasets.prepare("sr_benchmark/Set5", tmp_path / "d", benchmark_dir)

    def test_lr_size_mismatch_names_file(self, benchmark_dir, tmp_path):
        write(
            benchmark_dir / "Set5" / "LR_bicubic" / "X2" / "ax2.png",
            random_image(np.random.default_rng(2), 19, 25),
        )
        with pytest.raises(ValueError, match=r"a\.png: LR ×2 is 19×25 .* exactly 20×25"):
            datasets.prepare("sr_benchmark/Set5", tmp_path / "d", benchmark_dir)

    def test_unknown_names(self, tmp_path):
        with pytest.raises(ValueError, match="known"):
            datasets.get_builder("div3k", tmp_path)
        with pytest.raises(ValueError, match="no set"):
            datasets.get_builder("sr_benchmark/Set6", tmp_path)


class TestOfficialDiv2k:
    """TFDS's own ``div2k`` builder, prepared here from local PNGs (its real preparation downloads)."""

    @staticmethod
    def prepare_fake(data_dir, rng, file_format="array_record"):
        import tensorflow_datasets as tfds  # noqa: PLC0415

        official = tfds.builder_cls("div2k")
        images = {}
        for split, count in (("train", 3), ("validation", 2)):
            images[split] = []
            for _ in range(count):
                hr = random_image(rng, 40, 52)
                images[split].append((hr, imresize.bicubic_downscale(hr, 4)))

        with tfds.core.registered.skip_registration():

            class LocalDiv2k(official):
                name = "div2k"

                def _split_generators(self, dl_manager):
                    return {split: self._generate_examples(pairs) for split, pairs in images.items()}

                def _generate_examples(self, pairs):
                    for index, (hr, lr) in enumerate(pairs):
                        key = f"{index + 1:04d}x4.png"
                        yield key, {"lr": image_io.encode_png(lr), "hr": image_io.encode_png(hr)}

        LocalDiv2k(config="bicubic_x4", data_dir=str(data_dir), file_format=file_format).download_and_prepare()
        return images

    def test_reads_official_array_record_without_tensorflow(self, tmp_path):
        images = self.prepare_fake(tmp_path, np.random.default_rng(5))
        source = datasets.load_split("div2k/bicubic_x4", "train", tmp_path, scale=4)
        assert len(source) == 3
        assert "tensorflow" not in sys.modules
        stored = {image_io.encode_png(source[i]["hr"]): source[i] for i in range(3)}
        for hr, lr in images["train"]:
            np.testing.assert_array_equal(stored[image_io.encode_png(hr)]["lr_x4"], lr)
        batches = input_pipeline.train_dataset(source, scale=4, patch_size=8, batch_size=2, seed=0)
        batch = next(iter(batches))
        assert batch["lr"].shape == (2, 8, 8, 3) and batch["hr"].shape == (2, 32, 32, 3)
        validation = datasets.load_split("div2k/bicubic_x4", "validation", tmp_path)
        evaluated = list(input_pipeline.eval_examples(validation, 4))
        assert [e.name for e in evaluated] == ["validation_0000", "validation_0001"]

    def test_official_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="never downloads.*tfds build div2k --config bicubic_x4"):
            datasets.load_split("div2k/bicubic_x4", "train", tmp_path)
        with pytest.raises(ValueError, match="bicubic_x2/3/4"):
            datasets.load_split("div2k/bicubic_x8", "train", tmp_path)
        self.prepare_fake(tmp_path, np.random.default_rng(6))
        with pytest.raises(ValueError, match="holds ×4 LR images, but scale 2"):
            datasets.load_split("div2k/bicubic_x4", "train", tmp_path, scale=2)
        with pytest.raises(ValueError, match="has splits"):
            datasets.load_split("div2k/bicubic_x4", "test", tmp_path)

    @pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
    def test_official_tfrecord_is_converted_with_tensorflow(self, tmp_path):
        # TFRecord shards written by TensorFlow itself. In a subprocess: importing TensorFlow here
        # would break the no-TensorFlow checks of the other tests.
        script = f"""
import sys, pathlib
import numpy as np
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
from test_datasets import TestOfficialDiv2k
from enlca_jax import datasets, image_io
data_dir = pathlib.Path({str(tmp_path)!r})
images = TestOfficialDiv2k.prepare_fake(data_dir, np.random.default_rng(9), file_format="tfrecord")
assert not list(data_dir.rglob("*.array_record*"))
source = datasets.load_split("div2k/bicubic_x4", "train", data_dir, scale=4)
stored = {{image_io.encode_png(source[i]["hr"]): source[i]["lr_x4"] for i in range(len(source))}}
assert len(stored) == 3
for hr, lr in images["train"]:
    np.testing.assert_array_equal(stored[image_io.encode_png(hr)], lr)
assert len(datasets.load_split("div2k/bicubic_x4", "validation", data_dir)) == 2
print("converted", sorted(p.name for p in data_dir.rglob("*.array_record*")))
"""
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "converted ['div2k-train.array_record" in result.stdout

    @staticmethod
    def rewrite_as_tfrecord(data_dir):
        """Turn the prepared array_record shards into TFRecord-framed shards (as TFDS's default)."""
        from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

        version_dir = next((data_dir / "div2k" / "bicubic_x4").glob("*/dataset_info.json")).parent
        for shard in version_dir.glob("*.array_record-*"):
            reader = ArrayRecordReader(str(shard))
            records = reader.read_all()
            reader.close()
            framed = b"".join(struct.pack("<Q", len(r)) + b"\0" * 4 + r + b"\0" * 4 for r in records)
            (version_dir / shard.name.replace(".array_record-", ".tfrecord-")).write_bytes(framed)
            shard.unlink()
        info = version_dir / "dataset_info.json"
        info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
        return version_dir

    def test_official_tfrecord_is_converted_without_tensorflow(self, tmp_path):
        images = self.prepare_fake(tmp_path, np.random.default_rng(7))
        version_dir = self.rewrite_as_tfrecord(tmp_path)
        source = datasets.load_split("div2k/bicubic_x4", "train", tmp_path, scale=4)
        assert "tensorflow" not in sys.modules
        stored = {image_io.encode_png(source[i]["hr"]): source[i]["lr_x4"] for i in range(len(source))}
        for hr, lr in images["train"]:
            np.testing.assert_array_equal(stored[image_io.encode_png(hr)], lr)
        assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
            "div2k-train.array_record-00000-of-00001",
            "div2k-validation.array_record-00000-of-00001",
        ]
        assert not list(version_dir.glob(".*partial"))
        assert len(datasets.load_split("div2k/bicubic_x4", "validation", tmp_path)) == 2  # reuses the copy

    def test_truncated_tfrecord_is_named(self, tmp_path):
        self.prepare_fake(tmp_path, np.random.default_rng(8))
        version_dir = self.rewrite_as_tfrecord(tmp_path)
        shard = next(version_dir.glob("div2k-train.tfrecord-*"))
        shard.write_bytes(shard.read_bytes()[:-100])
        with pytest.raises(ValueError, match=f"{shard.name}: truncated TFRecord"):
            datasets.load_split("div2k/bicubic_x4", "train", tmp_path)

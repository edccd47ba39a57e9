"""configs/ and enlca_jax.configuration: every config builds its model; the recipe's settings."""

import pathlib
import subprocess
import sys

import pytest

from configs import default, demo, enlca_x2, enlca_x3, enlca_x4, tiny
from enlca_jax import configuration, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TestConfigs:
    def test_all_configs_build(self):
        for module in (default, enlca_x2, enlca_x3, enlca_x4, demo, tiny):
            config = module.get_config()
            model = configuration.build_model(config)
            assert model.scale == config.model.scale
        assert configuration.build_model(enlca_x4.get_config()).num_attention_blocks == 5

    def test_paper_variant(self):
        config = enlca_x4.get_config("paper")
        assert config.contrastive.use_fractions and config.contrastive.start_step == 150_000
        assert config.adam_b2 == 0.99
        assert configuration.build_model(config).block().contrastive_fractions == (0.02, 0.08)
        with pytest.raises(ValueError, match="unknown variant"):
            enlca_x4.get_config("papr")

    def test_authors_schedule(self):
        schedule = train_step.learning_rate_schedule(enlca_x4.get_config())
        assert [float(schedule(s)) for s in (0, 199_999, 200_000, 400_000, 999_999)] == pytest.approx(
            [1e-4, 1e-4, 5e-5, 2.5e-5, 6.25e-6]
        )

    def test_misspelt_field_fails(self):
        result = subprocess.run(
            [sys.executable, "train.py", "--config", "configs/tiny.py", "--config.batch_sise=3", "--workdir=/tmp/x"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0 and "batch_sise" in result.stderr

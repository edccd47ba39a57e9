"""enlca_jax.configuration: every range checked up front; which fields a resumed run may change."""

import json

import pytest
from conftest import override

from configs import default, demo, enlca_x4, tiny
from enlca_jax import configuration


def with_fields(config, **fields):
    """``config`` with fields set, ``model__scale=5`` for ``config.model.scale``."""
    return override(config, {key.replace("__", "."): value for key, value in fields.items()})


class TestCheckConfig:
    @pytest.mark.parametrize("module", [default, demo, enlca_x4, tiny])
    def test_shipped_configs_pass(self, module):
        configuration.check_config(module.get_config())

    @pytest.mark.parametrize(
        "fields, message",
        [
            ({"keep_latest": 0}, "config.keep_latest = 0: must be >= 1"),
            ({"learning_rate": -1e-4}, r"config.learning_rate = -0.0001: must be > 0"),
            ({"checkpoint_every": 0}, "config.checkpoint_every = 0: must be >= 1"),
            ({"eval_every": 0}, "config.eval_every = 0"),
            ({"log_every": 0}, "config.log_every = 0"),
            ({"redraw_interval": 0}, "config.redraw_interval = 0"),
            ({"num_sample_images": -1}, "config.num_sample_images = -1: must be >= 0"),
            ({"model__scale": 5}, "config.model.scale = 5: choose 2, 3 or 4"),
            ({"model__attention": "softmax"}, "config.model.attention = 'softmax': choose one of 'enla', 'nla'"),
            ({"model__reduction": 16}, "config.model.reduction = 16 exceeds config.model.features = 8"),
            ({"contrastive__method": "sort"}, "config.contrastive.method = 'sort'"),
            ({"adam_b2": 1.0}, r"config.adam_b2 = 1.0: must lie in \[0, 1\)"),
            ({"lr_milestones": (400, 200)}, "config.lr_milestones"),
            ({"data__patch_size": 8}, "gives 64 positions per patch, fewer than the 65 ranked keys"),
        ],
    )
    def test_each_bad_field_is_named_with_its_fix(self, fields, message):
        config = with_fields(tiny.get_config(), **fields)
        with pytest.raises(ValueError, match=message) as error:
            configuration.check_config(config)
        assert "--config.FIELD=VALUE" in str(error.value)

    def test_all_problems_at_once(self):
        config = with_fields(tiny.get_config(), keep_latest=0, log_every=0)
        with pytest.raises(ValueError, match="(?s)log_every = 0.*keep_latest = 0"):
            configuration.check_config(config)

    def test_small_patch_is_fine_without_the_term_in_the_run(self):
        # The windows need 65 positions only if the term switches on before the run ends.
        configuration.check_config(with_fields(tiny.get_config(), data__patch_size=8, contrastive__start_step=6))
        configuration.check_config(with_fields(tiny.get_config(), data__patch_size=8, model__attention="none"))
        with pytest.raises(ValueError, match="contrastive fractions: N = 100 positions is too few"):
            configuration.check_config(
                with_fields(tiny.get_config(), data__patch_size=10, contrastive__use_fractions=True,
                            contrastive__positive_fraction=0.3, contrastive__negative_start_fraction=0.8)
            )  # fmt: skip


class TestDifferences:
    def stored(self, config):
        return json.loads(json.dumps(configuration.run_record(config)))  # as read back from config.json

    def test_same_config_has_none(self):
        assert configuration.differences(self.stored(tiny.get_config()), tiny.get_config()) == ([], [])

    def test_model_data_batch_and_seed_are_incompatible(self):
        stored = self.stored(tiny.get_config())
        changed = with_fields(tiny.get_config(), model__features=16, batch_size=8, seed=3, data__patch_size=16,
                              model__dtype="bfloat16", contrastive__positive=10)  # fmt: skip
        incompatible, other = configuration.differences(stored, changed)
        text = "\n".join(incompatible)
        for name in (
            "model features: 8 -> 16",
            "config.batch_size: 4 -> 8",
            "config.seed: 1 -> 3",
            "config.data.patch_size: 12 -> 16",
            "config.model.dtype",
            "contrastive_positive: 15 -> 10",
        ):
            assert name in text  # fmt: skip
        assert other == []

    def test_schedule_and_logging_may_change(self):
        stored = self.stored(tiny.get_config())
        changed = with_fields(tiny.get_config(), num_train_steps=60, log_every=5, contrastive__method="top_k",
                              contrastive__start_step=4)  # fmt: skip
        incompatible, other = configuration.differences(stored, changed)
        assert incompatible == []
        assert other == ["config.contrastive.method: 'select' -> 'top_k'", "config.contrastive.start_step: 2 -> 4",
                         "config.log_every: 1 -> 5", "config.num_train_steps: 6 -> 60"]  # fmt: skip

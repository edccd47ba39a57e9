"""ENLCN ×4, the authors' recipe (Zj-BinXia/ENLCA current code), on DIV2K.

    python -m enlca_jax.datasets --source ~/data/DIV2K --data_dir ~/tensorflow_datasets
    python -m enlca_jax.datasets --source ~/data/benchmark --data_dir ~/tensorflow_datasets
    python train.py --config configs/enlca_x4.py --workdir runs/enlca_x4
    python train.py --config configs/enlca_x4.py:paper --workdir runs/enlca_x4_paper   # paper variant

DIV2K 800 images, LR patch 48, batch 16, 8-way flips/transposes, Adam (0.9, 0.999, 1e-8), lr 1e-4
halved at 200k/400k/600k/800k steps, 1M steps, L1 + 0.001 · contrastive from step 101k, random
features redrawn every 640 steps; validation on Set14 every 1000 steps.
Expected: the paper reports 32.67 dB on Set5 and 28.94 dB on Set14 (×4, Y-PSNR) after the full
run. The full run needs accelerators: on 2 CPU cores one batch-16 ×4 step takes about 80 s
(benchmarks/train_step.py), i.e. over two years for 1M steps; on one H200 about 0.09 s, about 26
hours for 1M steps (docs/performance.md).
The ``paper`` variant uses the paper's contrastive counts (n1 = 2 %, n2 = 8 %), a 150k-step
warm-up and Adam β2 = 0.99.
"""

from configs import default


def recipe(scale: int, variant: str = ""):
    """The authors' recipe at ``scale``; ``variant='paper'`` selects the paper's settings."""
    config = default.get_config()
    config.model.scale = scale
    if variant == "paper":
        config.contrastive.use_fractions = True
        config.contrastive.start_step = 150_000
        config.adam_b2 = 0.99
    elif variant:
        raise ValueError(
            f"unknown variant {variant!r}: use configs/enlca_x{scale}.py or configs/enlca_x{scale}.py:paper"
        )
    return config


def get_config(variant: str = ""):
    return recipe(4, variant)

"""ENLCN ×3, the authors' recipe (Zj-BinXia/ENLCA current code), on DIV2K.

    python -m enlca_jax.datasets --source ~/data/DIV2K --data_dir ~/tensorflow_datasets
    python -m enlca_jax.datasets --source ~/data/benchmark --data_dir ~/tensorflow_datasets
    python train.py --config configs/enlca_x3.py --workdir runs/enlca_x3
    python train.py --config configs/enlca_x3.py:paper --workdir runs/enlca_x3_paper   # paper variant

DIV2K 800 images, LR patch 48, batch 16, 8-way flips/transposes, Adam (0.9, 0.999, 1e-8), lr 1e-4
halved at 200k/400k/600k/800k steps, 1M steps, L1 + 0.001 · contrastive from step 101k, random
features redrawn every 640 steps; validation on Set14 every 1000 steps.
Expected: the paper reports no ×3 results (neither do the authors publish ×3 weights); expect
between the ×2 and ×4 numbers (EDSR ×3: 34.65 dB Set5, 30.52 dB Set14) after the full
run. The full run needs accelerators: on 2 CPU cores one batch-16 step takes minutes (see
benchmarks/train_step.py), i.e. years for 1M steps; on one modern GPU expect days.
The ``paper`` variant uses the paper's contrastive counts (n1 = 2 %, n2 = 8 %), a 150k-step
warm-up and Adam β2 = 0.99.
"""

from configs.enlca_x4 import recipe


def get_config(variant: str = ""):
    return recipe(3, variant)

"""The README's main job: a small ENLCN ×2 trained on 2 CPU cores in about 4-7 minutes.

    python train.py --config configs/demo.py --workdir runs/demo

Trains on the photographs that ship inside scikit-image (prepared into TFDS form on first use,
nothing is downloaded) and validates on two held-out ones (chelsea, rocket). At the end it prints
the validation Y-PSNR next to MATLAB bicubic's; expected: the model beats bicubic (measured
34.38 dB / SSIM 0.9287 versus 33.78 dB / 0.9155 for bicubic, 0.60 dB better). The contrastive
term is switched on for the last 200 steps (the authors likewise train with L1 alone first), so
the whole ENLCA objective runs; those steps run about 3x slower here (1.1 against 3.3-3.8 it/s):
on 2 CPU cores, forming T = q·kᵀ and finding each query's ranked windows cost more than the rest
of this small network. With --config.model.attention=nla (exact attention) it takes about twice
as long and ends at 34.37 dB / 0.9287.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.scale = 2
    config.model.num_resblocks = 4
    config.model.features = 32
    config.model.attention_every = 2
    config.data.train = "sr_skimage"
    config.data.validation = "sr_skimage"
    config.data.validation_split = "validation"
    config.data.patch_size = 32
    config.batch_size = 8
    config.num_train_steps = 800
    config.learning_rate = 5e-4
    config.lr_milestones = (600,)
    config.contrastive.start_step = 600
    config.redraw_interval = 640
    config.log_every = 100
    config.eval_every = 400
    config.checkpoint_every = 200
    config.num_sample_images = 2
    return config

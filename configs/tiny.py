"""A seconds-long configuration for tests and smoke runs (tiny ENLCN ×2, tiny patches).

    python train.py --config configs/tiny.py --workdir /tmp/enlca_tiny --config.data.data_dir=DIR

Expected: finishes in well under a minute on a CPU; the numbers mean nothing.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.scale = 2
    config.model.num_resblocks = 2
    config.model.features = 8
    config.model.attention_every = 1
    config.model.num_random_features = 16
    config.data.train = "sr_skimage"
    config.data.validation = "sr_skimage"
    config.data.validation_split = "validation"
    config.data.validation_images = 1
    config.data.patch_size = 12  # 144 positions >= the 65 ranks the contrastive loss needs
    config.batch_size = 4
    config.num_train_steps = 6
    config.learning_rate = 1e-3
    config.lr_milestones = (4,)
    config.contrastive.start_step = 2
    config.redraw_interval = 3
    config.log_every = 1
    config.eval_every = 6
    config.checkpoint_every = 2
    config.num_sample_images = 1
    config.progress_bar = False
    return config

"""Every field of a training run, each with its meaning. Other configs import and override it.

The values are the authors' ×4 recipe (configs/enlca_x4.py uses them unchanged, with the exact
command in its docstring). Override any field from the command line, e.g.
``python train.py --config configs/enlca_x4.py --config.batch_size=32 --workdir DIR``; a
misspelt field is an error (the config is locked).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- Model (enlca_jax.models.ENLCN fields) -------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.scale = 4  # upscaling factor: 2, 3 or 4
    config.model.num_resblocks = 32  # EDSR ResBlocks in the trunk
    config.model.features = 256  # trunk channels
    config.model.res_scale = 0.1  # residual scaling of ResBlocks and ENLCA blocks
    config.model.attention_every = 8  # an ENLCA block first and after every n-th ResBlock (5 blocks)
    config.model.attention = "enla"  # 'enla' (efficient), 'nla' (exact softmax) or 'none' (plain EDSR)
    config.model.reduction = 4  # Q/K embedding width = features / reduction (64)
    config.model.num_random_features = 128  # m, rows of each block's random matrix F
    config.model.amplification = 6.0  # k: q·k = k·cos after L2 normalisation
    config.model.feature_type = "orthogonal"  # 'orthogonal' (authors) or 'iid' Gaussian rows of F
    config.model.initializer = "pytorch"  # 'pytorch' (authors' training) or 'flax' default initialisers
    config.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params and feature maps stay f32)

    # --- Contrastive sparse aggregation loss ----------------------------------------------------
    config.contrastive = ml_collections.ConfigDict()
    config.contrastive.weight = 1e-3  # lambda in L1 + lambda * mean over blocks of the contrastive loss
    # First step with the contrastive term. Authors: added once the scheduler's completed epochs
    # exceed 100 (1000 iterations per epoch), i.e. from iteration 101,000 (0-based step 101,000).
    config.contrastive.start_step = 101_000
    config.contrastive.positive = 15  # top ranks averaged as positives
    config.contrastive.negative_start = 50  # first rank of the negatives
    config.contrastive.negative = 15  # number of negative ranks
    config.contrastive.margin = 1.0  # b
    # How each row's rank windows are found: 'select' (exact order statistics and masked sums, no
    # sort: enlca_jax.contrastive) or 'top_k' (lax.top_k of the window depth); the same loss.
    config.contrastive.method = "select"
    # Paper variant: counts as fractions of H*W (n1 = 2 %, n2 = 8 %) instead of the fixed counts.
    config.contrastive.use_fractions = False
    config.contrastive.positive_fraction = 0.02
    config.contrastive.negative_start_fraction = 0.08

    # --- Data ----------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.data_dir = "~/tensorflow_datasets"  # TFDS data_dir (prepare with python -m enlca_jax.datasets)
    config.data.train = "sr_div2k"  # training dataset (enlca_jax.datasets names; TFDS's own: div2k/bicubic_x4)
    config.data.train_split = "train"
    config.data.validation = "sr_benchmark/Set14"  # validation set, evaluated on whole images
    config.data.validation_split = "test"
    config.data.validation_images = 0  # evaluate only the first n validation images (0 = all)
    config.data.patch_size = 48  # LR training patch (HR patch = patch_size * scale)
    config.data.augment = True  # random hflip / vflip / transpose of each patch pair
    config.data.worker_count = 0  # grain worker processes for decoding and cropping (0 = in-process)
    config.data.read_threads = 2  # background threads reading ahead (in-process)
    config.data.prefetch = 4  # batches read ahead

    # --- Optimisation ----------------------------------------------------------------------------
    config.seed = 1  # seeds parameters, random features and the data order
    config.batch_size = 16  # global batch (divided over all devices of all processes)
    config.num_train_steps = 1_000_000  # 1000 authors' epochs of 1000 iterations
    config.learning_rate = 1e-4
    config.lr_milestones = (200_000, 400_000, 600_000, 800_000)  # steps where the rate is multiplied
    config.lr_decay = 0.5  # factor applied at each milestone
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999  # the paper's text says 0.99 (configs/enlca_x4.py:paper)
    config.adam_eps = 1e-8
    config.grad_clip_norm = 0.0  # global-norm clipping; 0 disables it (authors: none)
    config.redraw_interval = 640  # steps between redraws of every block's random matrix F

    # --- Logging, validation, checkpoints --------------------------------------------------------
    config.log_every = 100  # steps between metric lines
    config.eval_every = 1000  # steps between validations (authors: every epoch)
    config.checkpoint_every = 1000  # steps between (asynchronous) checkpoints
    config.keep_latest = 3  # newest checkpoints kept in <workdir>/checkpoints
    config.keep_best = 3  # best checkpoints by validation PSNR kept in <workdir>/best
    config.num_sample_images = 3  # validation SR images written to <workdir>/samples/<step>/
    config.progress_bar = True  # tqdm bar on a terminal (plain log lines otherwise)

    # --- Several processes (multi-host TPU pods, GPU clusters; enlca_jax.distributed) -------------
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False  # call jax.distributed.initialize() before anything else
    # Where no cluster is detected (not Cloud TPU, SLURM, Open MPI or Kubernetes): process 0's
    # host:port, the number of processes and this process's id (or JAX_COORDINATOR_ADDRESS,
    # JAX_NUM_PROCESSES, JAX_PROCESS_ID); "" / -1 leave them to the cluster detection.
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = -1
    config.distributed.process_id = -1
    config.distributed.local_device_ids = ""  # e.g. "0,1": this process's GPUs ("" = all it sees)
    config.distributed.cpu_collectives = "gloo"  # how CPU devices of several processes communicate
    config.distributed.initialization_timeout = 300  # seconds to wait for all processes to connect

    # --- Evaluation (eval.py) --------------------------------------------------------------------
    config.eval = ml_collections.ConfigDict()
    config.eval.datasets = ("sr_benchmark/Set5", "sr_benchmark/Set14", "sr_benchmark/B100", "sr_benchmark/Urban100")
    config.eval.self_ensemble = False  # ×8 flips/rotations ("+" results)
    config.eval.tile_size = 0  # LR tile size for tiled global-attention inference (0 = whole image)
    config.eval.chop = False  # the authors' --chop quadrants (reproduces their test protocol)
    return config

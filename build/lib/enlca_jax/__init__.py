"""enlca_jax: ENLCA (Efficient Non-Local Contrastive Attention) for image super-resolution in JAX/Flax.

Submodules: `attention` (random features, ENLA, contrastive loss, the `ENLCA` block), `models`
(ENLCN), `inference` (whole-image, tiled and self-ensemble prediction), `metrics` and `imresize`
(the SR literature's Y-PSNR/SSIM and MATLAB bicubic), `convert` (the authors' PyTorch weights),
`cpu` (XLA:CPU tuning, applied only by programs that call `enlca_jax.cpu.setup`).

Importing any of them changes nothing in the process: no environment variable, no jax setting.
"""

__version__ = "0.1.0"

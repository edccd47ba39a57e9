"""enlca_jax: ENLCA (Efficient Non-Local Contrastive Attention) for image super-resolution in JAX/Flax.

Submodules: `attention` (random features, ENLA, contrastive loss, the `ENLCA` block),
`models` (ENLCN), `inference` (whole-image, tiled and self-ensemble prediction),
`convert` (import of the authors' PyTorch weights).
"""

__version__ = "0.1.0"

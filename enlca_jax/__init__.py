"""enlca_jax: ENLCA (Efficient Non-Local Contrastive Attention) for image super-resolution in JAX/Flax.

Submodules: `attention` (random features, ENLA, contrastive loss, the `ENLCA` block),
`models` (ENLCN), `inference` (whole-image, tiled and self-ensemble prediction),
`convert` (import of the authors' PyTorch weights).
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU defaults set here, before jax initialises its backends (they only affect the CPU
# backend). Naming a flag yourself in XLA_FLAGS overrides ours.
#
# The concurrency-optimised thunk scheduler deadlocks (all threads idle, never returns) on the
# full ENLCN (32 ResBlocks, 5 ENLCA blocks: forward, train step, any batch) with jax 0.10.2, while
# 16 ResBlocks run; turning it off fixes that.
#
# YNNPACK fusions (dots fused with the elementwise ops around them) make ENLA's forward+backward
# slower and noisier (N = 96², batch 4, 2 cores: median 150-168 ms with them, 125-131 ms without;
# the constants they take are materialised as full arrays), while the convolutions, the 2048²
# matmul and the ×4 train step run as fast without them (numbers in the README). It is set only
# on jaxlib 0.10, where it was measured: an unknown flag in XLA_FLAGS aborts XLA.
_FLAGS = {"--xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def _jaxlib_version() -> tuple[int, ...]:
    from importlib import metadata  # noqa: PLC0415

    try:
        return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


if _jaxlib_version() == (0, 10):
    _FLAGS["--xla_cpu_experimental_ynn_fusion_type"] = ""
for _flag, _value in _FLAGS.items():
    if _flag not in _os.environ.get("XLA_FLAGS", ""):
        _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()

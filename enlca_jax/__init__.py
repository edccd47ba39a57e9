"""enlca_jax: ENLCA (Efficient Non-Local Contrastive Attention) for image super-resolution in JAX/Flax.

Submodules: `attention` (random features, ENLA, contrastive loss, the `ENLCA` block),
`models` (ENLCN), `inference` (whole-image, tiled and self-ensemble prediction),
`convert` (import of the authors' PyTorch weights).
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised thunk scheduler deadlocks (all threads idle, never returns) on
# the full ENLCN (32 ResBlocks, 5 ENLCA blocks: forward, train step, any batch) with jax 0.10.2,
# while 16 ResBlocks run. Turning the scheduler off fixes it; it only affects the CPU backend and
# must be set before jax initialises its backends, hence here. Set the flag yourself in XLA_FLAGS
# to override.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()

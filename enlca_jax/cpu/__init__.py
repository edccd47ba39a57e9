"""XLA:CPU tuning behind one door: programs that compute on the CPU call `setup` first thing.

    from enlca_jax import cpu, models
    conv = cpu.setup()                 # None where jax computes on a GPU or TPU: nothing is changed
    model = models.ENLCN(scale=4, conv_general_dilated=conv)

Nothing here happens on import, and nothing in the library applies it by itself: ``train.py``,
``eval.py``, the benchmarks and the test suite call `setup`, and pass what it returns to the
models. Where jax computes on the CPU, `setup`

1. adds the XLA:CPU flags of `xla_flags` to ``XLA_FLAGS`` (before jax initialises its backends:
   they avoid a deadlock of XLA:CPU on the gradient of the full ENLCN and make ENLA faster);
2. with ``restart=True``, restarts the process once with glibc malloc tunables that keep freed
   host memory for the next step (`host_memory`; ``single_arena`` for inference);
3. returns `conv_general_dilated`: convolutions whose kernel gradients are tap matmuls and whose
   large calls run in chunks (`conv`), with the last upsampler stage, its pixel shuffle and the
   tail conv fused (`subpixel`). Same function and parameters as ``flax.linen.Conv``; faster
   train steps and leaner large-image inference on XLA:CPU only.

On a GPU or TPU host (``JAX_PLATFORMS`` names another platform first, or a GPU/TPU plugin of jax
is installed and ``JAX_PLATFORMS`` is unset) `setup` does nothing and returns None.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

# Not conv and subpixel here: they import jax, and `setup(restart=True)` restarts the process
# before jax is imported where it can (importing jax takes over a second).
from enlca_jax.cpu import host_memory, xla_flags

__all__ = ["setup", "computes_on_cpu", "accelerator_plugins", "conv_general_dilated", "ConvGeneralDilated"]


def accelerator_plugins() -> list[str]:
    """GPU/TPU support installed for jax, found without initialising any backend.

    PJRT plugins (the ``jax_plugins`` entry points and namespace package: CUDA, ROCm, …), ``libtpu``
    and ``TPU_LIBRARY_PATH``, and plugins named in ``PJRT_NAMES_AND_LIBRARY_PATHS``.
    """
    found = [entry.name for entry in metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # noqa: PLC0415  (a namespace package, present only with plugins)

        found += [name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None or os.environ.get("TPU_LIBRARY_PATH"):
        found.append("tpu")
    found += [item.split(":")[0] for item in os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS", "").split(",") if item]
    return sorted(set(found))


def computes_on_cpu(environ: Mapping[str, str] | None = None, plugins: Iterable[str] | None = None) -> bool:
    """Whether jax's default backend is (or will be) the CPU, decided without initialising it.

    Once jax's backends are initialised, their answer. Before: the first platform of
    ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms``) when set, else True exactly when no GPU/TPU
    plugin is installed (`accelerator_plugins`). A host with a GPU plugin but no working GPU counts
    as an accelerator host: there the tuning was never measured, so it is left off. Before jax is
    imported only the environment can have configured it, and this does not import it.
    """
    if environ is None and "jax" in sys.modules:
        import jax  # noqa: PLC0415
        from jax._src import xla_bridge  # noqa: PLC0415  (no public "are backends initialised?")

        if plugins is None and xla_bridge.backends_are_initialized():
            return jax.default_backend() == "cpu"
        # This process: jax.config also sees a jax.config.update("jax_platforms", ...).
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    else:
        platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not list(accelerator_plugins() if plugins is None else plugins)


class ConvGeneralDilated:
    """The XLA:CPU ``conv_general_dilated`` for ``flax.linen.Conv`` and for the models' injection point.

    Calling it is `conv.conv_general_dilated`. `enlca_jax.models.ENLCN` also looks for
    `upsample_and_tail` on its ``conv_general_dilated`` and, finding it, computes the last upsampler
    stage, its pixel shuffle and the tail conv in one (`subpixel.upsample_and_tail`).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from enlca_jax.cpu import conv  # noqa: PLC0415

        return conv.conv_general_dilated(*args, **kwargs)

    @staticmethod
    def upsample_and_tail(*args: Any, **kwargs: Any) -> Any:
        from enlca_jax.cpu import subpixel  # noqa: PLC0415

        return subpixel.upsample_and_tail(*args, **kwargs)

    def __repr__(self) -> str:
        return "enlca_jax.cpu.conv_general_dilated"


#: The one instance (models are compared and hashed by their fields, so share it).
conv_general_dilated = ConvGeneralDilated()


def setup(*, restart: bool = False, single_arena: bool = False) -> Callable[..., Any] | None:
    """Tune this process for XLA:CPU if that is where jax computes; call it before any jax computation.

    Args:
      restart: also restart the process once with the glibc tunables of `host_memory` (call it
        then at the very top of a script's ``__main__`` block: state built before is lost).
        ``ENLCA_HOST_ALLOCATOR=system`` keeps glibc's defaults.
      single_arena: with ``restart``, all threads on one malloc heap (inference programs).

    Returns:
      `conv_general_dilated` on the CPU (pass it to the models), None elsewhere, where nothing
      was changed.

    Raises:
      RuntimeError: on the CPU, when jax's backends were initialised before and ``XLA_FLAGS``
        lacks the flags (too late to add them).
    """
    if not computes_on_cpu():
        return None
    if restart and "jax" not in sys.modules:  # restart before importing jax: the new process imports it once
        host_memory.reexec_with_retained_memory(single_arena=single_arena)
    from jax._src import xla_bridge  # noqa: PLC0415

    if xla_flags.with_flags(os.environ.get("XLA_FLAGS", "")) != os.environ.get("XLA_FLAGS", "").strip():
        if xla_bridge.backends_are_initialized():
            raise RuntimeError(
                "enlca_jax.cpu.setup() came after jax initialised its backends, so its XLA_FLAGS cannot take "
                "effect: call it first thing in your program, before any jax computation."
            )
        xla_flags.apply()
    if restart:
        host_memory.reexec_with_retained_memory(single_arena=single_arena)
    return conv_general_dilated

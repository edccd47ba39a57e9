"""The XLA:CPU flags enlca_jax programs run with, and the check that warns where they are missing.

Both only affect the CPU backend and must be in ``XLA_FLAGS`` before jax initialises its backends
(XLA reads the variable once). A flag the user names in ``XLA_FLAGS`` is left as they set it.

- ``--xla_cpu_enable_concurrency_optimized_scheduler=false``. With jaxlib 0.10, XLA:CPU's
  concurrency-optimised scheduler together with its YNNPACK fusions deadlocks (every thread idle,
  the call never returns) on the gradient of an ENLCN with four or more ENLCA blocks, the authors'
  ×4 train step among them; either flag below alone avoids it. The forward pass is not affected.
- ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions; set on jaxlib 0.10 only,
  since XLA aborts on a flag it does not know). With them, XLA:CPU fuses ENLA's dots with the
  elementwise work around them and materialises their constants as full arrays, which makes
  ENLA's forward+backward slower and noisier; convolutions and matmuls run as fast without them
  (docs/performance.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, MutableMapping
from importlib import metadata

SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type"


def jaxlib_version() -> tuple[int, ...]:
    """(major, minor) of the installed jaxlib, or () when it cannot be read."""
    try:
        return tuple(int(part) for part in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


def wanted(version: tuple[int, ...] | None = None) -> dict[str, str]:
    """The flags for this jaxlib: ``{flag: value}``."""
    flags = {SCHEDULER: "false"}
    if (jaxlib_version() if version is None else version) == (0, 10):
        flags[YNN_FUSIONS] = ""
    return flags


def _named(xla_flags: str) -> dict[str, str]:
    named = {}
    for token in xla_flags.split():
        name, _, value = token.partition("=")
        named[name] = value
    return named


def with_flags(xla_flags: str, version: tuple[int, ...] | None = None) -> str:
    """``xla_flags`` with every flag of `wanted` appended that it does not name."""
    named = _named(xla_flags)
    missing = [f"{flag}={value}" for flag, value in wanted(version).items() if flag not in named]
    return " ".join([xla_flags.strip(), *missing]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Add the missing flags to ``environ['XLA_FLAGS']``; True when it changed."""
    before = environ.get("XLA_FLAGS", "")
    after = with_flags(before)
    if after != before:
        environ["XLA_FLAGS"] = after
    return after != before


def deadlock_prone(environ: Mapping[str, str] = os.environ, version: tuple[int, ...] | None = None) -> bool:
    """True when ``XLA_FLAGS`` leaves both the concurrency scheduler and the YNNPACK fusions at
    their defaults on jaxlib 0.10, the combination that deadlocks on ENLCN's gradient."""
    if (jaxlib_version() if version is None else version) != (0, 10):
        return False
    named = _named(environ.get("XLA_FLAGS", ""))
    return named.get(SCHEDULER, "true") != "false" and named.get(YNN_FUSIONS, "default") != ""


def warn_if_deadlock_prone(num_attention_blocks: int) -> None:
    """Warn (once per call site) that this process's XLA:CPU may hang on a model's gradient.

    Called by `enlca_jax.models.ENLCN` when it is traced for the CPU: a check, it changes nothing.
    """
    if num_attention_blocks >= 4 and deadlock_prone():
        warnings.warn(
            "XLA:CPU as this process configured it (jaxlib 0.10, default XLA_FLAGS) can deadlock on the gradient "
            f"of an ENLCN with {num_attention_blocks} ENLCA blocks. Call `enlca_jax.cpu.setup()` first thing in "
            "your program (before any jax computation), or set XLA_FLAGS="
            f"'{SCHEDULER}=false' yourself.",
            RuntimeWarning,
            stacklevel=3,
        )

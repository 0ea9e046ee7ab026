"""lowra.cuda_kernels: CUDA implementations of the ``lowra::`` ops, built on demand.

The ops themselves (schemas, fake kernels, the pure-torch reference that runs everywhere) are defined once in
``lowra.sdk.ops``; this package only *adds* CUDA kernels for the same schemas when it can build them. Nothing
here is required: when ``load()`` fails, every op keeps running through the reference implementation.

``load()`` never raises for an environment that cannot build (no GPU, CPU-only torch, no sources, no nvcc);
it returns a falsy :class:`KernelStatus` whose ``reason`` says why, so callers can log it once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DISABLE_ENV", "KernelStatus", "load", "sources"]

# Set to "0" to keep the reference implementation even where the kernels could be built (A/B checks, debugging).
DISABLE_ENV = "LOWRA_CUDA_KERNELS"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class KernelStatus:
    """Outcome of :func:`load`; truthy only when CUDA kernels are registered for the ``lowra::`` ops."""

    loaded: bool
    reason: str

    def __bool__(self) -> bool:
        return self.loaded


_status: KernelStatus | None = None


def sources() -> list[Path]:
    """The CUDA / C++ sources shipped in this package (none yet: the kernels are a later issue)."""
    return sorted(p for p in _HERE.iterdir() if p.suffix in (".cu", ".cpp"))


def load() -> KernelStatus:
    """Build (once per process) and register the CUDA kernels; the result is cached."""
    global _status
    if _status is None:
        _status = _try_load()
    return _status


def _try_load() -> KernelStatus:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return KernelStatus(False, f"disabled by {DISABLE_ENV}=0; the pure-torch reference ops are used")
    try:
        import torch
    except ImportError:
        return KernelStatus(False, "torch is not installed; install the 'train' extra to use the sdk ops")
    if not torch.cuda.is_available():
        return KernelStatus(
            False, "CUDA is not available (CPU-only torch or no GPU); the pure-torch reference ops are used"
        )
    if not sources():
        return KernelStatus(
            False, f"no CUDA sources in {_HERE} yet; the pure-torch reference ops run on CUDA tensors as well"
        )
    return KernelStatus(
        False,
        f"CUDA sources {[p.name for p in sources()]} exist but no build step is wired into lowra.cuda_kernels.load() "
        "yet; the pure-torch reference ops are used",
    )

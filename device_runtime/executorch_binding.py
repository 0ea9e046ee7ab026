"""The boundary with ExecuTorch's Python binding: its runtime, and lowra's native kernels registered into it.

Used by the ExecuTorch engine to run programs and by the exporter to check a kernel library before shipping it
(neither imports the other). ``executorch.runtime`` is imported on first use only: a device app on the C++
runtime, and every torch-free part of lowra, never loads it.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from lowra.device_runtime.errors import KernelLibraryError, LowraError
from lowra.device_runtime.formats.executorch_manifest import KERNEL_OPS

__all__ = ["executorch_runtime", "register_kernel_library"]

_loaded_libraries: dict[str, Any] = {}  # keeps each CDLL handle alive for the life of the process


def executorch_runtime() -> Any:
    """ExecuTorch's in-process ``Runtime`` singleton."""
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise LowraError(
            f"executorch is not importable ({exc}); the ExecuTorch engine needs `pip install executorch==1.5.1`"
        ) from exc
    return Runtime.get()


def register_kernel_library(path: str | Path) -> None:
    """Load lowra's native kernels into this process's ExecuTorch runtime (once; later calls are no-ops)."""
    path = Path(path)
    runtime = executorch_runtime()  # loads libexecutorch.so first, so the library registers into the same registry
    if all(op in runtime.operator_registry.operator_names for op in KERNEL_OPS):
        return  # registered already (same library loaded before, possibly from another path)
    if not path.is_file():
        raise KernelLibraryError(
            f"kernel library {path} does not exist; custom-op programs need lowra's ExecuTorch kernels. Build them "
            "with `python -m lowra.export.executorch.kernels` (and copy the .so next to the program), or export "
            "with ops='aten' for a stock runtime"
        )
    try:
        handle = ctypes.CDLL(str(path.resolve()), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise KernelLibraryError(f"cannot load kernel library {path}: {exc}") from exc
    _loaded_libraries[str(path.resolve())] = handle
    missing = [op for op in KERNEL_OPS if op not in runtime.operator_registry.operator_names]
    if missing:
        raise KernelLibraryError(f"{path} loaded but does not register {missing}; rebuild it from this lowra version")

"""ExecuTorch export: ``python -m lowra.export.executorch --help``.

:mod:`.exporter` writes the model folder (format: :mod:`lowra.device_runtime.formats.executorch_manifest`);
:mod:`.kernels` builds the native low-bit kernels (``python -m lowra.export.executorch.kernels``).
"""
from lowra.export.executorch.exporter import (
    AtenLowBitLinear,
    ExecutorchExportConfig,
    MergedLinear,
    SideBranchLinear,
    export_executorch,
    fix_empty_strides,
    load_kernel_library,
    main,
)

__all__ = [
    "AtenLowBitLinear",
    "ExecutorchExportConfig",
    "MergedLinear",
    "SideBranchLinear",
    "export_executorch",
    "fix_empty_strides",
    "load_kernel_library",
    "main",
]

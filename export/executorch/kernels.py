"""Build the native ExecuTorch kernel library of lowra's low-bit ops (``export/executorch/lowbit_kernels.cpp``).

One g++ line against the headers and ``libexecutorch.so`` the executorch wheel ships (no CMake: the wheel's
CMake config wants cmake >= 3.28), with lowra's low-bit CPU kernels (``device_runtime/native/kernels``) compiled
in. The result is cached under ``$LOWRA_CACHE/executorch_kernels/<hash>/`` where the hash covers the sources, the
compile command and the executorch version, so an edit or an upgrade rebuilds
and an unchanged tree reuses the library (~1 s to build, instant to reuse).

Documented one-liner (the tests run the same function)::

    python -m lowra.export.executorch.kernels        # prints the path of the built library

Nothing here imports torch: a device build script can call :func:`build_kernel_library` too.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import metadata
from pathlib import Path

from lowra.device_runtime import _files
from lowra.device_runtime.executorch_native import et_compile_flags, executorch_dir
from lowra.device_runtime.native_kernels import KERNEL_DIR as KERNEL_SOURCE_DIR
from lowra.device_runtime.native_kernels import KERNEL_INCLUDES

__all__ = ["KERNEL_SOURCE", "LIBRARY_NAME", "build_kernel_library", "compile_command", "executorch_dir"]

KERNEL_SOURCE = Path(__file__).parent / "lowbit_kernels.cpp"  # package data: ships with the wheel
LOWBIT_SOURCE = KERNEL_SOURCE_DIR / "lowbit_gemv.cpp"
LIBRARY_NAME = "liblowra_executorch_kernels.so"


def compile_command(source: Path, output: Path, et_dir: Path | None = None) -> list[str]:
    et = et_dir or executorch_dir()
    return [
        os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", *et_compile_flags(et),
        # lowra's low-bit CPU kernels (the same source liblowra and lowra.device_runtime.native_kernels build).
        f"-I{LOWBIT_SOURCE.parent}",
        str(source), str(LOWBIT_SOURCE), "-o", str(output), f"-L{et / 'lib'}", "-lexecutorch",
        f"-Wl,-rpath,{et / 'lib'}",
    ]  # fmt: skip


def build_kernel_library(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Compile the kernel library if its source hash is not cached yet; return the ``.so`` path."""
    et = executorch_dir()
    try:
        version = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    sources = (KERNEL_SOURCE, LOWBIT_SOURCE, *KERNEL_INCLUDES)
    source = b"".join(path.read_bytes() for path in sources)
    probe = compile_command(KERNEL_SOURCE, Path("OUT"), et)
    key = hashlib.sha256(source + "\0".join(probe).encode() + version.encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else _files.cache_dir("executorch_kernels", key)
    return _files.build_cached(folder / LIBRARY_NAME, lambda out: compile_command(KERNEL_SOURCE, out, et),
                               f"the lowra ExecuTorch kernels ({KERNEL_SOURCE.name})", force)


if __name__ == "__main__":
    print(build_kernel_library(force="--force" in sys.argv[1:]))

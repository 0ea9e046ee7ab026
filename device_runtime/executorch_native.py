"""ExecuTorch programs run through the C++ runtime (``native/program/program.cpp``, ``lowra_program.h``) by ctypes.

This replaces ExecuTorch's Python binding, whose module links libtorch: with this library the ExecuTorch engine, and
so every module of ``lowra.device_runtime``, runs without torch. What it needs from the ``executorch`` pip wheel is
its C++ headers and shared libraries only (``lib/libexecutorch.so`` and the optimized CPU kernels); the wheel's
Python package is located, never imported.

The library is built on first use with one ``g++`` call into ``$LOWRA_CACHE/executorch_program/<hash>/`` (the hash
covers the source, the command and the executorch version), through a temporary name and a rename, so a concurrent
or killed build never leaves half a library; an app builds the same source with CMake (``native/CMakeLists.txt``).
lowra's custom-op kernels (``lowra.export.executorch.kernels`` builds them) link the same ``libexecutorch.so`` and
register into the same operator table once loaded with :func:`register_kernel_library`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from lowra.device_runtime import _files
from lowra.device_runtime.errors import BaseNotFoundError, KernelLibraryError, LowraError, ProgramError
from lowra.device_runtime.formats.executorch_manifest import KERNEL_OPS

__all__ = ["NativeProgram", "build_program_library", "executorch_dir", "register_kernel_library"]

NATIVE_DIR = Path(__file__).parent / "native"
PROGRAM_SOURCE = NATIVE_DIR / "program" / "program.cpp"
PROGRAM_HEADERS = (NATIVE_DIR / "include" / "lowra_program.h", NATIVE_DIR / "include" / "lowra.h")
LIBRARY_NAME = "liblowra_program.so"
EXECUTORCH_ROOT_ENV = "LOWRA_EXECUTORCH_ROOT"
# lowra.h's lowra_status codes this binding tells apart.
_OK, _ERR_ARGUMENT, _ERR_NOT_FOUND, _ERR_PROGRAM, _ERR_KERNEL = 0, 1, 8, 12, 13

_loaded_kernel_libraries: dict[str, ctypes.CDLL] = {}  # keeps each handle alive for the life of the process


def executorch_dir() -> Path:
    """The ExecuTorch runtime to build against: ``$LOWRA_EXECUTORCH_ROOT`` (a folder with ``include/executorch`` and
    ``lib/libexecutorch.so``, as CMake's ``-DEXECUTORCH_ROOT``), else the executorch pip wheel on ``sys.path``. The
    wheel's Python package is never imported (it links libtorch), only its files are used."""
    env = os.environ.get(EXECUTORCH_ROOT_ENV)
    candidates = [Path(env)] if env else [Path(entry or ".") / "executorch" for entry in sys.path]
    for root in candidates:
        if (root / "lib" / "libexecutorch.so").is_file() and (root / "include" / "executorch").is_dir():
            return root.resolve()
    if env:
        raise KernelLibraryError(f"{EXECUTORCH_ROOT_ENV}={env} lacks lib/libexecutorch.so or include/executorch")
    raise KernelLibraryError(
        "no ExecuTorch runtime found: lowra runs ExecuTorch programs with the C++ runtime the executorch wheel ships "
        "(headers and libexecutorch.so). Install it with `pip install executorch==1.5.1` (the export extra) or set "
        f"{EXECUTORCH_ROOT_ENV} to a folder holding include/executorch and lib/libexecutorch.so"
    )


def et_compile_flags(et: Path) -> list[str]:
    """Flags every lowra source compiled against the wheel's headers needs: the two macros its libraries were built
    with (without them Half/BFloat16 and the event-tracer hooks compile to a different ABI) and its include paths."""
    return ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", f"-I{et / 'include'}",
            f"-I{et / 'include' / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}"]


def compile_command(output: Path, et: Path | None = None) -> list[str]:
    et = et or executorch_dir()
    lib = et / "lib"
    # --no-as-needed: the optimized kernels register themselves when loaded; nothing references them by symbol, so
    # the linker would otherwise drop them and every aten operator would be "missing".
    backends = [f"-l{name[3:-3]}" for name in ("libexecutorch_backend_xnnpack.so",) if (lib / name).is_file()]
    return [
        os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
        *et_compile_flags(et), f"-I{NATIVE_DIR / 'include'}", str(PROGRAM_SOURCE), "-o", str(output),
        f"-L{lib}", "-Wl,--no-as-needed", "-lexecutorch", "-lexecutorch_kernels_optimized", *backends,
        "-Wl,--as-needed", "-Wl,-Bsymbolic", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def build_program_library(force: bool = False) -> Path:
    """Compile the program runner unless this source, command and executorch version are cached; return the path."""
    et = executorch_dir()
    try:
        version = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = b"".join(p.read_bytes() for p in (PROGRAM_SOURCE, *PROGRAM_HEADERS))
    probe = compile_command(Path("OUT"), et)
    key = hashlib.sha256(source + "\0".join(probe).encode() + version.encode()).hexdigest()[:16]
    library = _files.cache_dir("executorch_program", key) / LIBRARY_NAME
    return _files.build_cached(library, lambda out: compile_command(out, et),
                               f"the lowra ExecuTorch program runner ({PROGRAM_SOURCE.name})", force)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    path = build_program_library()
    try:
        # RTLD_GLOBAL: libexecutorch.so (loaded with it) must be the one kernel libraries register into.
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise KernelLibraryError(f"cannot load {path}: {exc}; delete it to rebuild") from exc
    ptr, size, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    lib.lowra_program_last_error.restype = ctypes.c_char_p
    lib.lowra_program_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ptr)]
    lib.lowra_program_forward.argtypes = [ptr, ptr, size, i64, ptr, size, ctypes.POINTER(size)]
    lib.lowra_program_close.argtypes = [ptr]
    lib.lowra_program_close.restype = None
    lib.lowra_program_has_operator.argtypes = [ctypes.c_char_p]
    for name in ("lowra_program_open", "lowra_program_forward", "lowra_program_has_operator"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def has_operator(name: str) -> bool:
    """Whether the process's ExecuTorch runtime has a kernel for operator ``name``."""
    return bool(_library().lowra_program_has_operator(name.encode()))


def register_kernel_library(path: str | Path, required: Sequence[str] = KERNEL_OPS) -> None:
    """Load lowra's custom-op kernels into this process's ExecuTorch runtime (once; later calls are no-ops) and check
    that it registers the ``required`` operators (a folder's ``Manifest.kernel_ops``; default: all of this version's)."""
    path = Path(path)
    _library()  # libexecutorch.so first, so the kernels register into the table programs are run with
    if all(has_operator(op) for op in required):
        return  # registered already (the same library loaded before, possibly from another path)
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
    _loaded_kernel_libraries[str(path.resolve())] = handle
    missing = [op for op in required if not has_operator(op)]
    if missing:
        raise KernelLibraryError(f"{path} loaded but does not register {missing}; rebuild it from this lowra version")


class NativeProgram:
    """One loaded program + data file, its ``forward`` prepared: logits of ``n`` tokens at cache position ``start``.

    Not thread-safe (the engine serializes its calls)."""

    def __init__(self, program: str | Path, data: str | Path, vocab_size: int, logits_last: bool = False) -> None:
        lib = _library()
        handle = ctypes.c_void_p()
        status = lib.lowra_program_open(os.fsencode(program), os.fsencode(data), ctypes.byref(handle))
        if status != _OK:
            message = lib.lowra_program_last_error().decode("utf-8", "replace")
            error = {_ERR_KERNEL: KernelLibraryError, _ERR_NOT_FOUND: BaseNotFoundError}.get(status, ProgramError)
            raise error(message)
        self._handle: ctypes.c_void_p | None = handle
        self.vocab_size = int(vocab_size)
        self.logits_last = bool(logits_last)

    def forward(self, ids: np.ndarray, start: int) -> np.ndarray:
        """float32 logits of ``ids`` (int64) placed at cache positions ``start .. start + n - 1``: ``[n, vocab]``, or
        ``[1, vocab]`` (the last position's) for a program exported with ``logits="last"``."""
        if self._handle is None:
            raise LowraError("this program was closed")
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((1 if self.logits_last else ids.size, self.vocab_size), dtype=np.float32)
        vocab = ctypes.c_size_t()
        lib = _library()
        status = lib.lowra_program_forward(self._handle, ids.ctypes.data, ids.size, int(start), out.ctypes.data,
                                           out.size, ctypes.byref(vocab))
        if status != _OK:
            message = lib.lowra_program_last_error().decode("utf-8", "replace")
            if status == _ERR_ARGUMENT and vocab.value and vocab.value != self.vocab_size:
                message = (f"the program's vocabulary is {vocab.value}, its manifest says {self.vocab_size}: the "
                           "manifest does not belong to this program; re-export or copy the folder again")
            raise ProgramError(message)
        return out

    def close(self) -> None:
        if self._handle is not None:
            _library().lowra_program_close(self._handle)
            self._handle = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

"""lowra.cuda_kernels: CUDA implementations of the ``lowra::`` ops, built on demand.

The ops themselves (schemas, fake kernels, the pure-torch reference that runs everywhere) are defined once in
``lowra.sdk.quant.ops``; this package only *adds* CUDA kernels for the same schemas when it can build them. Nothing
here is required: when ``load()`` fails, every op keeps running through the reference implementation.

Order: the sdk defines the ``lowra::`` schemas first and only then calls :func:`load` (on the first op that sees a
CUDA tensor). This package never imports the sdk (the dependency points one way); ``load()`` called before the
schemas exist refuses with a falsy status that says so.

``load()`` never raises for an environment that cannot build (no GPU, CPU-only torch, no sources, no nvcc);
it returns a falsy :class:`KernelStatus` whose ``reason`` says why, so callers can log it once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowra.device_runtime._files import cache_dir

__all__ = ["DISABLE_ENV", "NAMESPACE", "OPS", "KernelStatus", "build_dir", "cuda_home", "load", "nvcc_path", "sources"]

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


_EXTENSION = "lowra_cuda_kernels"
# The op namespace and the ops the binding registers for CUDA (lowbit_ops.cpp, TORCH_LIBRARY_IMPL); the schemas
# come from lowra.sdk.quant.ops, and load() checks each one exists before building and landed after.
NAMESPACE = "lowra"
OPS = ("dequantize", "lowbit_linear", "lowbit_linear_grad_input", "quantize_codes")


def sources() -> list[Path]:
    """The CUDA / C++ sources shipped in this package (kernels in .cu, torch binding in .cpp)."""
    return sorted(p for p in _HERE.iterdir() if p.suffix in (".cu", ".cpp"))


def headers() -> list[Path]:
    return sorted(p for p in _HERE.iterdir() if p.suffix in (".cuh", ".h"))


def nvcc_path() -> str | None:
    """The nvcc that builds the kernels: $CUDA_HOME/bin/nvcc if set, else the one on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home() -> Path | None:
    """The CUDA toolkit root (with include/cuda_runtime.h): $CUDA_HOME, nvcc's own tree, or /usr/local/cuda.

    nvcc on PATH may be a wrapper script (it is on the CI machine), so its resolved folder is only one candidate.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc_path()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").is_file():
            return Path(candidate)
    return None


def build_dir(tag: str) -> Path:
    """Where one build is cached: one folder per (sources, torch, CUDA, GPU architecture) hash, so a changed kernel
    or a new torch never loads a stale library (under lowra's cache root, ``$LOWRA_CACHE``)."""
    return cache_dir("cuda_kernels", tag)


def _missing_schemas(torch: Any) -> list[str]:
    """The ``lowra::`` ops in :data:`OPS` that have no schema yet (the sdk defines them)."""
    missing = []
    for op in OPS:
        try:
            torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{op}", "")
        except RuntimeError:
            missing.append(op)
    return missing


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
        return KernelStatus(False, f"no CUDA sources in {_HERE}; the pure-torch reference ops are used")
    nvcc = nvcc_path()
    if nvcc is None:
        return KernelStatus(
            False, "nvcc not found (set CUDA_HOME or put nvcc on PATH); the pure-torch reference ops run on CUDA"
        )
    missing = _missing_schemas(torch)
    if missing:
        return KernelStatus(
            False, f"the {NAMESPACE}:: schemas of {missing} are not defined; import lowra.sdk.quant.ops (which defines "
            "them and calls load() on the first CUDA op) instead of calling load() first"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return KernelStatus(False, f"GPU compute capability {major}.{minor} < 8.0 (the WMMA bf16 kernels need sm_80+)")
    arch = f"{major}{minor}"
    digest = hashlib.sha256()
    for path in sources() + headers():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|sm_{arch}".encode())
    folder = build_dir(digest.hexdigest()[:16])
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for build in (_build_with_torch, _build_with_nvcc):
        try:
            build(torch, folder, nvcc, arch)
        except Exception as exc:  # noqa: BLE001  (any build failure means: try the next way, then report all)
            errors.append(f"{build.__name__}: {type(exc).__name__}: {str(exc)[-2000:]}")
            continue
        missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "CUDA")]
        if missing:
            return KernelStatus(False, f"built {folder} but no CUDA kernel registered for {missing}")
        return KernelStatus(True, f"CUDA kernels for sm_{arch} loaded from {folder} ({build.__name__})")
    return KernelStatus(False, "building the CUDA kernels failed; the pure-torch reference ops are used. " + " | ".join(errors))


def _build_with_torch(torch: object, build_dir: Path, nvcc: str, arch: str) -> None:
    """torch.utils.cpp_extension.load (needs ninja), for this GPU's architecture only (a fat build is 3x slower)."""
    from torch.utils import cpp_extension

    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
    try:
        cpp_extension.load(
            name=_EXTENSION,
            sources=[str(p) for p in sources()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _build_with_nvcc(torch: object, build_dir: Path, nvcc: str, arch: str) -> None:
    """The same library without ninja: nvcc for the kernels, the host compiler for the binding, then one link.

    The kernels include no torch header (lowbit_kernels.cuh), so only the binding needs torch's flags.
    """
    import sysconfig

    from torch.utils import cpp_extension

    library = build_dir / f"{_EXTENSION}_direct.so"
    if not library.is_file():
        home = cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit headers found (set CUDA_HOME to the folder holding include/cuda_runtime.h)")
        cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{home / 'include'}", f"-I{_HERE}"]
        objects = []
        for src in sources():
            obj = build_dir / f"{src.stem}.o"
            if src.suffix == ".cu":
                cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{_HERE}"]
            else:
                cmd = [cxx, "-c", str(src), "-o", str(obj), "-O2", "-fPIC", "-std=c++20", abi, *includes]
            _run(cmd)
            objects.append(str(obj))
        torch_lib = Path(torch.__file__).resolve().parent / "lib"
        lib_dirs = [torch_lib] + [d for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib") if d.is_dir()]
        tmp = library.with_suffix(f".{os.getpid()}.tmp")
        _run([cxx, "-shared", "-o", str(tmp), *objects, *[f"-L{d}" for d in lib_dirs],
              *[f"-Wl,-rpath,{d}" for d in lib_dirs], "-lc10", "-lc10_cuda", "-ltorch_cpu", "-ltorch_cuda",
              "-lcudart", f"-L{sysconfig.get_config_var('LIBDIR')}"])
        os.replace(tmp, library)  # atomic: a crash never leaves a half-written library under the final name
    torch.ops.load_library(str(library))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")

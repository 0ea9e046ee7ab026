"""numpy + ctypes binding of lowra's low-bit CPU kernels (``device_runtime/native/kernels/lowbit_gemv.cpp``).

The kernels multiply straight from a :class:`QuantizedWeight`'s packed rows (lookup tables over bit-planes for 1-
and 2-bit rows, an in-register decode for 4-bit rows; see the source's header comment). liblowra compiles the same
source; this binding exists so Python tests and benchmarks can hold the kernels against the numpy reference.

The library is built on first use with one ``g++`` call into ``$LOWRA_CACHE/native/<hash>/`` (the hash covers the
sources and the command, so an edit rebuilds), through a temporary name and a rename, so a concurrent or killed
build never leaves a half-written ``.so``. No torch, no CMake. AVX2 is chosen at run time, not at compile time, so
the cached library also runs on a CPU without it (scalar path).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from lowra.device_runtime import _files
from lowra.device_runtime.errors import ConfigError, KernelLibraryError
from lowra.device_runtime.formats.int8_rows import Q8_BLOCK
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

__all__ = ["ISAS", "KERNEL_SOURCE", "LAYOUTS", "PackedLinear", "attention", "build_library", "f16_gemm",
           "isa_available", "load_library", "lowrank4_add", "lowrank_add", "q8_gemm"]

KERNEL_DIR = Path(__file__).parent / "native" / "kernels"
KERNEL_SOURCE = KERNEL_DIR / "lowbit_gemv.cpp"
KERNEL_HEADER = KERNEL_DIR / "lowbit_gemv.h"
KERNEL_INCLUDES = (KERNEL_HEADER, KERNEL_DIR / "lowbit_lut.inc")  # what the source includes (part of the cache key)
LIBRARY_NAME = "liblowra_lowbit.so"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}  # lowra_lowbit_isa
LAYOUTS = {"rows": 0, "blocked": 1}  # lowra_lowbit_layout


class _Layer(ctypes.Structure):
    """``lowra_lowbit_layer`` (lowbit_gemv.h): pointers into the arrays a :class:`PackedLinear` keeps alive."""

    _fields_ = [
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("widths", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("codebooks", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("layout", ctypes.c_int64),
    ]


def compile_command(output: Path) -> list[str]:
    return [
        os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-fPIC", "-shared", "-pthread",
        str(KERNEL_SOURCE), "-o", str(output),
    ]  # fmt: skip


def build_library(force: bool = False) -> Path:
    """Compile the kernel library unless this source and command are cached already; return the ``.so`` path."""
    probe = compile_command(Path("OUT"))
    included = b"".join(path.read_bytes() for path in KERNEL_INCLUDES)
    digest = hashlib.sha256(KERNEL_SOURCE.read_bytes() + included + "\0".join(probe).encode())
    library = _files.cache_dir("native", digest.hexdigest()[:16]) / LIBRARY_NAME
    return _files.build_cached(library, compile_command, f"the lowra low-bit kernels ({KERNEL_SOURCE.name})", force)


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """The built library with its C signatures declared (built on the first call of the process)."""
    path = build_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelLibraryError(f"cannot load {path}: {exc}; delete it to rebuild") from exc
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lowra_lowbit_repack.argtypes = [i64, i64, ptr, ptr]
    lib.lowra_lowbit_block.argtypes = [i64, i64, ptr, ptr, ptr]
    lib.lowra_lowbit_plan_create.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(ptr)]
    lib.lowra_lowbit_plan_destroy.argtypes = [ptr]
    lib.lowra_lowbit_plan_destroy.restype = None
    lib.lowra_lowbit_plan_gemv.argtypes = [ptr, ctypes.POINTER(_Layer), ptr, ptr, c_int, c_int]
    lib.lowra_lowbit_plan_gemm.argtypes = [ptr, ctypes.POINTER(_Layer), ptr, i64, ptr, c_int, c_int]
    lib.lowra_lowbit_gemv.argtypes = [ctypes.POINTER(_Layer), ptr, ptr, c_int, c_int]
    lib.lowra_lowbit_gemm.argtypes = [ctypes.POINTER(_Layer), ptr, i64, ptr, c_int, c_int]
    lib.lowra_f16_gemm.argtypes = [ptr, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.lowra_q8_gemm.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.lowra_lowrank_add.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.lowra_lowrank_add_f16.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.lowra_lowrank4_add.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.lowra_attention.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, c_int,
                                    ctypes.c_float, ptr, c_int, c_int]
    lib.lowra_lowbit_isa_available.argtypes = [c_int]
    lib.lowra_lowbit_status_name.argtypes = [c_int]
    lib.lowra_lowbit_status_name.restype = ctypes.c_char_p
    for name in ("lowra_lowbit_repack", "lowra_lowbit_block", "lowra_lowbit_plan_create", "lowra_lowbit_plan_gemv",
                 "lowra_lowbit_plan_gemm", "lowra_lowbit_gemv", "lowra_lowbit_gemm", "lowra_f16_gemm", "lowra_q8_gemm",
                 "lowra_lowrank_add", "lowra_lowrank_add_f16", "lowra_lowrank4_add", "lowra_attention", "lowra_lowbit_isa_available"):
        getattr(lib, name).restype = c_int
    return lib


def isa_available(isa: str) -> bool:
    """Whether this CPU (and build) runs the kernels' ``isa`` path: ``"auto"``, ``"scalar"`` or ``"avx2"``."""
    return bool(load_library().lowra_lowbit_isa_available(_isa_code(isa)))


def _isa_code(isa: str) -> int:
    if isa not in ISAS:
        raise ConfigError(f"isa {isa!r} is unknown; expected one of {sorted(ISAS)}")
    return ISAS[isa]


def _check(status: int, what: str) -> None:
    if status != 0:
        name = load_library().lowra_lowbit_status_name(status).decode()
        raise KernelLibraryError(f"{what} failed: {name} (status {status})")


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


class PackedLinear:
    """A quantized linear layer multiplied by the native kernels without expanding its weight.

    The codes are copied once and repacked into the kernels' layout (same size: 2-bit rows become bit-planar within
    each byte), then, with ``layout="blocked"`` (the default, what exported programs store), reordered so each layer
    is read as one sequential stream (``lowra_lowbit_block``); ``layout="rows"`` keeps the rows in the file's order.
    The caller's :class:`QuantizedWeight` is left as it is.
    """

    def __init__(self, weight: QuantizedWeight, layout: str = "blocked") -> None:
        if layout not in LAYOUTS:
            raise ConfigError(f"layout {layout!r} is unknown; expected one of {sorted(LAYOUTS)}")
        weight.validate("packed linear")
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self._widths = np.ascontiguousarray(weight.widths, dtype=np.uint8)
        self._codes = np.array(weight.codes, dtype=np.uint8, copy=True)
        self._codebooks = np.ascontiguousarray(weight.codebooks).view(np.uint16)
        self._scales = np.ascontiguousarray(weight.scales).view(np.uint16).reshape(-1)
        lib = load_library()
        _check(lib.lowra_lowbit_repack(self.out_features, self.in_features, _pointer(self._widths),
                                       _pointer(self._codes)), "repacking the codes")  # fmt: skip
        if layout == "blocked":
            rows, self._codes = self._codes, np.empty_like(self._codes)
            _check(lib.lowra_lowbit_block(self.out_features, self.in_features, _pointer(self._widths), _pointer(rows),
                                          _pointer(self._codes)), "blocking the codes")  # fmt: skip
        self.layout = layout
        self._layer = _Layer(
            self.out_features, self.in_features, weight.group_size, _pointer(self._widths), _pointer(self._codes),
            _pointer(self._codebooks), _pointer(self._scales) if self._scales.size else None, LAYOUTS[layout],
        )  # fmt: skip
        plan = ctypes.c_void_p()
        _check(lib.lowra_lowbit_plan_create(ctypes.byref(self._layer), ctypes.byref(plan)), "planning the products")
        self._plan = plan

    def __del__(self) -> None:
        plan = getattr(self, "_plan", None)
        if plan:
            load_library().lowra_lowbit_plan_destroy(plan)

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read per product: codes, codebooks, scales and widths (the file's layer, exactly)."""
        return int(self._codes.nbytes + self._codebooks.nbytes + self._scales.nbytes + self._widths.nbytes)

    def gemv(self, x: np.ndarray, threads: int = 1, isa: str = "auto") -> np.ndarray:
        """``W @ x`` for one float32 input vector ``x`` [in_features] -> [out_features]."""
        x = self._inputs(x, 1)
        y = np.empty(self.out_features, dtype=np.float32)
        status = load_library().lowra_lowbit_plan_gemv(self._plan, ctypes.byref(self._layer), _pointer(x), _pointer(y),
                                                       self._threads(threads), _isa_code(isa))  # fmt: skip
        _check(status, "lowra_lowbit_plan_gemv")
        return y

    def gemm(self, x: np.ndarray, threads: int = 1, isa: str = "auto") -> np.ndarray:
        """``x @ W.T`` for float32 inputs ``x`` [n_tokens, in_features] -> [n_tokens, out_features] (prefill)."""
        x = self._inputs(x, 2)
        y = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        status = load_library().lowra_lowbit_plan_gemm(self._plan, ctypes.byref(self._layer), _pointer(x), x.shape[0],
                                                       _pointer(y), self._threads(threads), _isa_code(isa))  # fmt: skip
        _check(status, "lowra_lowbit_plan_gemm")
        return y

    def _inputs(self, x: np.ndarray, ndim: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != ndim or x.shape[-1] != self.in_features:
            expected = "[in_features]" if ndim == 1 else "[n_tokens, in_features]"
            raise ConfigError(f"input has shape {list(x.shape)}, expected {expected} with in_features={self.in_features}")
        return x

    @staticmethod
    def _threads(threads: int) -> int:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        return threads


def f16_gemm(weight: np.ndarray, x: np.ndarray, threads: int = 1, isa: str = "auto") -> np.ndarray:
    """``x @ weight.T`` for a float16 ``weight`` [out, in] and float32 ``x`` [n_tokens, in] -> float32 [n_tokens, out].

    The kernel of a model folder's float16 embedding/head (``lowra_f16_gemm``): the weight is converted in registers,
    never copied to float32; float32 sums in a fixed order per row (any thread count gives the same bits).
    """
    weight = np.asarray(weight)
    if weight.dtype != np.float16 or weight.ndim != 2:
        raise ConfigError(
            f"weight is {weight.dtype} with shape {list(weight.shape)}; expected a float16 [out, in] matrix")
    weight = np.ascontiguousarray(weight)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != weight.shape[1] or x.shape[0] < 1:
        raise ConfigError(f"input has shape {list(x.shape)}, expected [n_tokens >= 1, {weight.shape[1]}]")
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    status = load_library().lowra_f16_gemm(_pointer(weight), weight.shape[0], weight.shape[1], _pointer(x), x.shape[0],
                                           _pointer(y), PackedLinear._threads(threads), _isa_code(isa))
    _check(status, "lowra_f16_gemm")
    return y


def q8_gemm(codes: np.ndarray, scales: np.ndarray, x: np.ndarray, threads: int = 1, isa: str = "auto") -> np.ndarray:
    """``x @ W.T`` for 8-bit rows ``W`` (:mod:`lowra.device_runtime.formats.int8_rows`: int8 ``codes`` [out, in],
    float16 ``scales`` [out, in / 32]) and float32 ``x`` [n_tokens, in] -> float32 [n_tokens, out].

    The kernel of a model folder's 8-bit embedding/head (``lowra_q8_gemm``): codes converted in registers, float32
    sums in a fixed order per row (any thread count gives the same bits).
    """
    codes, scales = np.asarray(codes), np.asarray(scales)
    if (codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] % Q8_BLOCK or scales.dtype != np.float16
            or scales.shape != (codes.shape[0], codes.shape[1] // Q8_BLOCK)):
        raise ConfigError(f"codes {codes.dtype} {list(codes.shape)} / scales {scales.dtype} {list(scales.shape)}; "
                          f"expected int8 [out, in] (in a multiple of {Q8_BLOCK}) and float16 [out, in / {Q8_BLOCK}]")
    codes, scales = np.ascontiguousarray(codes), np.ascontiguousarray(scales)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != codes.shape[1] or x.shape[0] < 1:
        raise ConfigError(f"input has shape {list(x.shape)}, expected [n_tokens >= 1, {codes.shape[1]}]")
    y = np.empty((x.shape[0], codes.shape[0]), dtype=np.float32)
    status = load_library().lowra_q8_gemm(_pointer(codes), _pointer(scales), codes.shape[0], codes.shape[1],
                                          _pointer(x), x.shape[0], _pointer(y), PackedLinear._threads(threads),
                                          _isa_code(isa))  # fmt: skip
    _check(status, "lowra_q8_gemm")
    return y


def lowrank_add(down: np.ndarray, up: np.ndarray, x: np.ndarray, y: np.ndarray, threads: int = 1,
                isa: str = "auto") -> np.ndarray:
    """``y += (x @ down.T) @ up.T`` in place for factors ``down`` [rank, in], ``up`` [out, rank] (both float32 or both
    float16), ``x`` [n_tokens, in] and ``y`` [n_tokens, out] float32; returns ``y``.

    The kernel of a user's side branch in an exported program (``lowra_lowrank_add``, ``lowra_lowrank_add_f16``): a
    fixed order of additions (scalar and AVX2 give the same bits; float16 factors the bits of the same values in
    float32); a token whose ``x @ down.T`` is all zeros (no user: zero factors) is left as it is.
    """
    half = np.asarray(down).dtype == np.float16 and np.asarray(up).dtype == np.float16
    dtype = np.float16 if half else np.float32
    down, up = np.ascontiguousarray(down, dtype=dtype), np.ascontiguousarray(up, dtype=dtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or 0 in down.shape + up.shape:
        raise ConfigError(f"factors down {list(down.shape)} / up {list(up.shape)}; expected [rank, in] and [out, rank]")
    rank, inputs = down.shape
    if x.ndim != 2 or x.shape[1] != inputs or x.shape[0] < 1:
        raise ConfigError(f"input has shape {list(x.shape)}, expected [n_tokens >= 1, {inputs}]")
    if (not isinstance(y, np.ndarray) or y.dtype != np.float32 or not y.flags.c_contiguous
            or y.shape != (x.shape[0], up.shape[0])):
        raise ConfigError(f"output must be a C-contiguous float32 array of shape [{x.shape[0]}, {up.shape[0]}]")
    name = "lowra_lowrank_add_f16" if half else "lowra_lowrank_add"
    status = getattr(load_library(), name)(_pointer(down), _pointer(up), rank, inputs, up.shape[0], _pointer(x),
                                           x.shape[0], _pointer(y), PackedLinear._threads(threads),
                                           _isa_code(isa))  # fmt: skip
    _check(status, name)
    return y


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None, scale: float = 1.0,
              causal: bool = False, threads: int = 1, isa: str = "auto") -> np.ndarray:
    """``softmax(scale * q @ k^T + mask) @ v`` for float32 ``q`` [B, H, Q, D] and ``k`` = ``v`` [B, KV, S, D] (H a
    multiple of KV) -> float32 [B, Q, H, D] (``lowra_attention``, the kernel of ``lowra::attention``).

    ``mask``: bool (False = masked) or float32 (added; -inf = masked) [1|B, 1|H, Q, S]; without one, ``causal``
    masks key j > query i. A query whose keys are all masked gets zeros.
    """
    q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
    if (q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]
            or q.shape[1] % k.shape[1]):
        raise ConfigError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; expected q [B, H, Q, D] and "
                          "k = v [B, KV, S, D] with H a multiple of KV")
    (batch, heads, queries, dim), (kv_heads, keys) = q.shape, k.shape[1:3]
    keep = add = None
    mask_b = mask_h = 0
    if mask is not None:
        mask = np.asarray(mask)
        if (mask.ndim != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)
                or mask.shape[2:] != (queries, keys) or mask.dtype not in (np.bool_, np.float32)):
            raise ConfigError(f"mask is {mask.dtype} {list(mask.shape)}; expected bool or float32 "
                              f"[1|{batch}, 1|{heads}, {queries}, {keys}]")
        mask = np.ascontiguousarray(mask)
        keep, add = (mask.view(np.uint8), None) if mask.dtype == np.bool_ else (None, mask)
        mask_h = 0 if mask.shape[1] == 1 else queries * keys
        mask_b = 0 if mask.shape[0] == 1 else mask.shape[1] * queries * keys
    out = np.empty((batch, queries, heads, dim), dtype=np.float32)
    status = load_library().lowra_attention(
        _pointer(q), _pointer(k), _pointer(v), batch, heads, queries, dim, kv_heads, keys,
        None if keep is None else _pointer(keep), None if add is None else _pointer(add), mask_b, mask_h, int(causal),
        scale, _pointer(out), PackedLinear._threads(threads), _isa_code(isa))  # fmt: skip
    _check(status, "lowra_attention")
    return out


def lowrank4_add(down_codes: np.ndarray, down_books: np.ndarray, up_codes: np.ndarray, up_books: np.ndarray,
                 x: np.ndarray, y: np.ndarray, threads: int = 1, isa: str = "auto") -> np.ndarray:
    """:func:`lowrank_add` with the factors as 4-bit codes (``lowra_lowrank4_add``): ``down_codes`` uint8 [rank,
    ceil(in / 2)] and ``down_books`` float16 [rank, 16] (down row k = books[k][code]), ``up_codes`` uint8 [rank,
    ceil(out / 2)] and ``up_books`` float16 [rank, 16] (up column k), two codes per byte, the even one in the low
    nibble. The same bits as :func:`lowrank_add` on the decoded factors."""
    down_codes, up_codes = (np.ascontiguousarray(c) for c in (down_codes, up_codes))
    down_books, up_books = (np.ascontiguousarray(b) for b in (down_books, up_books))
    x = np.ascontiguousarray(x, dtype=np.float32)
    rank = down_codes.shape[0] if down_codes.ndim == 2 else -1
    if (down_codes.dtype != np.uint8 or up_codes.dtype != np.uint8 or down_books.dtype != np.float16
            or up_books.dtype != np.float16 or up_codes.ndim != 2 or up_codes.shape[0] != rank
            or down_books.shape != (rank, 16) or up_books.shape != (rank, 16) or rank < 1):
        raise ConfigError(f"packed factors {down_codes.dtype} {list(down_codes.shape)} / {down_books.dtype} "
                          f"{list(down_books.shape)} / {up_codes.dtype} {list(up_codes.shape)} / {up_books.dtype} "
                          f"{list(up_books.shape)}; expected uint8 codes [rank, bytes] and float16 books [rank, 16]")
    if x.ndim != 2 or x.shape[0] < 1 or -(-x.shape[1] // 2) != down_codes.shape[1]:
        raise ConfigError(f"input has shape {list(x.shape)}, expected [n_tokens >= 1, in] with ceil(in / 2) = "
                          f"{down_codes.shape[1]}")
    out = y.shape[1] if isinstance(y, np.ndarray) and y.ndim == 2 else -1
    if (not isinstance(y, np.ndarray) or y.dtype != np.float32 or not y.flags.c_contiguous or y.shape[0] != x.shape[0]
            or -(-out // 2) != up_codes.shape[1]):
        raise ConfigError(f"output must be a C-contiguous float32 [{x.shape[0]}, out] array with ceil(out / 2) = "
                          f"{up_codes.shape[1]}")
    status = load_library().lowra_lowrank4_add(
        _pointer(down_codes), _pointer(down_books), _pointer(up_codes), _pointer(up_books), rank, x.shape[1], out,
        _pointer(x), x.shape[0], _pointer(y), PackedLinear._threads(threads), _isa_code(isa))  # fmt: skip
    _check(status, "lowra_lowrank4_add")
    return y

"""Test helpers for liblowra: build the CMake project, and a ctypes binding that raises the Python runtime's errors.

The binding maps each lowra_status to the lowra error class it mirrors, so a test asserts "the native reader refuses
this file with the same error kind as the numpy reader" as ``type(native_error) is type(python_error)``.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from lowra.device_runtime.errors import (
    BaseMismatchError,
    BaseNotFoundError,
    BlobContentError,
    BlobError,
    BlobTruncatedError,
    ChecksumMismatchError,
    DecryptionKeyError,
    ExpiredFileError,
    ForgedSignatureError,
    KernelLibraryError,
    LowraError,
    PayloadTamperedError,
    ProgramError,
    ReplayedFileError,
    RevokedKeyError,
    UnsignedFileError,
    UnsupportedFormatError,
    UntrustedKeyError,
    WrongRecipientError,
)

NATIVE_DIR = Path(__file__).resolve().parents[3] / "device_runtime" / "native"

# lowra_status (include/lowra.h) -> the Python error class of the same kind.
ERRORS: dict[int, type[Exception]] = {
    1: ValueError,
    2: BlobError,
    3: BlobTruncatedError,
    4: ChecksumMismatchError,
    5: UnsupportedFormatError,
    6: BlobContentError,
    7: BaseMismatchError,
    8: BaseNotFoundError,
    9: OSError,
    10: LowraError,
    11: RuntimeError,
    12: ProgramError,
    13: KernelLibraryError,
    14: ForgedSignatureError,
    15: UntrustedKeyError,
    16: RevokedKeyError,
    17: UnsignedFileError,
    18: ExpiredFileError,
    19: ReplayedFileError,
    20: WrongRecipientError,
    21: DecryptionKeyError,
    22: PayloadTamperedError,
}


def missing_toolchain() -> str | None:
    """Why the CMake project cannot be built here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/include/openssl/evp.h").is_file():
        return "OpenSSL 3 headers (libssl-dev) are not installed"
    return None


def build(build_dir: Path) -> Path:
    """Configure and build the CMake project (Release, both cores) into ``build_dir``; returns it."""
    subprocess.run(["cmake", "-S", str(NATIVE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "2"], check=True, capture_output=True, text=True)
    return build_dir


class UserInfo(ctypes.Structure):
    _fields_ = [
        ("adapter_id", ctypes.c_char_p),
        ("base_fingerprint", ctypes.c_char_p),
        ("n_modules", ctypes.c_size_t),
        ("file_bytes", ctypes.c_size_t),
        ("effective_bits", ctypes.c_double),
        ("load_ms", ctypes.c_double),
        ("apply_ms", ctypes.c_double),
    ]


class Liblowra:
    """The C ABI through ctypes, one base handle at a time (``open`` returns it, ``close`` frees it)."""

    def __init__(self, library: Path):
        lib = self.lib = ctypes.CDLL(str(library))
        handle, size = ctypes.c_void_p, ctypes.c_size_t
        lib.lowra_last_error.restype = ctypes.c_char_p
        lib.lowra_base_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(handle)]
        lib.lowra_base_close.argtypes = [handle]
        lib.lowra_base_close.restype = None
        lib.lowra_base_fingerprint.argtypes = [handle, ctypes.POINTER(ctypes.c_char_p), size, ctypes.c_char_p, size]
        lib.lowra_user_load.argtypes = [handle, ctypes.c_char_p, size, ctypes.POINTER(UserInfo)]
        lib.lowra_user_unload.argtypes = [handle]
        lib.lowra_user_current.argtypes = [handle, ctypes.POINTER(UserInfo)]
        lib.lowra_weight.argtypes = [handle, ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
                                     ctypes.POINTER(ctypes.c_int64), size, ctypes.POINTER(size)]
        lib.lowra_weight_digest.argtypes = [handle, ctypes.c_char_p, ctypes.c_char_p, size]
        lib.lowra_tensor_count.argtypes = [handle]
        lib.lowra_tensor_count.restype = size
        lib.lowra_tensor_name.argtypes = [handle, size]
        lib.lowra_tensor_name.restype = ctypes.c_char_p
        lib.lowra_base_open_trusted.argtypes = [ctypes.c_char_p, handle, ctypes.POINTER(handle)]
        lib.lowra_user_load_signed.argtypes = [handle, ctypes.c_char_p, size, ctypes.c_char_p, ctypes.c_char_p, size,
                                               ctypes.POINTER(UserInfo)]
        lib.lowra_trust_new.argtypes = [ctypes.POINTER(handle)]
        lib.lowra_trust_free.argtypes = [handle]
        lib.lowra_trust_free.restype = None
        lib.lowra_trust_pin_key.argtypes = [handle, ctypes.c_char_p, size, ctypes.c_char_p, size]
        lib.lowra_trust_revoke.argtypes = [handle, ctypes.c_char_p, size]
        lib.lowra_trust_allow_unsigned.argtypes = [handle, ctypes.c_int]
        lib.lowra_trust_set_device.argtypes = [handle, ctypes.c_char_p]
        lib.lowra_trust_set_sequence_file.argtypes = [handle, ctypes.c_char_p]
        lib.lowra_trust_set_time.argtypes = [handle, ctypes.c_int64]

    def _check(self, status: int) -> None:
        if status != 0:
            raise ERRORS[status](self.lib.lowra_last_error().decode("utf-8", "replace"))

    def open(self, path: str | Path, trust: "Trust | None" = None) -> ctypes.c_void_p:
        base = ctypes.c_void_p()
        if trust is None:
            self._check(self.lib.lowra_base_open(str(path).encode(), ctypes.byref(base)))
        else:
            self._check(self.lib.lowra_base_open_trusted(str(path).encode(), trust.handle, ctypes.byref(base)))
        return base

    def close(self, base: ctypes.c_void_p) -> None:
        self.lib.lowra_base_close(base)

    def fingerprint(self, base: ctypes.c_void_p, modules: list[str]) -> str:
        names = (ctypes.c_char_p * len(modules))(*[m.encode() for m in modules])
        out = ctypes.create_string_buffer(72)
        self._check(self.lib.lowra_base_fingerprint(base, names, len(modules), out, 72))
        return out.value.decode()

    def load(self, base: ctypes.c_void_p, blob: bytes, user_id: str | None = None,
             decryption_key: bytes | None = None) -> UserInfo:
        info = UserInfo()
        if user_id is None and decryption_key is None:
            self._check(self.lib.lowra_user_load(base, blob, len(blob), ctypes.byref(info)))
        else:
            self._check(self.lib.lowra_user_load_signed(
                base, blob, len(blob), None if user_id is None else user_id.encode(), decryption_key,
                len(decryption_key or b""), ctypes.byref(info)))
        return info

    def trust(self, keys=(), revocations: bytes | None = None, allow_unsigned: int = -1, device_id: str | None = None,
              sequence_file: Path | None = None, now: float | None = None) -> "Trust":
        """A lowra_trust handle configured like TrustPolicy(trusted_keys=keys, ...); keys are raw or PEM bytes."""
        return Trust(self, keys, revocations, allow_unsigned, device_id, sequence_file, now)

    def unload(self, base: ctypes.c_void_p) -> None:
        self._check(self.lib.lowra_user_unload(base))

    def weight(self, base: ctypes.c_void_p, name: str) -> np.ndarray:
        """A copy of the tensor as the model sees it now."""
        data = ctypes.POINTER(ctypes.c_float)()
        shape = (ctypes.c_int64 * 8)()
        ndim = ctypes.c_size_t()
        self._check(self.lib.lowra_weight(base, name.encode(), ctypes.byref(data), shape, 8, ctypes.byref(ndim)))
        dims = tuple(shape[: ndim.value])
        count = int(np.prod(dims)) if dims else 1
        return np.ctypeslib.as_array(data, (count,)).copy().reshape(dims)

    def digest(self, base: ctypes.c_void_p, name: str) -> str:
        out = ctypes.create_string_buffer(65)
        self._check(self.lib.lowra_weight_digest(base, name.encode(), out, 65))
        return out.value.decode()

    def tensor_names(self, base: ctypes.c_void_p) -> list[str]:
        return [self.lib.lowra_tensor_name(base, i).decode() for i in range(self.lib.lowra_tensor_count(base))]


class Trust:
    """A lowra_trust handle (freed with the object)."""

    def __init__(self, native: Liblowra, keys, revocations, allow_unsigned, device_id, sequence_file, now):
        self.native, lib = native, native.lib
        self.handle = ctypes.c_void_p()
        native._check(lib.lowra_trust_new(ctypes.byref(self.handle)))
        self.key_ids = []
        for key in keys:
            out = ctypes.create_string_buffer(33)
            native._check(lib.lowra_trust_pin_key(self.handle, key, len(key), out, 33))
            self.key_ids.append(out.value.decode())
        if revocations is not None:
            native._check(lib.lowra_trust_revoke(self.handle, revocations, len(revocations)))
        native._check(lib.lowra_trust_allow_unsigned(self.handle, allow_unsigned))
        native._check(lib.lowra_trust_set_device(self.handle, None if device_id is None else device_id.encode()))
        if sequence_file is not None:
            native._check(lib.lowra_trust_set_sequence_file(self.handle, str(sequence_file).encode()))
        if now is not None:
            native._check(lib.lowra_trust_set_time(self.handle, int(now)))

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.native.lib.lowra_trust_free(self.handle)


class Model:
    """liblowra_program's model-folder API (include/lowra_model.h) through ctypes, one handle per instance."""

    def __init__(self, library: Path, folder: Path, mode: str = "side", verify: bool = True):
        lib = self.lib = ctypes.CDLL(str(library))
        handle, size = ctypes.c_void_p, ctypes.c_size_t
        i64p = ctypes.POINTER(ctypes.c_int64)
        lib.lowra_program_last_error.restype = ctypes.c_char_p
        lib.lowra_model_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(handle)]
        lib.lowra_model_close.argtypes = [handle]
        lib.lowra_model_close.restype = None
        lib.lowra_model_user_load.argtypes = [handle, ctypes.c_char_p, size, ctypes.POINTER(UserInfo)]
        lib.lowra_model_user_unload.argtypes = [handle]
        lib.lowra_model_forward.argtypes = [handle, i64p, size, ctypes.c_int64, ctypes.POINTER(ctypes.c_float), size,
                                            ctypes.POINTER(size)]
        lib.lowra_model_generate.argtypes = [handle, i64p, size, size, i64p, size, i64p, ctypes.POINTER(size)]
        lib.lowra_model_vocab_size.argtypes = [handle]
        lib.lowra_model_vocab_size.restype = size
        lib.lowra_model_set_trust.argtypes = [handle, handle]
        lib.lowra_model_user_load_signed.argtypes = [handle, ctypes.c_char_p, size, ctypes.c_char_p, ctypes.c_char_p,
                                                     size, ctypes.POINTER(UserInfo)]
        self.handle = handle()
        self._check(lib.lowra_model_open(str(folder).encode(), mode.encode(), int(verify), ctypes.byref(self.handle)))
        self.vocab = lib.lowra_model_vocab_size(self.handle)
        self.logits_last = json.loads((Path(folder) / "manifest.json").read_text()).get("logits", "all") == "last"

    def _check(self, status: int) -> None:
        if status != 0:
            raise ERRORS[status](self.lib.lowra_program_last_error().decode("utf-8", "replace"))

    def load(self, blob: bytes, user_id: str | None = None, decryption_key: bytes | None = None) -> UserInfo:
        info = UserInfo()
        if user_id is None and decryption_key is None:
            self._check(self.lib.lowra_model_user_load(self.handle, blob, len(blob), ctypes.byref(info)))
        else:
            self._check(self.lib.lowra_model_user_load_signed(
                self.handle, blob, len(blob), None if user_id is None else user_id.encode(), decryption_key,
                len(decryption_key or b""), ctypes.byref(info)))
        return info

    def set_trust(self, trust: Trust) -> None:
        self._check(self.lib.lowra_model_set_trust(self.handle, trust.handle))

    def unload(self) -> None:
        self._check(self.lib.lowra_model_user_unload(self.handle))

    def forward(self, ids: np.ndarray, start: int) -> np.ndarray:
        """What lowra_model_forward writes: a row per token, or the last token's row (a "last" logits program)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((1 if self.logits_last else ids.size, self.vocab), dtype=np.float32)
        vocab = ctypes.c_size_t()
        i64p, fp = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)
        self._check(self.lib.lowra_model_forward(self.handle, ids.ctypes.data_as(i64p), ids.size, start,
                                                 out.ctypes.data_as(fp), out.size, ctypes.byref(vocab)))
        return out

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits, token by token for a "last" program (as ExecutorchEngine.logits does)."""
        if self.logits_last:
            return np.concatenate([self.forward(ids[i : i + 1], i) for i in range(len(ids))])
        return self.forward(ids, 0)

    def generate(self, ids: np.ndarray, max_new: int) -> list[int]:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.zeros(max_new, dtype=np.int64)
        n_out = ctypes.c_size_t()
        i64p = ctypes.POINTER(ctypes.c_int64)
        self._check(self.lib.lowra_model_generate(self.handle, ids.ctypes.data_as(i64p), ids.size, max_new, None, 0,
                                                  out.ctypes.data_as(i64p), ctypes.byref(n_out)))
        return out[: n_out.value].tolist()

    def close(self) -> None:
        self.lib.lowra_model_close(self.handle)

"""ExecuTorch engine: run an exported low-bit program, switch users by composing its one data file.

A model folder (written by ``lowra.export.executorch.export_executorch``; layout in docs/FORMAT.md) holds, per
user mode, a shared program (``side.pte`` / ``merge.pte``) and a data template (``side.ptd`` / ``merge.ptd``),
plus ``manifest.json``, ``tokenizer.json`` and, for custom-op programs, the native kernel library.

The program runs on ExecuTorch's C++ runtime through lowra's small native runner
(:mod:`lowra.device_runtime.executorch_native`, ctypes): no Python binding, no torch. A program takes one ``.ptd``,
so the engine writes one per user:
a copy of the template whose tensor byte ranges (recorded in the manifest) are overwritten with

- ``mode="side"``: the blob's LoRA factors, zero-padded to the program's rank (zeros = the base);
- ``mode="merge"``: ``base + up @ down`` for each adapted module (:func:`.runtime.merge_into`), where the
  pristine base is the template itself, memory-mapped read-only (so a swap never drifts).

Everything here is numpy + ``tokenizers`` + that runner; the whole engine runs with torch blocked (a test proves
it). ExecuTorch's own Python binding is not used: its module links libtorch and takes torch tensors only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lowra.device_runtime import formats as fmt
from lowra.device_runtime._files import scratch_dir
from lowra.device_runtime.engines.base import UserInfo, check_mode, serialized
from lowra.device_runtime.trust import TrustPolicy, check_base_content, make_policy, open_blob
from lowra.device_runtime.engines.generation import GenerationConfig, Tokenizer, generate
from lowra.device_runtime.errors import BlobContentError, KernelLibraryError, LowraError, ProgramError
from lowra.device_runtime.executorch_native import NativeProgram, register_kernel_library
from lowra.device_runtime.formats.constants import TOKENIZER_FILE, USER_MODES
from lowra.device_runtime.formats.executorch_manifest import (
    PACKED_ROLES,
    PTD_MAGIC,
    SIDE_FACTOR_DTYPES,
    Manifest,
    pack4_factors,
    tensor_view,
    verify_file,
)
from lowra.device_runtime.runtime import merge_into

__all__ = ["ExecutorchEngine", "compose_user_data"]


# ------------------------------------------------------------------------------------------------ user data
def compose_user_data(
    template: np.ndarray,
    program: dict[str, Any],
    mode: str,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    rank: int,
    blob: fmt.Blob | None = None,
) -> bytearray:
    """One ``.ptd`` for a user: the template with each user tensor's bytes replaced (numpy only).

    ``template``: the template file's bytes (read-only uint8, e.g. a memory map); ``factors``: module ->
    ``(up [out, k], down [k, in])`` decoded from a blob (empty for the base). Side mode zero-pads to ``rank`` (in
    the tensor's dtype: float16 holds a blob's values exactly); merge mode writes ``template + up @ down`` (the
    template holds the pristine base). A program holding the factors as 4-bit codes (roles ``down_codes``,
    ``down_books``, ``up_codes``, ``up_books``) takes them from ``blob``'s channels (``pack4_factors``).
    """
    data = bytearray(template)
    tensors = program["tensors"]
    packed: dict[str, dict[str, np.ndarray]] = {}
    for key, entry in tensors.items():
        module, role = key.rsplit(":", 1)
        dtypes = ("float32",) if mode != "side" else ("uint8",) if role.endswith("_codes") else SIDE_FACTOR_DTYPES
        if entry.get("dtype") not in dtypes:
            raise ProgramError(f"tensor {key} is {entry.get('dtype')!r}; a {mode} program's user tensors are one of "
                               f"{dtypes}. Re-export the folder")
        end = int(entry["offset"]) + int(entry["nbytes"])
        if end > len(data) or int(entry["nbytes"]) != np.dtype(entry["dtype"]).itemsize * int(np.prod(entry["shape"])):
            raise ProgramError(
                f"data template has {len(data)} bytes but tensor {key} should end at byte {end}: the .ptd does not "
                "belong to this program's manifest. Copy the model folder again or re-export"
            )
        target = tensor_view(data, entry)
        target.flags.writeable = True
        if role in PACKED_ROLES:
            target[...] = 0
            if blob is not None and module in factors:
                if module not in packed:
                    packed[module] = pack4_factors(blob, module, rank)
                target[...] = packed[module][role]
            continue
        up, down = factors.get(module, (None, None))
        if mode == "side":
            target[...] = 0.0
            if up is not None and up.shape[1]:
                k = up.shape[1]
                if role == "down":
                    target[:k] = down
                else:
                    target[:, :k] = up
        elif up is not None:
            merge_into(target, tensor_view(template, entry), up, down)
    return data


# ------------------------------------------------------------------------------------------------ engine
class ExecutorchEngine:
    """An exported model folder on ExecuTorch: logits, generation, user switching (side branch or merge).

    Thread-safe by serialization: calls from several threads wait for each other (see ``engines.base.serialized``).
    """

    def __init__(self, model_dir: str | Path, mode: str = "side", kernel_library: str | Path | None = None,
                 verify: bool = True, *, trusted_keys: Iterable[str | Path | bytes] | None = None,
                 trust: TrustPolicy | None = None) -> None:
        self._lock = threading.RLock()
        self.trust = make_policy(trust, trusted_keys)
        self.manifest = Manifest.read(model_dir)
        self.folder = self.manifest.folder
        self.verify = verify
        self.max_seq_len = int(self.manifest.data["max_seq_len"])
        self.rank = int(self.manifest.data["rank"])
        if self.manifest.data["ops"] == "custom":
            library = Path(kernel_library) if kernel_library else self.folder / str(self.manifest.data["kernel_library"])
            if not library.is_file():
                raise KernelLibraryError(
                    f"kernel library {library} is missing; this program decodes its low-bit weights with lowra's "
                    "native ExecuTorch kernels. Build them with `python -m lowra.export.executorch.kernels` and "
                    "pass kernel_library=..., or use a program exported with ops='aten'"
                )
            if verify and kernel_library is None:
                verify_file(library, self.manifest.data["kernel_library_sha256"], "kernel library")
            register_kernel_library(library, self.manifest.kernel_ops)
        self._workdir = scratch_dir("executorch")
        self._templates: dict[str, np.ndarray] = {}
        self._verified: set[str] = set()
        self._program: NativeProgram | None = None
        self._data_path: Path | None = None
        self.mode = mode
        self.user: UserInfo | None = None
        self._tokenizer: Tokenizer | None = None
        self._activate(mode, {})

    # -- files ---------------------------------------------------------------------------------------------
    def _template(self, mode: str) -> np.ndarray:
        program = self.manifest.program(mode)
        if mode not in self._verified:
            if self.verify:
                verify_file(self.folder / program["program"], program["program_sha256"], f"{mode} program")
                verify_file(self.folder / program["data"], program["data_sha256"], f"{mode} data template")
            self._verified.add(mode)
        if mode not in self._templates:
            path = self.folder / program["data"]
            if not path.is_file():
                raise ProgramError(f"data template {path} is missing; copy the whole model folder")
            template = np.memmap(path, dtype=np.uint8, mode="r")
            if bytes(template[4:8]) != PTD_MAGIC:
                raise ProgramError(f"{path} is not an ExecuTorch data file (no {PTD_MAGIC!r} identifier)")
            self._templates[mode] = template
        return self._templates[mode]

    def _activate(self, mode: str, factors: dict[str, tuple[np.ndarray, np.ndarray]],
                  blob: fmt.Blob | None = None) -> None:
        template = self._template(mode)
        program = self.manifest.program(mode)
        data = compose_user_data(template, program, mode, factors, self.rank, blob)
        # A fresh file per load: the runtime may map the data file, so the live one is never rewritten in place.
        fd, name = tempfile.mkstemp(prefix=f"{mode}-", suffix=".ptd", dir=self._workdir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self._load_program(self.folder / program["program"], Path(name))
        self.mode = mode

    def _load_program(self, pte: Path, ptd: Path) -> None:
        program = NativeProgram(pte, ptd, self.manifest.vocab_size, self.manifest.logits_last)
        previous, previous_path = self._program, self._data_path
        self._program, self._data_path = program, ptd
        if previous is not None:
            previous.close()
        if previous_path is not None and previous_path != ptd:
            previous_path.unlink(missing_ok=True)

    # -- users ---------------------------------------------------------------------------------------------
    @serialized
    def load_user(self, blob: str | Path | bytes, mode: str = "side", *, user_id: str | None = None,
                  decryption_key: bytes | None = None) -> UserInfo:
        """Verify a lowra adapter blob (path or bytes) against this program's base and activate it (side branch
        or merged)."""
        check_mode(mode, USER_MODES, "ExecutorchEngine")
        t0 = time.perf_counter()
        parsed = open_blob(blob, self.trust, user_id=user_id, decryption_key=decryption_key)
        fmt.check_base_binding(parsed, self.manifest.digests, self.manifest.shapes, f"the program at {self.folder}")
        check_base_content(parsed, None, f"the program at {self.folder}")
        factors = parsed.all_factors(drop_empty=True)
        if mode == "side":
            too_wide = {name: up.shape[1] for name, (up, _) in factors.items() if up.shape[1] > self.rank}
            if too_wide:
                name, k = next(iter(too_wide.items()))
                raise BlobContentError(
                    f"adapter {parsed.adapter_id!r} keeps {k} components in {name}; the side-branch program has rank "
                    f"{self.rank}. Use mode='merge' or export with rank >= {k}"
                )
        t1 = time.perf_counter()
        self._activate(mode, factors, parsed)
        t2 = time.perf_counter()
        self.user = UserInfo(
            adapter_id=parsed.adapter_id, mode=mode, modules=tuple(factors), file_bytes=parsed.file_bytes,
            effective_bits=float(parsed.bits_report()["effective_bits"]), load_ms=(t2 - t0) * 1e3,
            apply_ms=(t2 - t1) * 1e3,
        )  # fmt: skip
        return self.user

    @serialized
    def unload_user(self) -> None:
        """Back to the base (the template data, recomposed: bit-exact whatever was loaded before)."""
        self._activate(self.mode, {})
        self.user = None

    # -- compute -------------------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, start: int) -> np.ndarray:
        return self._program.forward(ids, start)

    @serialized
    def logits(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """float32 ``[seq, vocab]`` logits of a sequence from an empty cache (for verification)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 1 <= ids.size < self.max_seq_len:
            raise LowraError(f"{ids.size} tokens; this program takes 1..{self.max_seq_len - 1} at once")
        if self.manifest.logits_last:  # the program gives one position per call: feed the tokens one at a time
            return np.concatenate([self._run(ids[i : i + 1], i) for i in range(ids.size)])
        return self._run(ids, 0)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.folder / TOKENIZER_FILE, prompt_template=self.manifest.prompt_template)
        return self._tokenizer

    @serialized
    def generate_ids(self, prompt_ids: np.ndarray, config: GenerationConfig = GenerationConfig(),
                     eos_ids: frozenset[int] = frozenset()) -> list[int]:
        return generate(
            lambda ids: self._run(ids, 0)[-1],
            lambda token, position: self._run(np.array([token]), position)[-1],
            prompt_ids, config, eos_ids, max_positions=self.max_seq_len,
        )  # fmt: skip

    @serialized
    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(), chat: bool = False) -> str:
        """Text after ``prompt`` (``chat=True`` wraps it in the export's prompt template first)."""
        tok = self.tokenizer
        ids = tok.encode(tok.chat_prompt(prompt) if chat else prompt)
        return tok.decode(self.generate_ids(ids, config, tok.eos_ids))

    @serialized
    def close(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None
        self._templates.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

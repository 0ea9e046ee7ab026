"""The ExecuTorch model folder (lowra-executorch v1; docs/FORMAT.md, "ExecuTorch model folder"): file names, the
manifest and its reader, the file digests it records, and where each user tensor sits in a ``.ptd``.

Written by ``lowra.export.executorch``, read by ``lowra.device_runtime.engines.executorch``. numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowra.device_runtime._files import file_sha256
from lowra.device_runtime.errors import ConfigError, ProgramError
from lowra.device_runtime.formats.adapter import Blob
from lowra.device_runtime.formats.bitpack import unpack_codes
from lowra.device_runtime.formats.constants import USER_MODES
from lowra.device_runtime.formats.manifest import prompt_template_of, read_manifest_json

FORMAT_NAME = "lowra-executorch"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PTD_MAGIC = b"FT01"  # flatbuffer file identifier of ExecuTorch's FlatTensor (.ptd) files, at bytes 4..8
# Every operator lowra's kernel library registers. A folder's manifest lists the ones its programs call
# ("kernel_ops"); folders written before that list existed call only the first two (LEGACY_KERNEL_OPS).
KERNEL_OPS = ("lowra::lowbit_linear.out", "lowra::dequantize.out", "lowra::lowbit_linear_planar.out",
              "lowra::lowbit_linear_planar_lora.out", "lowra::f16_linear.out", "lowra::attention.out",
              "lowra::lowbit_linear_blocked.out", "lowra::lowbit_linear_blocked_lora.out", "lowra::q8_linear.out",
              "lowra::q8_embedding.out", "lowra::rms_norm.out", "lowra::rope.out",
              "lowra::silu_mul.out", "lowra::lowbit_linear_blocked_lora4.out")
LEGACY_KERNEL_OPS = KERNEL_OPS[:2]
EMBEDDING_DTYPES = ("float16", "float32", "int8")  # how a program stores the token embedding and output head
SIDE_FACTOR_DTYPES = ("float16", "float32")  # how a side program stores a user's factors ("dtype" of its tensors)
# ... or as 4-bit codes: roles down_codes / down_books / up_codes / up_books (see pack4_factors)
SIDE_FACTORS = (*SIDE_FACTOR_DTYPES, "packed4")
PACKED_ROLES = ("down_codes", "down_books", "up_codes", "up_books")
LOGITS_MODES = ("last", "all")  # which positions' logits a program outputs ("all" in folders without the key)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a model folder, checked for format and version."""

    folder: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        data = read_manifest_json(
            folder, MANIFEST_FILE, format_name=FORMAT_NAME, version=FORMAT_VERSION,
            writer="lowra.export.executorch.export_executorch", error=ProgramError,
        )  # fmt: skip
        return cls(folder, data)

    @property
    def modes(self) -> list[str]:
        return list(self.data["programs"])

    def program(self, mode: str) -> dict[str, Any]:
        """The ``programs[mode]`` entry (program, data template, digests, tensor byte ranges)."""
        if mode not in USER_MODES:
            raise ConfigError(f"mode={mode!r}; expected one of {USER_MODES}")
        programs = self.data["programs"]
        if mode not in programs:
            raise ProgramError(
                f"{self.folder} has no {mode!r} program (exported modes: {list(programs)}); re-export with "
                f"modes including {mode!r}"
            )
        return programs[mode]

    @property
    def digests(self) -> dict[str, str]:
        """Adaptable module -> digest of its decoded base weight (the material of a blob's base fingerprint)."""
        return {m: entry["digest"] for m, entry in self.data["modules"].items()}

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Adaptable module -> ``[out, in]`` of its base weight."""
        return {m: list(entry["shape"]) for m, entry in self.data["modules"].items()}

    @property
    def kernel_ops(self) -> tuple[str, ...]:
        """The ``lowra::`` operators the folder's programs call (what its kernel library must register)."""
        value = self.data.get("kernel_ops")
        if value is None:
            return LEGACY_KERNEL_OPS
        if not isinstance(value, list) or not all(isinstance(op, str) and op in KERNEL_OPS for op in value):
            raise ProgramError(f"{self.folder / MANIFEST_FILE} has kernel_ops {value!r}; expected a list of lowra "
                               f"operators from {list(KERNEL_OPS)} (a folder from a newer lowra: upgrade lowra)")
        return tuple(value)

    @property
    def logits_last(self) -> bool:
        """True when the programs output only the last position's logits ([1, 1, vocab])."""
        value = self.data.get("logits", "all")
        if value not in LOGITS_MODES:
            raise ProgramError(f"{self.folder / MANIFEST_FILE} has logits {value!r}; expected one of {LOGITS_MODES}")
        return value == "last"

    @property
    def vocab_size(self) -> int:
        """Width of the program's logits (the engine sizes its output buffer with it)."""
        value = self.data.get("vocab_size")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 24:
            raise ProgramError(f"{self.folder / MANIFEST_FILE} has vocab_size {value!r}; expected a positive integer "
                               "(re-export the model folder)")
        return value

    @property
    def prompt_template(self) -> str:
        return prompt_template_of(self.data, str(self.folder / MANIFEST_FILE), ProgramError)


def verify_file(path: Path, expected_sha256: str, what: str) -> None:
    """Refuse a file of the folder that is missing or whose sha256 is not the one the manifest recorded."""
    if not path.is_file():
        raise ProgramError(f"{what} {path} is missing; the model folder is incomplete (re-export or copy it again)")
    got = file_sha256(path)
    if got != expected_sha256:
        raise ProgramError(
            f"{what} {path.name} has sha256 {got[:16]}..., the manifest expects {expected_sha256[:16]}...: the file "
            "is corrupted or belongs to another export (another base or program). Copy the folder again or re-export"
        )


def tensor_view(buffer: bytearray | np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """The tensor a ``programs[mode]["tensors"]`` entry describes, as a view into the ``.ptd`` bytes."""
    array = np.frombuffer(buffer, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])),
                          offset=int(entry["offset"]))
    return array.reshape(entry["shape"])



def pack4_factors(blob: Blob, name: str, slots: int) -> dict[str, np.ndarray]:
    """A side program's packed factors of one module (``side_factors="packed4"``; liblowra's ``pack_factors4`` writes
    the same bytes): the components decode_factors keeps (down and up widths both > 0), in order, each in a 4-bit slot
    -> ``down_codes`` uint8 [slots, ceil(in / 2)] and ``up_codes`` uint8 [slots, ceil(out / 2)] (two codes per byte,
    the even one in the low nibble: the blob's 4-bit channel layout, 1- and 2-bit channels widened) and
    ``down_books`` / ``up_books`` float16 [slots, 16] (the channel's levels, then zeros); slots past them are zeros."""
    lay = blob.layout
    i = blob._by_name[name]
    m = lay.modules[i]
    first = int(lay.module_offsets[i])
    out: dict[str, np.ndarray] = {
        "down_codes": np.zeros((slots, -(-m.in_features // 2)), np.uint8),
        "up_codes": np.zeros((slots, -(-m.out_features // 2)), np.uint8),
        "down_books": np.zeros((slots, 16), np.float16), "up_books": np.zeros((slots, 16), np.float16),
    }  # fmt: skip
    slot = 0
    for k in range(m.rank):
        channels = {"down": first + k, "up": first + m.rank + k}
        if any(lay.widths[c] == 0 for c in channels.values()) or slot == slots:
            continue
        for part, c in channels.items():
            w, length = int(lay.widths[c]), int(lay.lengths[c])
            packed = blob.codes[lay.code_offsets[c] : lay.code_offsets[c + 1]]
            codes = np.concatenate([unpack_codes(packed[None], w, length)[0], np.zeros(length % 2, np.uint8)])
            out[f"{part}_codes"][slot] = codes[0::2] | (codes[1::2] << 4)
            levels = blob.codebooks[lay.level_offsets[c] : lay.level_offsets[c + 1]]
            out[f"{part}_books"][slot, : levels.size] = levels.astype(np.float16)  # float16 levels: exact
        slot += 1
    return out

"""One low-bit base weight (LowRA): per-output-channel learned codebooks over absmax-normalized groups.

The in-memory layout shared by every producer and consumer (the sdk's quantizer and LowBitLinear, the CUDA
kernels, the exporters and the base artifact file), with the numpy reference decode that all of them must
match bit for bit on codes and within float rounding on values:

    W[r, j] = codebook_r[code[r, j]] * scale[r, j // group_size]      (scale = 1 when group_size == 0)

- ``widths[r]`` in {1, 2, 4}: bits per element of output channel (row) ``r``.
- ``codes``: rows concatenated; row ``r`` takes ``packed_bytes(in_features, widths[r])`` bytes, packed LSB-first
  along the input dimension exactly like adapter channels (docs/FORMAT.md), so MatMulNBits-style kernels can
  consume rows of one width without repacking.
- ``codebooks``: rows concatenated; row ``r`` has ``2**widths[r]`` float16 levels, ascending.
- ``scales``: float16 ``[out, ceil(in / group_size)]`` absmax of each group (the last group may be partial);
  ``[out, 0]`` when ``group_size == 0`` (the row's scale is folded into its codebook).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowra.device_runtime.errors import BlobContentError
from lowra.device_runtime.formats.bitpack import packed_bytes, unpack_codes
from lowra.device_runtime.formats.constants import CODED_WIDTHS


def _planar_bytes() -> np.ndarray:
    """File byte of four 2-bit codes (element k at bits 2k, 2k+1) -> the kernels' byte (bit 0 of element k at bit k,
    bit 1 at bit 4 + k)."""
    byte = np.arange(256)
    out = np.zeros(256, dtype=np.int64)
    for k in range(4):
        out |= ((byte >> (2 * k)) & 1) << k | ((byte >> (2 * k + 1)) & 1) << (4 + k)
    return out.astype(np.uint8)


# The native kernels' layout of the codes (device_runtime/native/kernels/lowbit_gemv.h, lowra_lowbit_repack): 2-bit
# rows bit-planar within each byte, so each nibble indexes the 16-entry tables of four inputs; 1- and 4-bit rows as in
# the file. An exported program stores its codes this way (lowra::lowbit_linear_planar) so the kernels read them in
# place. These two tables are that layout's definition for every Python writer and reader.
PLANAR_BYTE = _planar_bytes()
FILE_BYTE = np.argsort(PLANAR_BYTE).astype(np.uint8)  # the inverse permutation


def kernel_layout_codes(codes: np.ndarray, widths: np.ndarray, in_features: int, to_kernel: bool = True) -> np.ndarray:
    """A copy of rows-concatenated ``codes`` with every 2-bit row's bytes in the kernels' layout (``to_kernel``) or
    back in the file's (``to_kernel=False``)."""
    sizes = (in_features * widths.astype(np.int64) + 7) // 8
    two_bit = np.repeat(widths == 2, sizes)
    out = np.array(codes, dtype=np.uint8, copy=True)
    out[two_bit] = (PLANAR_BYTE if to_kernel else FILE_BYTE)[out[two_bit]]
    return out


# The kernels' BLOCKED layout (lowbit_gemv.h, LOWRA_LOWBIT_LAYOUT_BLOCKED, lowra_lowbit_block): the same bytes in the
# order the one-token product reads them, so a layer is one sequential stream. Rows sorted by width (1, 2, then 4
# bits; row order within a width), cut into blocks of BLOCK_ROWS rows (a width's last block may hold fewer: count).
# A 1- or 2-bit block interleaves its rows' 32-bit words (word k of lane i at 4 k count + 4 i; a row's last partial
# word of t bytes at 4 k count + t i); a 4-bit block stores its rows one after another. Blocks follow each other.
BLOCK_ROWS = 8


def blocked_code_order(widths: np.ndarray, in_features: int) -> np.ndarray:
    """The permutation ``order`` with ``blocked = rows_codes[order]``, for rows-concatenated codes of ``widths``."""
    widths = np.asarray(widths).astype(np.int64)
    sizes = (in_features * widths + 7) // 8
    row_start = np.concatenate([[0], np.cumsum(sizes)])
    order = np.empty(int(row_start[-1]), dtype=np.int64)
    offset = 0
    for width in CODED_WIDTHS:
        rows = np.flatnonzero(widths == width)
        nbytes = (in_features * width + 7) // 8
        seen = np.arange(rows.size)
        block_start = seen // BLOCK_ROWS * BLOCK_ROWS
        lane = (seen - block_start)[:, None]
        count = np.minimum(BLOCK_ROWS, rows.size - block_start)[:, None]
        b = np.arange(nbytes)[None, :]
        if width == 4:
            within = lane * nbytes + b
        else:
            word = b // 4
            within = 4 * word * count + lane * np.minimum(4, nbytes - 4 * word) + b % 4
        order[offset + block_start[:, None] * nbytes + within] = row_start[rows][:, None] + b
        offset += rows.size * nbytes
    return order


def kernel_blocked_codes(codes: np.ndarray, widths: np.ndarray, in_features: int, to_kernel: bool = True) -> np.ndarray:
    """File-layout ``codes`` in the kernels' BLOCKED layout (``to_kernel``), or BLOCKED codes back in the file's."""
    order = blocked_code_order(widths, in_features)
    if to_kernel:
        return kernel_layout_codes(codes, widths, in_features)[order]
    rows = np.empty_like(np.asarray(codes, dtype=np.uint8))
    rows[order] = codes
    return kernel_layout_codes(rows, widths, in_features, to_kernel=False)


@dataclass
class QuantizedWeight:
    out_features: int
    in_features: int
    group_size: int
    widths: np.ndarray  # uint8 [out]
    codes: np.ndarray  # uint8 [n_code_bytes]
    codebooks: np.ndarray  # float16 [n_levels]
    scales: np.ndarray  # float16 [out, n_groups] or [out, 0]

    @property
    def n_groups(self) -> int:
        return 0 if self.group_size == 0 else -(-self.in_features // self.group_size)

    @property
    def row_code_offsets(self) -> np.ndarray:
        sizes = (self.in_features * self.widths.astype(np.int64) + 7) // 8
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def row_level_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(1 << self.widths.astype(np.int64))]).astype(np.int64)

    def validate(self, what: str = "quantized weight") -> None:
        """Refuse inconsistent buffers with a message naming the field, what it is and what was expected."""
        if self.out_features <= 0 or self.in_features <= 0 or not 0 <= self.group_size <= 1 << 20:
            raise BlobContentError(f"{what}: shape [{self.out_features}, {self.in_features}] / group {self.group_size} invalid")
        checks = (("widths", np.uint8, (self.out_features,)), ("codes", np.uint8, None),
                  ("codebooks", np.float16, None), ("scales", np.float16, (self.out_features, self.n_groups)))
        for name, dtype, shape in checks:
            arr = getattr(self, name)
            if arr.dtype != dtype or (shape is not None and arr.shape != shape):
                raise BlobContentError(
                    f"{what}: {name} is {arr.dtype} {list(arr.shape)}, expected {np.dtype(dtype)} "
                    f"{list(shape) if shape is not None else '1-D'}"
                )
        bad = sorted(set(np.unique(self.widths).tolist()) - set(CODED_WIDTHS))
        if bad:
            raise BlobContentError(f"{what}: row widths {bad} not allowed; expected values in {CODED_WIDTHS}")
        for name, expected in (("codes", self.row_code_offsets[-1]), ("codebooks", self.row_level_offsets[-1])):
            if getattr(self, name).shape != (expected,):
                raise BlobContentError(f"{what}: {name} has {getattr(self, name).size} entries, widths imply {expected}")
        if not (np.all(np.isfinite(self.codebooks)) and np.all(np.isfinite(self.scales))):
            raise BlobContentError(f"{what}: codebooks or scales contain NaN or Inf")
        levels = self.codebooks.astype(np.float32)
        if levels.size > 1:
            within = np.ones(levels.size - 1, dtype=bool)
            within[self.row_level_offsets[1:-1] - 1] = False  # pairs that cross a row boundary
            if np.any(np.diff(levels)[within] < 0):
                raise BlobContentError(f"{what}: a row's codebook levels are not in ascending order")

    def dequantize(self) -> np.ndarray:
        """The reference decode to float32 [out, in] (vectorized per width)."""
        out = np.empty((self.out_features, self.in_features), dtype=np.float32)
        code_off, level_off = self.row_code_offsets, self.row_level_offsets
        levels = self.codebooks.astype(np.float32)
        for w in CODED_WIDTHS:
            rows = np.nonzero(self.widths == w)[0]
            if rows.size == 0:
                continue
            nbytes = packed_bytes(self.in_features, w)
            packed = self.codes[code_off[rows][:, None] + np.arange(nbytes)[None, :]]
            idx = unpack_codes(packed, w, self.in_features).astype(np.int64)
            out[rows] = levels[level_off[rows][:, None] + idx]
        if self.group_size:
            scale = np.repeat(self.scales.astype(np.float32), self.group_size, axis=1)[:, : self.in_features]
            out *= scale
        return out

    def storage_bits(self) -> int:
        """Bits of every buffer (codes with row padding, codebooks, scales, a 2-bit width per row)."""
        return 8 * (self.codes.size + 2 * self.codebooks.size + 2 * self.scales.size) + 2 * self.out_features

    def code_bits(self) -> int:
        return int(self.in_features * self.widths.astype(np.int64).sum())

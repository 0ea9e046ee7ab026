"""Bit packing shared by every lowra format: LSB-first sub-byte codes and the 2-bit width map (docs/FORMAT.md).

Element ``j`` of a channel packed at ``w`` bits sits at bits ``(j*w) % 8`` of byte ``(j*w) // 8``; every channel
starts on a byte boundary. This is ONNX Runtime MatMulNBits' packing along the reduction axis, so exports need
no repacking. Width codes 0/1/2/3 stand for widths 0/1/2/4 (:data:`.constants.ADAPTER_WIDTHS`).
"""
from __future__ import annotations

import numpy as np

from lowra.device_runtime.formats.constants import ADAPTER_WIDTHS, WIDTH_CODE

def packed_bytes(length: int, width: int) -> int:
    """Bytes one channel of ``length`` elements takes at ``width`` bits (byte aligned)."""
    return (length * width + 7) // 8


def pack_codes(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack ``codes`` [n, L] (values < 2**width) into uint8 [n, packed_bytes(L, width)], LSB-first per channel."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [channels, length], got shape {codes.shape}")
    n, length = codes.shape
    if width == 0:
        return np.zeros((n, 0), dtype=np.uint8)
    if width not in (1, 2, 4, 8):
        raise ValueError(f"width {width} is not packable; expected one of 1, 2, 4, 8")
    if codes.size and int(codes.max()) >= (1 << width):
        raise ValueError(f"code {int(codes.max())} does not fit in {width} bits")
    per_byte = 8 // width
    nbytes = packed_bytes(length, width)
    padded = np.zeros((n, nbytes * per_byte), dtype=np.uint8)
    padded[:, :length] = codes
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)[None, None, :]
    grouped = padded.reshape(n, nbytes, per_byte) << shifts
    return np.bitwise_or.reduce(grouped, axis=2).astype(np.uint8)


def unpack_codes(packed: np.ndarray, width: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 [n, nbytes] -> uint8 codes [n, length]."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    if width == 0:
        return np.zeros((n, length), dtype=np.uint8)
    per_byte = 8 // width
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)[None, None, :]
    mask = np.uint8((1 << width) - 1)
    return ((packed[:, :, None] >> shifts) & mask).reshape(n, -1)[:, :length]


def encode_widths(widths: np.ndarray) -> np.ndarray:
    widths = np.asarray(widths)
    bad = sorted(set(int(w) for w in np.unique(widths)) - set(ADAPTER_WIDTHS))
    if bad:
        raise ValueError(f"widths {bad} are not allowed; expected values in {ADAPTER_WIDTHS}")
    table = np.zeros(max(ADAPTER_WIDTHS) + 1, dtype=np.uint8)
    for w, c in WIDTH_CODE.items():
        table[w] = c
    return pack_codes(table[widths.astype(np.int64)][None, :], 2)[0]


def decode_widths(packed: np.ndarray, n_channels: int) -> np.ndarray:
    return np.asarray(ADAPTER_WIDTHS, dtype=np.uint8)[unpack_codes(np.asarray(packed)[None, :], 2, n_channels)[0]]

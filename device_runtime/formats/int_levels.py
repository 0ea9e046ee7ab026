"""Codebook levels stored as integers times a power of two per row (quantized base version 4).

Spec in docs/FORMAT.md ("Version 4: integer codebooks"). A base row of width ``w`` has ``2**w`` levels ``k * 2**e``:
integers ``k`` of ``LEVEL_BITS[w]`` bits (6 for 1- and 2-bit rows, 8 for 4-bit rows) in ``[-limit, limit]``
(``limit = 2**(bits - 1) - 1``: 31 or 127), ascending, and one exponent ``e`` per row in ``[MIN_EXPONENT,
max_exponent(w)]``. Every such number is a finite float16 exactly, so a reader expands the levels to the float16
codebooks every consumer already decodes (:class:`~.quantized_weight.QuantizedWeight`) without rounding, and the
fingerprint, the decode and all engines see the same bytes as from a float16 (version 1) file of the same levels.
A 2-bit row's codebook costs 4 * 6 + 8 = 32 bits instead of 64, a 4-bit row's 16 * 8 + 8 = 136 instead of 256.

Why 8 bits at 4 bits: a row's largest level is stored to within half a grid step, up to 1/62 of it with 6 bits.
The calibrated 4-bit SmolLM2 base (92% of its rows at 4 bits) lost 0.14 nats of held-out NLL to that with 6-bit
levels everywhere, 0.05 with 8-bit levels on its 4-bit rows (docs/RESULTS.md); at 2 and 3 bits 6-bit levels beat
float16 ones.

Per layer ``M``, two tensors replace ``M.codebooks``:
  ``M.levels``           uint8 1-D ``ceil(sum_r LEVEL_BITS[w_r] * 2**w_r / 8)`` bytes: every row's levels, rows
                         concatenated, each ``k`` in two's complement on its row's bits, packed LSB-first into one bit
                         stream (stream bit ``b`` = bit ``b % 8`` of byte ``b // 8``); the last byte's unused high
                         bits are 0
  ``M.level_exponents``  int8 1-D ``[out]``: ``e`` of each row

numpy only (the device reads this without torch); the quantizer imports :func:`grid_exponents` and the constants to
fit its levels on this grid.
"""
from __future__ import annotations

import numpy as np

from lowra.device_runtime.errors import BlobContentError

LEVEL_BITS = {1: 6, 2: 6, 4: 8}  # bits of each level, by the row's width
MIN_EXPONENT = -24  # 2**-24 is float16's smallest subnormal step
EXPONENT_BITS = 8  # each row's exponent is one int8


def level_limit(width: int) -> int:
    """Largest |k| of a row of ``width``: 31 or 127 (the most negative two's-complement value is not used)."""
    return (1 << (LEVEL_BITS[width] - 1)) - 1


def max_exponent(width: int) -> int:
    """Largest exponent of a row of ``width`` whose every level is a finite float16: 31 * 2**11 = 63488 and
    127 * 2**9 = 65024 are below float16's largest finite value (65504)."""
    return 11 if LEVEL_BITS[width] == 6 else 9


def codebook_bits(width: int) -> int:
    """Bits of one row's codebook at ``width`` in this storage (float16 storage: ``16 * 2**width``)."""
    return LEVEL_BITS[width] * (1 << width) + EXPONENT_BITS


def packed_level_bytes(widths: np.ndarray) -> int:
    """Bytes of a layer's ``levels`` tensor for rows of these widths."""
    w = np.asarray(widths, dtype=np.int64)
    return (sum(int(np.sum(w == v)) * (LEVEL_BITS[v] << v) for v in LEVEL_BITS) + 7) // 8


def grid_exponents(absmax: np.ndarray, width: int) -> np.ndarray:
    """The smallest exponent per row whose grid reaches ``absmax`` (the levels' largest magnitude), clipped to the
    stored range: ``ceil(log2(absmax / limit))``; rows of zeros get MIN_EXPONENT."""
    absmax = np.asarray(absmax, dtype=np.float64)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(absmax > 0, absmax / level_limit(width), 0.0)))
    return np.clip(np.where(absmax > 0, e, MIN_EXPONENT), MIN_EXPONENT, max_exponent(width)).astype(np.int64)


def _row_tables(widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per level: its row, its bits and its limit; per row: the largest exponent (rows of width 0 have no levels)."""
    w = np.asarray(widths, dtype=np.int64)
    table = np.zeros(max(LEVEL_BITS) + 1, dtype=np.int64)
    tops = np.zeros_like(table)
    for width, bits in LEVEL_BITS.items():
        table[width], tops[width] = bits, max_exponent(width)
    row_of = np.repeat(np.arange(w.size), np.where(w > 0, np.left_shift(1, w), 0))
    level_bits = table[w][row_of]
    return row_of, level_bits, (1 << (level_bits - 1)) - 1, tops[w]


def level_bit_counts(widths: np.ndarray) -> np.ndarray:
    """The bits of each level (int64, rows in order) of rows of these widths: ``LEVEL_BITS[w]``, ``2**w`` times."""
    return _row_tables(widths)[1]


def pack_level_ints(ints: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Integer levels (each within its row's two's complement bits) -> the ``levels`` stream: LSB-first, each level
    on its row's bits, the last byte zero-padded."""
    level_bits = level_bit_counts(widths)
    unsigned = (np.asarray(ints, dtype=np.int64) & ((1 << level_bits) - 1)).astype(np.uint8)
    bits = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")  # [n, 8]
    keep = np.arange(8)[None, :] < level_bits[:, None]
    return np.packbits(bits[keep], bitorder="little")


def unpack_level_ints(packed: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, bool]:
    """A ``levels`` stream of at least its rows' bits -> the integer levels (int64, sign-extended), and whether the
    padding bits after them are all zero. No other check: :func:`decode_levels` is the strict reader."""
    level_bits = level_bit_counts(widths)
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little").astype(np.int64)
    total = int(level_bits.sum())
    start = np.concatenate([[0], np.cumsum(level_bits)[:-1]]).astype(np.int64)
    j = np.arange(8)[None, :]
    used = j < level_bits[:, None]
    idx = np.where(used, start[:, None] + j, 0)
    values = np.where(used, bits[idx] if bits.size else 0, 0) << j
    values = values.sum(1)
    half = 1 << (level_bits - 1)
    return np.where(values >= half, values - 2 * half, values), not bits[total:].any()


def encode_levels(codebooks: np.ndarray, widths: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float16 codebooks (rows concatenated, ``2**w`` levels per row) -> (``levels`` uint8, ``level_exponents``
    int8), losslessly: each row takes the largest exponent that represents all its levels. A level that is not
    ``k * 2**e`` in its row's range (e.g. a Lloyd-Max level rounded to float16 only), or a -0.0, is refused
    (ValueError naming the row): such a base is written with float16 codebooks."""
    books = np.asarray(codebooks, dtype=np.float16)
    widths = np.asarray(widths)
    row_of, level_bits, limit, top = _row_tables(widths)
    counts = np.left_shift(1, widths.astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    values = books.astype(np.float64)
    exponents = np.full(widths.size, MIN_EXPONENT - 1, dtype=np.int64)
    for e in range(max(top.max(initial=MIN_EXPONENT), MIN_EXPONENT), MIN_EXPONENT - 1, -1):  # first fit = largest
        k = values / 2.0 ** e
        fits = (k == np.round(k)) & (np.abs(k) <= limit)
        row_fits = np.logical_and.reduceat(fits, starts) if books.size else np.zeros(0, bool)
        exponents = np.where((exponents < MIN_EXPONENT) & row_fits & (e <= top), e, exponents)
    negative_zero = (values == 0) & np.signbit(books)
    bad = np.flatnonzero(exponents < MIN_EXPONENT)
    if negative_zero.any():
        bad = np.union1d(bad, row_of[negative_zero])
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"{what}: row {r}'s levels {books[row_of == r].tolist()} are not {LEVEL_BITS[int(widths[r])]}-bit "
            f"integers times one power of two (2**{MIN_EXPONENT}..2**{int(top[r])}, no -0.0); {bad.size} row(s) like "
            "it. Quantize with codebook_format='int' or write the base with float16 codebooks"
        )
    ints = np.round(values / 2.0 ** exponents[row_of]).astype(np.int64)
    return pack_level_ints(ints, widths), exponents.astype(np.int8)


def decode_levels(levels: np.ndarray, exponents: np.ndarray, widths: np.ndarray, what: str) -> np.ndarray:
    """The stored ``levels`` and ``level_exponents`` of a layer -> its float16 codebooks, strictly: sizes, dtypes,
    zero padding, integers within their row's range and ascending within each row, exponents in range
    (BlobContentError)."""
    widths = np.asarray(widths)
    row_of, level_bits, limit, top = _row_tables(widths)
    want = packed_level_bytes(widths)
    if levels.dtype != np.uint8 or levels.shape != (want,):
        raise BlobContentError(f"{what}: levels is {levels.dtype} {list(levels.shape)}, expected uint8 [{want}] "
                               f"({row_of.size} levels of 6 or 8 bits)")
    if exponents.dtype != np.int8 or exponents.shape != (widths.size,):
        raise BlobContentError(f"{what}: level_exponents is {exponents.dtype} {list(exponents.shape)}, expected int8 "
                               f"[{widths.size}] (one per row)")
    e = np.asarray(exponents, dtype=np.int64)
    bad = np.flatnonzero((e < MIN_EXPONENT) | (e > top))
    if bad.size:
        r = int(bad[0])
        raise BlobContentError(f"{what}: row {r}'s level exponent is {int(e[r])}, expected "
                               f"{MIN_EXPONENT}..{int(top[r])} for a {int(widths[r])}-bit row")
    ints, clean = unpack_level_ints(levels, widths)
    if not clean:
        raise BlobContentError(f"{what}: levels has nonzero padding bits after its {row_of.size} levels")
    low = np.flatnonzero(ints < -limit)
    if low.size:
        i = int(low[0])
        raise BlobContentError(f"{what}: row {int(row_of[i])} has the level {int(ints[i])}, expected integers in "
                               f"-{int(limit[i])}..{int(limit[i])}")
    if ints.size > 1 and np.any((np.diff(ints) < 0) & (row_of[1:] == row_of[:-1])):
        raise BlobContentError(f"{what}: a row's codebook levels are not in ascending order")
    # Exact: |k| <= 127 needs 7 significant bits and the exponent range keeps every product a finite float16.
    return (ints * np.exp2(e[row_of])).astype(np.float16)

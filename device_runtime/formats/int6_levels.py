"""Codebook levels stored as 6-bit integers times a power of two per row (quantized base version 4).

Spec in docs/FORMAT.md ("Version 4: int6 codebooks"). A base row's ``2**w`` levels are ``k * 2**e`` with integers
``k`` in ``[-31, 31]`` (ascending) and one exponent ``e`` per row in ``[MIN_EXPONENT, MAX_EXPONENT]``. Every such
number is a finite float16 exactly, so a reader expands the levels to the float16 codebooks every consumer already
decodes (:class:`~.quantized_weight.QuantizedWeight`) without rounding, and the fingerprint, the decode and all
engines see the same bytes as from a float16 (version 1) file of the same levels. A 2-bit row's codebook costs
4 * 6 + 8 = 32 bits instead of 64.

Per layer ``M``, two tensors replace ``M.codebooks``:
  ``M.levels``           uint8 1-D ``ceil(6 * n_levels / 8)`` bytes: every row's levels, rows concatenated, each
                         ``k`` as 6-bit two's complement packed LSB-first into one bit stream (level ``i`` at bits
                         ``6 i .. 6 i + 5`` of the stream, stream bit ``b`` = bit ``b % 8`` of byte ``b // 8``);
                         the last byte's unused high bits are 0
  ``M.level_exponents``  int8 1-D ``[out]``: ``e`` of each row

numpy only (the device reads this without torch); the quantizer imports :func:`grid_exponents` and the constants to
fit its levels on this grid.
"""
from __future__ import annotations

import numpy as np

from lowra.device_runtime.errors import BlobContentError

LEVEL_BITS = 6
LEVEL_LIMIT = (1 << (LEVEL_BITS - 1)) - 1  # 31: -32 is not used, so the grid is symmetric
# 31 * 2**11 = 63488 is below float16's largest finite value (65504); 2**-24 is its smallest subnormal step.
MIN_EXPONENT = -24
MAX_EXPONENT = 11
# The bits one row's stored codebook takes at width w: 2**w six-bit levels and its int8 exponent.
EXPONENT_BITS = 8


def codebook_bits(width: int) -> int:
    """Bits of one row's codebook at ``width`` in this storage (float16 storage: ``16 * 2**width``)."""
    return LEVEL_BITS * (1 << width) + EXPONENT_BITS


def packed_level_bytes(n_levels: int) -> int:
    return (LEVEL_BITS * n_levels + 7) // 8


def grid_exponents(absmax: np.ndarray) -> np.ndarray:
    """The smallest exponent per row whose grid reaches ``absmax`` (levels' largest magnitude), clipped to the
    stored range: ``ceil(log2(absmax / 31))``; rows of zeros get MIN_EXPONENT."""
    absmax = np.asarray(absmax, dtype=np.float64)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(absmax > 0, absmax / LEVEL_LIMIT, 0.0)))
    return np.clip(np.where(absmax > 0, e, MIN_EXPONENT), MIN_EXPONENT, MAX_EXPONENT).astype(np.int64)


def _pack(ints: np.ndarray) -> np.ndarray:
    """int [n] in [-32, 31] -> the LSB-first 6-bit stream (uint8)."""
    unsigned = (np.asarray(ints, dtype=np.int64) & ((1 << LEVEL_BITS) - 1)).astype(np.uint8)
    bits = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :LEVEL_BITS].reshape(-1)
    return np.packbits(bits, bitorder="little")


def _unpack(packed: np.ndarray, n_levels: int) -> tuple[np.ndarray, bool]:
    """The stream -> int64 [n_levels] (sign-extended), and whether the padding bits are all zero."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    used = bits[: LEVEL_BITS * n_levels].reshape(n_levels, LEVEL_BITS).astype(np.int64)
    values = (used << np.arange(LEVEL_BITS, dtype=np.int64)).sum(1)
    return np.where(values >= 1 << (LEVEL_BITS - 1), values - (1 << LEVEL_BITS), values), not bits[LEVEL_BITS * n_levels:].any()


def encode_levels(codebooks: np.ndarray, widths: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float16 codebooks (rows concatenated, ``2**w`` levels per row) -> (``levels`` uint8, ``level_exponents``
    int8), losslessly: each row takes the largest exponent that represents all its levels. A level that is not
    ``k * 2**e`` with ``|k| <= 31`` (e.g. a Lloyd-Max level rounded to float16 only), or a -0.0, is refused
    (ValueError naming the row): such a base is written with float16 codebooks."""
    books = np.asarray(codebooks, dtype=np.float16)
    counts = 1 << np.asarray(widths, dtype=np.int64)
    row_of = np.repeat(np.arange(counts.size), counts)
    values = books.astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    exponents = np.full(counts.size, MIN_EXPONENT - 1, dtype=np.int64)
    for e in range(MAX_EXPONENT, MIN_EXPONENT - 1, -1):  # the first that fits is the largest
        k = values / 2.0 ** e
        row_fits = np.logical_and.reduceat((k == np.round(k)) & (np.abs(k) <= LEVEL_LIMIT), starts)
        exponents = np.where((exponents < MIN_EXPONENT) & row_fits, e, exponents)
    negative_zero = (values == 0) & np.signbit(books)
    bad = np.flatnonzero(exponents < MIN_EXPONENT)
    if negative_zero.any():
        bad = np.union1d(bad, row_of[negative_zero])
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"{what}: row {r}'s levels {books[row_of == r].tolist()} are not 6-bit integers times one power of two "
            f"(2**{MIN_EXPONENT}..2**{MAX_EXPONENT}, no -0.0); {bad.size} row(s) like it. Quantize with "
            "codebook_format='int6' or write the base with float16 codebooks"
        )
    ints = np.round(values / 2.0 ** exponents[row_of]).astype(np.int64)
    return _pack(ints), exponents.astype(np.int8)


def decode_levels(levels: np.ndarray, exponents: np.ndarray, widths: np.ndarray, what: str) -> np.ndarray:
    """The stored ``levels`` and ``level_exponents`` of a layer -> its float16 codebooks, strictly: sizes, dtypes,
    zero padding, integers in [-31, 31] ascending within each row, exponents in range (BlobContentError)."""
    counts = 1 << np.asarray(widths, dtype=np.int64)
    n_levels = int(counts.sum())
    want = packed_level_bytes(n_levels)
    if levels.dtype != np.uint8 or levels.shape != (want,):
        raise BlobContentError(f"{what}: levels is {levels.dtype} {list(levels.shape)}, expected uint8 [{want}] "
                               f"({n_levels} six-bit levels)")
    if exponents.dtype != np.int8 or exponents.shape != (counts.size,):
        raise BlobContentError(f"{what}: level_exponents is {exponents.dtype} {list(exponents.shape)}, expected int8 "
                               f"[{counts.size}] (one per row)")
    e = np.asarray(exponents, dtype=np.int64)
    if e.size and (e.min() < MIN_EXPONENT or e.max() > MAX_EXPONENT):
        raise BlobContentError(f"{what}: level exponents span {int(e.min())}..{int(e.max())}, expected "
                               f"{MIN_EXPONENT}..{MAX_EXPONENT}")
    ints, clean = _unpack(levels, n_levels)
    if not clean:
        raise BlobContentError(f"{what}: levels has nonzero padding bits after its {n_levels} levels")
    if ints.size and ints.min() < -LEVEL_LIMIT:
        raise BlobContentError(f"{what}: a level is {int(ints.min())}, expected integers in -{LEVEL_LIMIT}..{LEVEL_LIMIT}")
    if ints.size > 1:
        within = np.ones(ints.size - 1, dtype=bool)
        within[np.cumsum(counts)[:-1] - 1] = False  # pairs that cross a row boundary
        if np.any(np.diff(ints)[within] < 0):
            raise BlobContentError(f"{what}: a row's codebook levels are not in ascending order")
    # Exact: |k| <= 31 needs 5 significant bits and the exponent range keeps every product a finite float16.
    return (ints * np.exp2(np.repeat(e, counts))).astype(np.float16)

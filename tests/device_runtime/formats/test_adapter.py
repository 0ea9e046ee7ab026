"""The wire format: golden vectors, round trips and every way a blob can be bad."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.errors import (
    BlobContentError,
    BlobError,
    BlobTruncatedError,
    ChecksumMismatchError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats.container import parse_header, serialize

from tests.device_runtime.conftest import make_blob_bytes


# --- packing golden vectors (hand-computed, LSB-first) -------------------------------------------
@pytest.mark.parametrize(
    "codes,width,expected",
    [
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, [0b00001101, 0b00000001]),
        ([1, 2, 3, 0, 1], 2, [0b00111001, 0b00000001]),
        ([3, 10, 15], 4, [0xA3, 0x0F]),
        ([], 4, []),
    ],
)
def test_pack_golden(codes, width, expected):
    packed = fmt.pack_codes(np.array([codes], dtype=np.uint8).reshape(1, -1), width)
    assert packed.tolist() == [expected]
    assert fmt.unpack_codes(packed, width, len(codes)).tolist() == [codes]


def test_four_bit_packing_matches_matmulnbits_nibble_order():
    # ONNX Runtime MatMulNBits: element 2i in the low nibble, 2i+1 in the high nibble of byte i.
    codes = np.arange(16, dtype=np.uint8)[None, :]
    packed = fmt.pack_codes(codes, 4)[0]
    assert [(b & 0xF, b >> 4) for b in packed] == [(2 * i, 2 * i + 1) for i in range(8)]


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 8, 13, 576])
def test_pack_round_trip(width, length):
    rng = np.random.default_rng(width * 1000 + length)
    codes = rng.integers(0, 1 << width, (5, length)).astype(np.uint8)
    packed = fmt.pack_codes(codes, width)
    assert packed.shape == (5, (length * width + 7) // 8)
    np.testing.assert_array_equal(fmt.unpack_codes(packed, width, length), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        fmt.pack_codes(np.array([[4]]), 2)


def test_width_map_round_trip_and_golden():
    widths = np.array([0, 1, 2, 4, 4, 2], dtype=np.uint8)
    packed = fmt.encode_widths(widths)
    assert packed.tolist() == [0b11100100, 0b00001011]
    np.testing.assert_array_equal(fmt.decode_widths(packed, 6), widths)
    with pytest.raises(ValueError, match="not allowed"):
        fmt.encode_widths(np.array([3]))


# --- blob round trip ----------------------------------------------------------------------------
def test_blob_decodes_to_codebook_lookups(tiny_base):
    m = fmt.ModuleEntry("layer", out_features=3, in_features=5, rank=2)
    widths = np.array([2, 0, 1, 4], dtype=np.uint8)  # down k=0,1 then up k=0,1
    codes = [np.array([0, 1, 2, 3, 0], np.uint8), np.zeros(0, np.uint8), np.array([1, 0, 1], np.uint8), np.array([15, 0, 7], np.uint8)]
    levels = [np.array([-1, -0.5, 0.5, 1], np.float16), np.zeros(0, np.float16), np.array([-2, 2], np.float16),
              np.arange(16, dtype=np.float16) / 8]
    meta = {"adapter_id": "a", "base_fingerprint": "sha256:x", "lora": {}, "scheme": {}, "created": "t", "card": {}}
    blob = fmt.parse_blob(fmt.build_blob_bytes([m], widths, codes, levels, meta))
    # the worked example of docs/FORMAT.md, byte for byte
    assert blob.codes.tobytes().hex(" ") == "e4 00 05 0f 07"
    assert fmt.encode_widths(blob.layout.widths).tobytes().hex() == "d2"
    assert blob.layout.level_offsets.tolist() == [0, 4, 4, 6, 22]
    up, down = blob.factors("layer")
    np.testing.assert_array_equal(down, [[-1, -0.5, 0.5, 1, -1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(up, [[2, 15 / 8], [-2, 0], [2, 7 / 8]])
    np.testing.assert_array_equal(blob.delta("layer"), up @ down)
    report = blob.bits_report()
    assert report["n_params"] == 2 * (3 + 5)
    assert report["effective_bits"] == pytest.approx(8 * blob.file_bytes / 16)
    assert report["code_bits"] == pytest.approx((5 * 2 + 3 * 1 + 3 * 4) / 16)
    assert report["width_histogram"] == {"0": 1, "1": 1, "2": 1, "4": 1}


def test_golden_blob_bytes_are_stable(tiny_base):
    """Any change to the byte layout of v1 breaks deployed blobs: this digest must only change with a version bump."""
    data = make_blob_bytes(tiny_base)
    blob = fmt.parse_blob(data)
    assert blob.file_bytes == len(data)
    assert hashlib.sha256(blob.codes.tobytes() + blob.codebooks.astype(np.float16).tobytes()).hexdigest()[:16] == (
        "ed679747fe32be53"
    )
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_FILE_DIGEST


GOLDEN_FILE_DIGEST = "e71bf4009e7e3e9e"


def test_safetensors_library_reads_our_blob(tiny_base):
    from safetensors.numpy import load

    data = make_blob_bytes(tiny_base)
    tensors = load(data)
    assert set(tensors) == {"codes", "codebooks", "widths"}
    assert tensors["codebooks"].dtype == np.float16


# --- bad blobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1, -37])
def test_truncated_blob(tiny_base, cut):
    data = make_blob_bytes(tiny_base)
    with pytest.raises(BlobTruncatedError, match="truncated|too short"):
        fmt.parse_blob(data[:cut], "user.safetensors")


def test_bit_flip_in_payload_fails_checksum(tiny_base):
    data = bytearray(make_blob_bytes(tiny_base))
    header_len = 8 + struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(0)
    for pos in rng.integers(header_len, len(data), 20):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(ChecksumMismatchError, match="corrupted"):
            fmt.parse_blob(bytes(flipped))


def test_bit_flip_in_header_is_refused(tiny_base):
    data = make_blob_bytes(tiny_base)
    header_len = 8 + struct.unpack("<Q", data[:8])[0]
    refused = 0
    for pos in range(8, header_len, 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x04
        try:
            fmt.parse_blob(bytes(flipped))
        except BlobError:
            refused += 1
    assert refused == len(range(8, header_len, 7))


def _rewrite(data: bytes, mutate_meta=None, mutate_tensors=None, fix_checksum=True) -> bytes:
    header = parse_header(data, len(data), "x")
    tensors = {n: np.frombuffer(data, dtype=np.uint8, count=i.end - i.start, offset=i.start)
               .view({"U8": np.uint8, "F16": np.float16, "I32": np.int32}[i.dtype]).copy()
               for n, i in header.tensors.items()}
    meta = dict(header.metadata)
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    if fix_checksum:
        meta["payload_sha256"] = fmt.payload_digest(tensors, meta)
    return serialize(tensors, meta)


def test_unknown_format_version(tiny_base):
    data = _rewrite(make_blob_bytes(tiny_base), lambda m: m.update(format_version="2"))
    with pytest.raises(UnsupportedFormatError, match=r"version '2' is not supported.*\[1\]"):
        fmt.parse_blob(data)


def test_not_a_lowra_blob(tiny_base):
    with pytest.raises(UnsupportedFormatError, match="not a lowra adapter blob"):
        fmt.parse_blob(serialize({"w": np.zeros(3, np.float32)}, {"format": "pt"}))


def test_nan_codebook_is_refused(tiny_base):
    def poison(t):
        t["codebooks"][3] = np.nan

    data = _rewrite(make_blob_bytes(tiny_base), mutate_tensors=poison)
    with pytest.raises(BlobContentError, match="NaN or Inf"):
        fmt.parse_blob(data)


def test_wrong_dtype_is_refused(tiny_base):
    def widen(t):
        t["codes"] = t["codes"].astype(np.int32)

    with pytest.raises(BlobContentError, match="expected 1-D uint8"):
        fmt.parse_blob(_rewrite(make_blob_bytes(tiny_base), mutate_tensors=widen))


def test_module_table_inconsistent_with_tensors(tiny_base):
    def grow(m):
        table = json.loads(m["modules"])
        table[0][2] += 8  # in_features no longer matches the stored codes
        m["modules"] = json.dumps(table, separators=(",", ":"))  # canonical, as the writer spells it

    with pytest.raises(BlobContentError, match="bit map implies"):
        fmt.parse_blob(_rewrite(make_blob_bytes(tiny_base), mutate_meta=grow))


def test_build_refuses_non_finite_levels():
    m = fmt.ModuleEntry("layer", 2, 2, 1)
    meta = {"adapter_id": "a", "base_fingerprint": "sha256:x", "lora": {}, "scheme": {}, "created": "t", "card": {}}
    with pytest.raises(BlobContentError, match="non-finite"):
        fmt.build_blob_bytes([m], np.array([1, 1], np.uint8), [np.array([0, 1], np.uint8)] * 2,
                             [np.array([0, np.inf], np.float16)] * 2, meta)


def test_all_factors_matches_per_module_decode(tiny_base):
    blob = fmt.parse_blob(make_blob_bytes(tiny_base, widths=(4, 0, 1, 2)))
    every = blob.all_factors()
    kept = blob.all_factors(drop_empty=True)
    for m in blob.modules:
        up, down = blob.factors(m.name)
        np.testing.assert_array_equal(every[m.name][0], up)
        np.testing.assert_array_equal(every[m.name][1], down)
        # component 1 has width 0: dropped, and the product is unchanged
        assert kept[m.name][0].shape == (m.out_features, m.rank - 1)
        np.testing.assert_allclose(kept[m.name][0] @ kept[m.name][1], up @ down, rtol=1e-6, atol=1e-7)

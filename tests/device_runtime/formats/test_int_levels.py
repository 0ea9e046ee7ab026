"""Version 4 of the quantized base: codebook levels as 6-bit integers times a power of two per row.

The codec (docs/FORMAT.md "Version 4"): the worked example's bytes, lossless round trips down to float16's subnormals,
the canonical exponent, and every refusal; then whole files: version, fingerprint and decode equal to the float16
file of the same levels, fewer bytes, recovery adapters of both kinds, and the refusals of mixed layouts.
"""
from __future__ import annotations

import numpy as np
import pytest

from lowra.device_runtime.errors import BlobContentError
from lowra.device_runtime.formats.container import parse_header
from lowra.device_runtime.formats.int_levels import (
    MIN_EXPONENT,
    codebook_bits,
    decode_levels,
    encode_levels,
    grid_exponents,
    level_limit,
    max_exponent,
    packed_level_bytes,
)
from lowra.device_runtime.formats.quantized_base import (
    Recovery,
    build_quantized_base_bytes,
    header_bytes_bound,
    quantized_fingerprint,
    read_quantized_base,
    serialized_size,
    write_quantized_base,
)
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from tests.device_runtime.conftest import recovery_blob
from tests.device_runtime.formats.test_quantized_base import (
    META,
    dense_tensors,
    example_layer,
    random_layer,
    recovery_for,
    rewrite_metadata,
)

ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
# The worked example's levels (docs/FORMAT.md), worked out by hand. Rows 0 and 1 (6-bit levels): four levels a, b,
# c, d fill three bytes a | b << 6, b >> 2 | c << 4, c >> 4 | d << 2 (-1 = 0x3f, -4 = 0x3c), so 36 bits: 7f c0 ff 01
# and the low nibble 1 of byte 4. Row 2 (8-bit levels -8 .. 7 = f8 .. ff 00 .. 07) starts at bit 36: each byte is the
# high nibble of one level and the low nibble of the next; the last byte's high 4 bits are padding.
GOLDEN = "7fc0ff0181" + "9fafbfcfdfefff0f" + "10203040506070" + "00"


def grid_codebooks(rng: np.random.Generator, widths: np.ndarray, exponents=None) -> np.ndarray:
    """Ascending levels k * 2**e per row (k within the row's limit, e drawn from its stored range unless given)."""
    rows = []
    for r, w in enumerate(widths):
        w = int(w)
        e = rng.integers(MIN_EXPONENT, max_exponent(w) + 1) if exponents is None else exponents[r]
        k = np.sort(rng.integers(-level_limit(w), level_limit(w) + 1, 1 << w))
        rows.append((k * 2.0 ** e).astype(np.float16) + np.float16(0))  # + 0 turns -0.0 into 0.0
    return np.concatenate(rows)


def grid_layer(rng: np.random.Generator, out: int, n_in: int, group: int) -> QuantizedWeight:
    qw = random_layer(rng, out, n_in, group)[0]
    exponents = rng.integers(-8, 2, out)  # weight-sized levels
    qw.codebooks = grid_codebooks(rng, qw.widths, exponents)
    qw.validate()
    return qw


def grid_layers(seed: int = 0) -> dict[str, QuantizedWeight]:
    rng = np.random.default_rng(seed)
    return {"model.layers.0.q_proj": grid_layer(rng, 6, 20, 8), "model.layers.0.down_proj": grid_layer(rng, 4, 37, 8),
            "model.layers.1.q_proj": grid_layer(rng, 6, 20, 0)}


def test_worked_example_bytes():
    """docs/FORMAT.md's worked example stored as version 4: rows [-1, 1], [-1, -0.25, 0.25, 1] and (i - 8) / 8."""
    qw = example_layer()
    levels, exponents = encode_levels(qw.codebooks, qw.widths, "example")
    # k = [-1, 1 | -4, -1, 1, 4 | -8 .. 7], e = [0, -2, -3]: 6 levels of 6 bits, 16 of 8: 164 bits, 21 bytes.
    assert exponents.tolist() == [0, -2, -3]
    assert levels.tobytes().hex() == GOLDEN
    assert packed_level_bytes(qw.widths) == 21
    back = decode_levels(levels, exponents, qw.widths, "example")
    assert back.tobytes() == qw.codebooks.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_is_lossless_over_the_whole_exponent_range(seed):
    rng = np.random.default_rng(seed)
    widths = rng.choice([1, 2, 4], 40).astype(np.uint8)
    books = grid_codebooks(rng, widths)
    levels, exponents = encode_levels(books, widths, "t")
    assert levels.shape == (packed_level_bytes(widths),)
    assert decode_levels(levels, exponents, widths, "t").tobytes() == books.tobytes()
    # The stored exponent is the largest that represents the row: one more would need a non-integer k.
    offsets = np.concatenate([[0], np.cumsum(1 << widths.astype(int))])
    for r, e in enumerate(exponents.astype(int)):
        row = books[offsets[r]: offsets[r + 1]].astype(np.float64)
        w = int(widths[r])
        if e < max_exponent(w) and np.any(row):
            k = row / 2.0 ** (e + 1)
            assert not (np.all(k == np.round(k)) and np.all(np.abs(k) <= level_limit(w))), r


def test_extremes_are_exact_float16():
    widths = np.array([1, 1, 1, 2, 4], np.uint8)
    top4 = [-127 * 2.0 ** 9] + [0] * 14 + [127 * 2.0 ** 9]
    books = np.array([2.0 ** -24, 31 * 2.0 ** -24, -31 * 2.0 ** 11, 31 * 2.0 ** 11, 0, 0, 0, 0, 0, 0] + top4, np.float16)
    levels, exponents = encode_levels(books, widths, "t")
    assert exponents.tolist() == [MIN_EXPONENT, 11, 11, 11, 9]
    assert [max_exponent(w) for w in (1, 2, 4)] == [11, 11, 9] and [level_limit(w) for w in (1, 2, 4)] == [31, 31, 127]
    assert decode_levels(levels, exponents, widths, "t").tobytes() == books.tobytes()
    assert np.isfinite(decode_levels(levels, exponents, widths, "t")).all()


def test_bits_per_codebook():
    assert [codebook_bits(w) for w in (1, 2, 4)] == [20, 32, 136]  # float16: 32, 64, 256


def test_grid_exponents_reach_the_largest_level():
    absmax = np.array([0.0, 1.0, 31.0, 31.5, 1e-9, 1e6])
    e = grid_exponents(absmax, 2)
    assert e.tolist() == [MIN_EXPONENT, -4, 0, 1, MIN_EXPONENT, 11]
    assert np.all(absmax[1:4] <= 31 * 2.0 ** e[1:4])
    assert grid_exponents(np.array([127.0, 127.5, 1e6]), 4).tolist() == [0, 1, 9]


@pytest.mark.parametrize("books, why", [
    ([0.1, 0.3], "float16-rounded"),  # not k * 2**e with |k| <= 31
    ([-33.0, 1.0], "needs 33"),
    ([-0.0, 1.0], "negative zero"),
    ([1.0, 65504.0], "beyond 31 * 2**11"),
])
def test_encoder_refuses_levels_off_the_grid(books, why):
    with pytest.raises(ValueError, match="row 1's levels .* are not 6-bit integers"):
        encode_levels(np.array([-1.0, 1.0] + books, np.float16), np.array([1, 1], np.uint8), "t")


def test_four_bit_rows_take_8_bit_levels_and_no_more():
    row = np.arange(-8, 8) * 9.0  # k up to 63 * 2**0: fine at 8 bits, would need 7
    levels, exponents = encode_levels(row.astype(np.float16), np.array([4], np.uint8), "t")
    assert levels.size == 16 and exponents.tolist() == [0]
    with pytest.raises(ValueError, match="row 0's levels .* are not 8-bit integers"):
        encode_levels(np.array([-129.0] + [0.0] * 15, np.float16), np.array([4], np.uint8), "t")


def test_decoder_refuses_bad_tensors():
    widths = np.array([1, 2], np.uint8)
    levels, exponents = encode_levels(np.array([-1, 1, -2, -1, 0, 3], np.float16), widths, "t")
    decode_levels(levels, exponents, widths, "t")
    cases = {
        "expected uint8 \\[5\\]": (levels[:-1], exponents),
        "expected int8 \\[2\\]": (levels, exponents.astype(np.int16)),
        "expected int8 \\[2\\] \\(one per row\\)": (levels, exponents[:1]),
        "row 0's level exponent is -25, expected -24..11 for a 1-bit row": (levels, np.array([-25, 0], np.int8)),
        "row 1's level exponent is 12, expected -24..11 for a 2-bit row": (levels, np.array([0, 12], np.int8)),
    }
    padded = levels.copy()
    padded[-1] |= 0x80  # 6 levels = 36 bits: the last byte's top 4 bits are padding
    cases["nonzero padding"] = (padded, exponents)
    minus32 = encode_levels(np.array([-1, 1, -2, -1, 0, 3], np.float16), widths, "t")[0].copy()
    minus32[0] = (minus32[0] & 0xC0) | 0x20  # first level: 6-bit 100000 = -32
    cases["row 0 has the level -32, expected integers in -31..31"] = (minus32, exponents)
    descending = encode_levels(np.array([-1, 1, -2, -1, 0, 3], np.float16), widths, "t")[0].copy()
    descending[0] = (descending[0] & 0xC0) | 0x05  # first level 5 > the row's second (1)
    cases["not in ascending order"] = (descending, exponents)
    for message, (lv, ex) in cases.items():
        with pytest.raises(BlobContentError, match=message):
            decode_levels(lv, ex, widths, "t")
    # A 4-bit row: 8-bit levels, -128 refused, exponents up to 9.
    four = np.array([4], np.uint8)
    levels, exponents = encode_levels((np.arange(-8, 8) * 8.0).astype(np.float16), four, "t")
    with pytest.raises(BlobContentError, match="row 0's level exponent is 10, expected -24..9 for a 4-bit row"):
        decode_levels(levels, np.array([10], np.int8), four, "t")
    low = levels.copy()
    low[0] = 0x80
    with pytest.raises(BlobContentError, match="row 0 has the level -128, expected integers in -127..127"):
        decode_levels(low, exponents, four, "t")


# --- whole files -----------------------------------------------------------------------------------------------
def test_integer_level_file_is_version_4_smaller_and_decodes_as_the_float16_one(tmp_path):
    lay, dense = grid_layers(), dense_tensors()
    meta = {**META, "aliases": ALIASES}
    f16 = write_quantized_base(tmp_path / "f16.safetensors", lay, dense, meta)
    i6 = write_quantized_base(tmp_path / "i6.safetensors", lay, dense, meta, codebook_format="int")
    header = parse_header(i6.read_bytes(), i6.stat().st_size, "t")
    assert header.metadata["format_version"] == "4"
    names = {t for t in header.tensors if t.startswith("model.layers.0.q_proj.")}
    assert names == {f"model.layers.0.q_proj.{t}" for t in ("codes", "scales", "widths", "levels", "level_exponents")}
    a, b = read_quantized_base(f16), read_quantized_base(i6)
    assert (a.codebook_format, b.codebook_format) == ("float16", "int")
    assert a.fingerprint == b.fingerprint == quantized_fingerprint(lay)
    for name, qw in lay.items():
        for field in ("widths", "codes", "codebooks", "scales"):
            assert getattr(b.layers[name], field).tobytes() == getattr(qw, field).tobytes(), (name, field)
    sa, sb = a.dequantized_state_dict(), b.dequantized_state_dict()
    assert all(sa[k].tobytes() == sb[k].tobytes() for k in sa)
    # Each row's codebook: 6 bits a level and an 8-bit exponent instead of 16 bits a level.
    levels = sum(int((1 << qw.widths.astype(int)).sum()) for qw in lay.values())
    rows = sum(qw.out_features for qw in lay.values())
    assert b.bits_report()["bytes"]["codebooks"] == sum(packed_level_bytes(q.widths) for q in lay.values()) + rows
    assert a.bits_report()["bytes"]["codebooks"] == 2 * levels
    assert sum(b.bits_report()["bytes"].values()) == i6.stat().st_size
    assert b.to_bytes() == i6.read_bytes()  # what was read writes back byte for byte
    assert serialized_size(lay, dense, b.metadata, codebook_format="int") == (i6.stat().st_size, b.header_bytes)


def test_header_bound_holds_for_integer_level_files():
    lay, dense = grid_layers(1), dense_tensors()
    meta = {**META, "aliases": ALIASES}
    table = [(n, q.out_features, q.in_features, q.group_size) for n, q in lay.items()]
    bound = header_bytes_bound(table, dense, meta, codebook_format="int")
    assert serialized_size(lay, dense, meta, codebook_format="int")[1] <= bound
    for q in lay.values():  # every row at 4 bits: the bound is exact
        q.widths = np.full(q.out_features, 4, np.uint8)
        q.codes = np.zeros(q.out_features * ((q.in_features * 4 + 7) // 8), np.uint8)
        q.codebooks = np.tile(np.arange(-8, 8, dtype=np.float16), q.out_features)
    assert serialized_size(lay, dense, meta, codebook_format="int")[1] == bound


def test_writer_refuses_levels_off_the_grid_naming_the_module():
    lay = grid_layers()
    lay["model.layers.0.down_proj"] = random_layer(np.random.default_rng(5), 4, 37, 8)[0]  # float16 Lloyd-like levels
    with pytest.raises(ValueError, match="module 'model.layers.0.down_proj': row .* not [68]-bit integers"):
        build_quantized_base_bytes(lay, dense_tensors(), {**META, "aliases": ALIASES}, codebook_format="int")
    with pytest.raises(ValueError, match="codebook_format must be one of"):
        build_quantized_base_bytes(lay, dense_tensors(), META, codebook_format="int8")


@pytest.mark.parametrize("compressed", [False, True])
def test_integer_level_base_with_a_recovery_adapter(tmp_path, compressed):
    lay, dense = grid_layers(), dense_tensors()
    recovery = recovery_for(lay)
    if compressed:  # the adapter blob form (version 3's), here inside a version-4 file
        modules = {name: (w.out_features, w.in_features) for name, w in list(lay.items())[:2]}
        recovery = Recovery.from_blob(recovery_blob(modules, fingerprint=quantized_fingerprint(lay)))
    data = build_quantized_base_bytes(lay, dense, {**META, "aliases": ALIASES}, recovery=recovery,
                                      codebook_format="int")
    path = tmp_path / "r.safetensors"
    path.write_bytes(data)
    got = read_quantized_base(path)
    assert parse_header(data, len(data), "t").metadata["format_version"] == "4"
    assert got.codebook_format == "int" and got.recovery is not None
    assert (got.recovery.blob is not None) == compressed
    plain_f16 = build_quantized_base_bytes(lay, dense, {**META, "aliases": ALIASES}, recovery=recovery)
    (tmp_path / "f.safetensors").write_bytes(plain_f16)
    same = read_quantized_base(tmp_path / "f.safetensors")
    assert got.fingerprint == same.fingerprint == quantized_fingerprint(lay, got.recovery)
    sd, ref = got.dequantized_state_dict(), same.dequantized_state_dict()
    assert all(sd[k].tobytes() == ref[k].tobytes() for k in sd)
    assert got.to_bytes() == data
    # A version-4 file whose recovery metadata went missing is refused, not read as a plain base.
    meta = dict(parse_header(data, len(data), "t").metadata)
    del meta["recovery"]
    rewrite(path, {k: np.array(v) for k, v in read_tensors(path).items()}, meta)
    with pytest.raises(BlobContentError, match="version-4 base needs the 'recovery' metadata"):
        read_quantized_base(path)


def rewrite(path, tensors, meta):
    """``path`` rewritten with these tensors and metadata, its checksum recomputed (the fingerprint is not)."""
    from lowra.device_runtime.formats.container import payload_digest, serialize

    meta = dict(meta)
    meta["payload_sha256"] = payload_digest(tensors, meta)
    path.write_bytes(serialize(tensors, meta))


def read_tensors(path):
    from lowra.device_runtime.formats.container import memmap_tensors
    from lowra.device_runtime.formats.quantized_base import LIMITS

    return memmap_tensors(path, LIMITS)[1]


def test_mixed_layouts_are_refused(tmp_path):
    lay, dense = grid_layers(), dense_tensors()
    i6 = write_quantized_base(tmp_path / "i6.safetensors", lay, dense, {**META, "aliases": ALIASES},
                              codebook_format="int")
    tensors = {k: np.array(v) for k, v in read_tensors(i6).items()}
    meta = dict(parse_header(i6.read_bytes(), i6.stat().st_size, "t").metadata)

    def put(tensors, **changes):
        rewrite(i6, tensors, {**meta, **changes})

    name = "model.layers.0.q_proj"
    put({**tensors, f"{name}.codebooks": lay[name].codebooks})
    with pytest.raises(BlobContentError, match="version-4 base stores codebooks as integer levels, but module "
                                               "'model.layers.0.q_proj' also has"):
        read_quantized_base(i6)
    put({k: v for k, v in tensors.items() if k != f"{name}.level_exponents"})
    with pytest.raises(BlobContentError, match="lacks tensors \\['model.layers.0.q_proj.level_exponents'\\]"):
        read_quantized_base(i6)
    put(tensors, format_version="1")  # int tensors under a float16 version: codebooks missing
    with pytest.raises(BlobContentError, match="lacks tensors \\['model.layers.0.q_proj.codebooks'\\]"):
        read_quantized_base(i6)
    f16 = {k: v for k, v in tensors.items()}
    f16[f"{name}.codebooks"] = lay[name].codebooks
    put(f16, format_version="1")
    with pytest.raises(BlobContentError, match="version-1 base stores codebooks as float16, but module"):
        read_quantized_base(i6)
    bad = dict(tensors)
    bad[f"{name}.level_exponents"] = np.full(6, 12, np.int8)
    put(bad)
    with pytest.raises(BlobContentError, match="module 'model.layers.0.q_proj': row 0's level exponent is 12"):
        read_quantized_base(i6)

"""Fuzzing every reader with a fixed budget (issue 12): no foreign exception, no hang, no accepted change, no
memory that follows what a header announces. Seeds, mutators and the classifier: tests/fuzz_mutations.py; the long
run: bench/fuzz_formats.py. The findings tests at the end reproduce, one each, what the fuzzer found."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lowra.device_runtime.errors import (
    BlobContentError,
    LowraError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats import parse_blob, signed
from lowra.device_runtime.formats.bitpack import decode_widths
from lowra.device_runtime.formats.int_levels import decode_levels, level_limit, packed_level_bytes
from lowra.device_runtime.formats.quantized_base import (
    parse_quantized_base,
    read_quantized_base,
)
from lowra.device_runtime.trust import TrustPolicy, open_quantized_base
from lowra.sdk.signing import sign_bytes

from tests.device_runtime.conftest import make_blob_bytes
from tests.fuzz_mutations import (
    BUGS,
    DERIVED_CLAIMS,
    NOW,
    FuzzContext,
    Keys,
    base_seed_bytes,
    join,
    layer_codebooks,
    level_bits,
    level_ints,
    raw_public_key,
    rechecksum,
    split,
    store_level_ints,
    tensors_of,
)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> FuzzContext:
    return FuzzContext(tmp_path_factory.mktemp("fuzz"))


def _report(ctx: FuzzContext, runs: list[tuple[str, str, int]]) -> list[str]:
    """Every bug among ``runs`` (seed name, mutation name, rng seed), one line each."""
    by_name = {(s.name, m.name): (s, m) for s, m in ctx.cases()}
    bugs = []
    for seed_name, mutation_name, rng_seed in runs:
        seed, mutation = by_name[seed_name, mutation_name]
        _, result = ctx.run(seed, mutation, rng_seed)
        if result.is_bug:
            bugs.append(f"{seed_name} / {mutation_name} / rng {rng_seed}: {result.outcome} {result.error[:160]} "
                        f"({result.seconds:.3f} s, {result.peak_bytes} B)")
    return bugs


def test_seeds_are_accepted_as_themselves(ctx):
    assert {s.family for s in ctx.seeds.values()} == {"blob", "base"}
    assert any(s.signed for s in ctx.seeds.values()) and any(s.encrypted for s in ctx.seeds.values())
    # Every base mutation runs on both layouts: float16 codebooks (version 1) and integer levels (version 4).
    versions = {s.name: split(s.data)[0]["__metadata__"]["format_version"] for s in ctx.seeds.values()
                if s.family == "base" and not s.signed}
    assert versions == {"base": "1", "base-int": "4"}


def test_every_mutation_of_every_seed_once(ctx):
    bugs = _report(ctx, [(s.name, m.name, 0) for s, m in ctx.cases()])
    assert not bugs, f"{len(bugs)} bugs:\n" + "\n".join(bugs)


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                     HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations(ctx, data):
    seed, mutation = data.draw(st.sampled_from(ctx.cases()), label="case")
    rng_seed = data.draw(st.integers(0, 2**32 - 1), label="rng")
    _, result = ctx.run(seed, mutation, rng_seed)
    assert result.outcome not in BUGS, f"{seed.name} / {mutation.name} / rng {rng_seed}: {result}"


def test_valid_edits_are_reached(ctx):
    """The harness itself: re-checksummed valid edits are accepted (so the semantic checks are really reached past
    the checksum), and the byte mutations are refused."""
    by_name = {(s.name, m.name): (s, m) for s, m in ctx.cases()}
    for seed_name, mutation_name, expected in [
        ("blob", "sum:level_nudge", "valid-edit-accepted"),
        ("base", "sum:dense_edit", "valid-edit-accepted"),
        ("blob-signed", "resigned/sum:code_byte", "valid-edit-accepted"),
        ("blob", "sum:unsorted_codebook", "refused"),
        ("base-signed", "untrusted_key", "refused"),
        ("base-int", "sum:dense_edit", "valid-edit-accepted"),
        ("base-int", "sum:base_code_byte", "valid-edit-accepted"),
        ("base-int", "sum:base_level_edit", "valid-edit-accepted"),
        ("base", "sum:base_level_edit", "valid-edit-accepted"),
        ("base-int", "sum:base_unsorted_codebook", "refused"),
        ("base-int", "sum:base_level_padding", "refused"),
    ]:
        seed, mutation = by_name[seed_name, mutation_name]
        assert ctx.run(seed, mutation, 0)[1].outcome == expected, (seed_name, mutation_name)


def test_integer_level_mutators_follow_each_row_width(ctx):
    """The version-4 level mutators, whose edges follow each row's width (exponents to 11 or 9, integers to 31 or
    127): an exponent or an integer past its row's range, a padding bit and a reversed row are refused, a move within
    the range is accepted, over 24 draws each (or the file is left as it was)."""
    by_name = {(s.name, m.name): (s, m) for s, m in ctx.cases()}
    for mutation_name, expected in [("sum:base_nonfinite", "refused"), ("sum:base_level_padding", "refused"),
                                    ("sum:base_unsorted_codebook", "refused"),
                                    ("sum:base_level_edit", "valid-edit-accepted")]:
        seed, mutation = by_name["base-int", mutation_name]
        outcomes = {ctx.run(seed, mutation, rng_seed)[1].outcome for rng_seed in range(24)}
        # accepted-same: no change made (base_nonfinite on an ungrouped layer's empty scales, an integer redrawn)
        assert expected in outcomes and outcomes <= {expected, "accepted-same"}, (mutation_name, outcomes)


def test_level_stream_helpers_agree_with_int_levels():
    """The mutators' lenient reader and writer of a layer's ``levels`` (tests/fuzz_mutations.py) read and write the
    seed's streams as int_levels does: 6-bit and 8-bit levels, 8-bit ones straddling bytes, padding bits."""
    tensors, meta = tensors_of(base_seed_bytes(codebook_format="int"))
    widths_seen, straddling = set(), False
    for name, out_f, _, _ in json.loads(meta["modules"]):
        widths = decode_widths(tensors[f"{name}.widths"], out_f)
        levels, exponents = tensors[f"{name}.levels"], tensors[f"{name}.level_exponents"]
        ints = level_ints(tensors, name, widths)
        books = decode_levels(levels, exponents, widths, name)
        counts = 1 << widths.astype(np.int64)
        assert np.array_equal(ints * np.exp2(np.repeat(exponents.astype(np.int64), counts)), books.astype(np.float64))
        assert np.array_equal(layer_codebooks(tensors, name, widths), books)
        copy = dict(tensors)
        store_level_ints(copy, name, ints, widths)
        assert copy[f"{name}.levels"].tobytes() == levels.tobytes()
        assert copy[f"{name}.levels"].size == packed_level_bytes(widths)
        assert np.abs(ints[np.repeat(widths, counts) == 4]).max() > level_limit(2)  # 8-bit levels needed
        starts = np.cumsum(level_bits(widths)) - level_bits(widths)
        straddling |= bool(np.any((starts % 8 != 0) & (level_bits(widths) == 8)))
        widths_seen |= set(widths.tolist())
    assert widths_seen == {1, 2, 4} and straddling


# ----------------------------------------------------------------------------------------------- findings
# One test per finding in the fuzz run (/tmp/work/fuzz_findings.md); each fails until its reader is fixed.
def _base_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "base.safetensors"
    path.write_bytes(data)
    return path


def test_finding_1_zero_size_tensor_with_huge_dims_is_refused(tmp_path):
    # Finding 1: a tensor of 0 bytes whose dims multiply past int64 ([2**32, 2**32, 0]) passes parse_header (the
    # product is 0) and numpy's reshape raises ValueError in tensor_from_buffer.
    header, body = split(base_seed_bytes())
    header["extra"] = {"dtype": "U8", "shape": [1 << 32, 1 << 32, 0], "data_offsets": [len(body), len(body)]}
    with pytest.raises(LowraError):
        read_quantized_base(_base_file(tmp_path, join(header, body)))


@pytest.mark.parametrize("version", [" 1", "1 ", "01", "+1", "\u0661"])
def test_finding_2_non_canonical_format_version_is_refused(tiny_base, version):
    # Finding 2: check_envelope reads format_version with int(), which accepts spaces, a sign, leading zeros and
    # non-ASCII digits; a re-checksummed blob with one of them is accepted as version 1.
    tensors, meta = tensors_of(make_blob_bytes(tiny_base))
    meta["format_version"] = version
    with pytest.raises(UnsupportedFormatError):
        parse_blob(rechecksum(tensors, meta))


def test_finding_3_json_number_overflowing_to_infinity_is_refused():
    # Finding 3: decode_json_metadata refuses NaN and Infinity literals, but 1e999 overflows to float('inf') and
    # is accepted (in card, scheme, lora or report).
    tensors, meta = tensors_of(base_seed_bytes())
    meta["report"] = '{"error":1e999}'
    with pytest.raises(BlobContentError):
        parse_quantized_base(rechecksum(tensors, meta))


def test_finding_4_header_length_does_not_size_an_allocation(tmp_path):
    # Finding 4: read_header reads fh.read(n) for an announced header length n (up to the 16 MiB base limit)
    # before comparing n with the file size, so a 2 KB file with a 16 MiB length field allocates 16 MiB.
    data = base_seed_bytes()
    path = _base_file(tmp_path, (16 << 20).to_bytes(8, "little") + data[8:])
    tracemalloc.start()
    try:
        with pytest.raises(LowraError):
            read_quantized_base(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"refusing a {len(data)} B file cost {peak} B"


def test_finding_5_signed_base_claims_name_its_own_fingerprint(tmp_path):
    # Finding 5: open_quantized_base checks the claims' subject and base_content against the file inside, not
    # base_fingerprint; a base signed with a base_fingerprint claim of another base is accepted.
    keys = Keys()
    good = sign_bytes(base_seed_bytes(), keys.trusted, now=NOW, sequence=1)
    envelope = signed.open_envelope(good, raw_public_key(keys.trusted))
    claims = {k: v for k, v in envelope.claims.items() if k not in DERIVED_CLAIMS}
    claims["base_fingerprint"] = "sha256:" + "1" * 64
    forged = signed.seal(bytes(envelope.payload), claims, keys.trusted)
    policy = TrustPolicy(trusted_keys={keys.trusted_id: raw_public_key(keys.trusted)}, clock=lambda: NOW)
    with pytest.raises(LowraError):
        open_quantized_base(_base_file(tmp_path, forged), policy)


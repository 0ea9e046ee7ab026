"""The quantized-base file (lowra-base v1): decode formula, worked example, round trip, refusals, no torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_with_blocked_imports
from lowra.device_runtime.errors import (
    BlobContentError,
    BlobTruncatedError,
    ChecksumMismatchError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats import pack_codes, packed_bytes, payload_digest
from lowra.device_runtime.formats.quantized_base import (
    build_quantized_base_bytes,
    header_bytes_bound,
    layer_tensors,
    quantized_fingerprint,
    read_quantized_base,
    serialized_size,
    write_quantized_base,
)
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.formats.container import parse_header, serialize

CREATED = "2026-01-01T00:00:00+00:00"
META = {"source": "test", "group_size": 4, "scheme": {"method": "test"}, "report": {}, "created": CREATED}


def example_layer() -> QuantizedWeight:
    """The worked example of docs/FORMAT.md (Quantized base)."""
    return QuantizedWeight(
        out_features=3, in_features=5, group_size=4,
        widths=np.array([1, 2, 4], np.uint8),
        codes=np.array([0x0D, 0xE4, 0x03, 0x0F, 0x87, 0x01], np.uint8),
        codebooks=np.array([-1, 1, -1, -0.25, 0.25, 1] + [(i - 8) / 8 for i in range(16)], np.float16),
        scales=np.array([[0.5, 2], [1, 0.25], [4, 0]], np.float16),
    )


def random_layer(rng: np.random.Generator, out: int, n_in: int, group: int) -> tuple[QuantizedWeight, np.ndarray, np.ndarray]:
    """A valid layer from random indices/levels/scales, with the indices and per-row levels it was built from."""
    widths = rng.choice([1, 2, 4], out).astype(np.uint8)
    idx = [rng.integers(0, 1 << w, n_in).astype(np.uint8) for w in widths]
    levels = [np.sort(rng.standard_normal(1 << w)).astype(np.float16) for w in widths]
    codes = np.concatenate([pack_codes(i[None, :], int(w))[0] for i, w in zip(idx, widths)])
    n_groups = -(-n_in // group) if group else 0
    scales = rng.uniform(0, 2, (out, n_groups)).astype(np.float16)
    if n_groups:
        scales[0, -1] = 0  # a zero group decodes to zeros
    qw = QuantizedWeight(out, n_in, group, widths, codes, np.concatenate(levels), scales)
    return qw, np.stack(idx), levels


def direct_decode(qw: QuantizedWeight, idx: np.ndarray, levels: list[np.ndarray]) -> np.ndarray:
    """The decode formula written element by element, in float64."""
    out = np.zeros((qw.out_features, qw.in_features))
    for r in range(qw.out_features):
        for j in range(qw.in_features):
            s = float(qw.scales[r, j // qw.group_size]) if qw.group_size else 1.0
            out[r, j] = float(levels[r][idx[r, j]]) * s
    return out


def test_worked_example_numbers():
    qw = example_layer()
    qw.validate()
    expected = [[0.5, -0.5, 0.5, 0.5, -2], [-1, -0.25, 0.25, 1, 0.25], [3.5, -4, -0.5, 0, 0]]
    np.testing.assert_array_equal(qw.dequantize(), np.array(expected, np.float32))
    t = layer_tensors("layer", qw)
    assert t["layer.codes"].tobytes().hex() == "0de4030f8701"
    assert t["layer.widths"].tobytes().hex() == "39"
    assert t["layer.scales"].tobytes().hex() == "00380040003c003400440000"
    assert t["layer.codebooks"].shape == (22,)
    assert quantized_fingerprint({"layer": qw}) == (
        "sha256:6108dcbd2a27fe8e7e3a64d70114398857ef32ed653ccd39e193945ec02ea6e1"
    )
    assert qw.storage_bits() == 8 * (6 + 44 + 12) + 2 * 3
    assert qw.code_bits() == 5 * (1 + 2 + 4)


@pytest.mark.parametrize("out, n_in, group", [(7, 70, 32), (5, 64, 64), (4, 9, 4), (6, 33, 0), (3, 5, 128)])
def test_dequantize_equals_direct_formula(out, n_in, group):
    qw, idx, levels = random_layer(np.random.default_rng(out * n_in + group), out, n_in, group)
    qw.validate()
    np.testing.assert_allclose(qw.dequantize(), direct_decode(qw, idx, levels), rtol=0, atol=0)
    if group:
        zero_group = slice((qw.n_groups - 1) * group, n_in)
        assert np.all(qw.dequantize()[0, zero_group] == 0)


def dense_tensors() -> dict[str, np.ndarray]:
    return {
        "model.embed_tokens.weight": np.arange(24, dtype=np.float16).reshape(6, 4) / 8,
        "model.norm.weight": np.ones(4, np.float16),
        "model.position_ids": np.arange(5, dtype=np.int64),
    }


def layers(rng: np.random.Generator) -> dict[str, QuantizedWeight]:
    return {
        "model.layers.0.q_proj": random_layer(rng, 6, 20, 8)[0],
        "model.layers.0.down_proj": random_layer(rng, 4, 37, 8)[0],
        "model.layers.1.q_proj": random_layer(rng, 6, 20, 0)[0],
    }


def write(tmp_path: Path, name: str = "base.safetensors", **meta) -> tuple[Path, dict, dict]:
    lay, dense = layers(np.random.default_rng(0)), dense_tensors()
    metadata = {**META, "aliases": {"lm_head.weight": "model.embed_tokens.weight"}, **meta}
    path = write_quantized_base(tmp_path / name, lay, dense, metadata)
    return path, lay, dense


def test_round_trip_is_bit_exact(tmp_path):
    path, lay, dense = write(tmp_path)
    base = read_quantized_base(path)
    assert list(base.layers) == list(lay)  # model order kept
    for name, qw in lay.items():
        got = base.layers[name]
        for field in ("widths", "codes", "codebooks", "scales"):
            a, b = getattr(qw, field), getattr(got, field)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (name, field)
        assert got.group_size == qw.group_size
    assert set(base.dense) == set(dense)
    for k, v in dense.items():
        assert base.dense[k].tobytes() == v.tobytes() and base.dense[k].dtype == v.dtype
    assert base.fingerprint == quantized_fingerprint(lay)
    assert base.metadata["scheme"] == {"method": "test"} and base.metadata["created"] == CREATED
    assert base.file_bytes == path.stat().st_size
    # Writing what was read reproduces the file byte for byte.
    assert base.to_bytes() == path.read_bytes()
    assert serialized_size(lay, dense, base.metadata) == (path.stat().st_size, base.header_bytes)

    sd = base.dequantized_state_dict()
    for name, qw in lay.items():
        np.testing.assert_array_equal(sd[f"{name}.weight"], qw.dequantize())
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert sd["model.norm.weight"].dtype == np.float32 and sd["model.position_ids"].dtype == np.int64


def test_bits_report_counts_every_byte(tmp_path):
    path, lay, dense = write(tmp_path)
    report = read_quantized_base(path).bits_report()
    n = sum(q.out_features * q.in_features for q in lay.values())
    dense_bytes = sum(a.nbytes for a in dense.values())
    assert report["n_quantized_params"] == n
    assert report["effective_bits"] == pytest.approx(8 * (path.stat().st_size - dense_bytes) / n)
    parts = report["bytes"]
    assert sum(parts.values()) == path.stat().st_size
    assert parts["widths"] == (6 + 3) // 4 + (4 + 3) // 4 + (6 + 3) // 4
    assert sum(report["width_histogram"].values()) == 16


def test_header_bound_holds_and_is_exact_at_four_bits(tmp_path):
    rng = np.random.default_rng(3)
    lay, dense = layers(rng), dense_tensors()
    table = [(n, q.out_features, q.in_features, q.group_size) for n, q in lay.items()]
    bound = header_bytes_bound(table, dense, META)
    _, head = serialized_size(lay, dense, META)
    assert head <= bound
    all4 = {}
    for n, q in lay.items():
        idx = rng.integers(0, 16, (q.out_features, q.in_features))
        levels = np.tile(np.linspace(-1, 1, 16).astype(np.float16), q.out_features)
        all4[n] = QuantizedWeight(q.out_features, q.in_features, q.group_size, np.full(q.out_features, 4, np.uint8),
                                  pack_codes(idx, 4).ravel(), levels, q.scales)
    assert serialized_size(all4, dense, META)[1] == bound


def corrupt(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bit_is_refused(tmp_path):
    path, *_ = write(tmp_path)
    corrupt(path, 40)  # inside the dense data: only the payload checksum can see it
    with pytest.raises(ChecksumMismatchError, match="corrupted or was modified"):
        read_quantized_base(path)


def test_tampered_layer_with_recomputed_checksum_fails_fingerprint(tmp_path):
    path, lay, dense = write(tmp_path)
    header = parse_header(path.read_bytes(), path.stat().st_size, "t")
    meta = dict(header.metadata)
    name = "model.layers.0.q_proj"
    tensors = {**{k: v for n, q in lay.items() for k, v in layer_tensors(n, q).items()}, **dense}
    tensors[f"{name}.codes"] = tensors[f"{name}.codes"] ^ np.uint8(1)
    meta["payload_sha256"] = payload_digest(tensors, meta)  # an attacker who fixes the checksum
    path.write_bytes(serialize(tensors, meta))
    with pytest.raises(ChecksumMismatchError, match="quantized layers hash to"):
        read_quantized_base(path)


def test_truncated_file_is_refused(tmp_path):
    path, *_ = write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(BlobTruncatedError, match="truncated"):
        read_quantized_base(path)
    path.write_bytes(data[:5])
    with pytest.raises(BlobTruncatedError):
        read_quantized_base(path)


def rewrite_metadata(path: Path, **changes) -> None:
    """Rewrite metadata keys and re-seal the checksum, as a newer writer would."""
    _, tensors = __import__("lowra.device_runtime.formats.container", fromlist=["x"]).memmap_tensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    meta = dict(parse_header(path.read_bytes(), path.stat().st_size, "t").metadata)
    meta.update(changes)
    meta["payload_sha256"] = payload_digest(tensors, meta)
    path.write_bytes(serialize(tensors, meta))


def test_other_format_and_future_version_are_refused(tmp_path):
    path, *_ = write(tmp_path)
    rewrite_metadata(path, format_version="5")
    with pytest.raises(UnsupportedFormatError, match="version '5' is not supported.*reads versions \\[1, 2, 3, 4\\]"):
        read_quantized_base(path)
    rewrite_metadata(path, format="lowra-adapter", format_version="1")
    with pytest.raises(UnsupportedFormatError, match="not a lowra quantized base"):
        read_quantized_base(path)


def test_inconsistent_layers_are_refused(tmp_path):
    path, lay, dense = write(tmp_path)
    modules = json.loads(parse_header(path.read_bytes(), path.stat().st_size, "t").metadata["modules"])
    modules[0][2] += 1  # one more input than its codes hold (same number of groups: 21 / 8 -> 3)
    rewrite_metadata(path, modules=json.dumps(modules, separators=(",", ":")))
    with pytest.raises(BlobContentError, match="codes has .* entries, widths imply"):
        read_quantized_base(path)


def test_width_zero_and_missing_tensor_are_refused(tmp_path):
    path, lay, dense = write(tmp_path)
    _, tensors = __import__("lowra.device_runtime.formats.container", fromlist=["x"]).memmap_tensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    meta = dict(parse_header(path.read_bytes(), path.stat().st_size, "t").metadata)
    bad = dict(tensors)
    bad["model.layers.0.q_proj.widths"] = np.zeros_like(bad["model.layers.0.q_proj.widths"])
    meta["payload_sha256"] = payload_digest(bad, meta)
    path.write_bytes(serialize(bad, meta))
    with pytest.raises(BlobContentError, match="rows of width 0"):
        read_quantized_base(path)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.q_proj.scales"}
    meta["payload_sha256"] = payload_digest(missing, meta)
    path.write_bytes(serialize(missing, meta))
    with pytest.raises(BlobContentError, match="lacks tensors"):
        read_quantized_base(path)


def test_writer_refuses_bad_input_and_overwrite(tmp_path):
    path, lay, dense = write(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_quantized_base(path, lay, dense, META)
    write_quantized_base(path, lay, dense, META, overwrite=True)
    with pytest.raises(BlobContentError, match="NaN or Inf"):
        build_quantized_base_bytes(lay, {"x": np.array([np.inf], np.float16)}, META)
    with pytest.raises(BlobContentError, match="alias"):
        build_quantized_base_bytes(lay, dense, {**META, "aliases": {"a": "not.stored"}})
    with pytest.raises(BlobContentError, match="collides"):
        build_quantized_base_bytes(lay, {"model.layers.0.q_proj.codes": np.zeros(1, np.float16)}, META)
    broken = dict(lay)
    q = lay["model.layers.0.q_proj"]
    broken["model.layers.0.q_proj"] = QuantizedWeight(q.out_features, q.in_features, q.group_size, q.widths,
                                                      q.codes[:-1], q.codebooks, q.scales)
    with pytest.raises(BlobContentError, match="codes has"):
        build_quantized_base_bytes(broken, dense, META)


def test_reader_never_imports_torch(tmp_path):
    path, lay, _ = write(tmp_path)
    expected = lay["model.layers.0.down_proj"].dequantize()
    np.save(tmp_path / "expected.npy", expected)
    out = run_with_blocked_imports(
        f"""
        import numpy as np
        from lowra.device_runtime.formats.quantized_base import read_quantized_base
        base = read_quantized_base({str(path)!r})
        sd = base.dequantized_state_dict()
        assert np.array_equal(sd["model.layers.0.down_proj.weight"], np.load({str(tmp_path / 'expected.npy')!r}))
        print("ok", len(sd))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 7"


def test_packed_row_sizes_match_format():
    # Row r takes ceil(in * w / 8) bytes: the layout QuantizedWeight and the adapter codec share.
    qw = example_layer()
    assert list(np.diff(qw.row_code_offsets)) == [packed_bytes(5, 1), packed_bytes(5, 2), packed_bytes(5, 4)] == [1, 2, 3]


def recovery_for(lay: dict[str, QuantizedWeight], rank: int = 2, seed: int = 1) -> "Recovery":
    from lowra.device_runtime.formats.quantized_base import Recovery

    rng = np.random.default_rng(seed)
    factors = {name: (rng.normal(size=(rank, w.in_features)).astype(np.float16),
                      rng.normal(size=(w.out_features, rank)).astype(np.float16))
               for name, w in list(lay.items())[:2]}
    return Recovery(rank=rank, scaling=0.5, factors=factors, info={"plain_fingerprint": quantized_fingerprint(lay)})


def test_a_recovered_base_is_version_2_round_trips_and_decodes_with_the_delta(tmp_path):
    path, lay, dense = write(tmp_path)
    plain = read_quantized_base(path)
    recovered = plain.__class__(layers=plain.layers, dense=plain.dense, metadata=plain.metadata,
                                fingerprint="", aliases=plain.aliases, recovery=recovery_for(lay))
    out = recovered.write(tmp_path / "recovered.safetensors")
    got = read_quantized_base(out)
    assert parse_header(out.read_bytes(), out.stat().st_size, "t").metadata["format_version"] == "2"
    assert got.recovery is not None and got.recovery.rank == 2 and got.recovery.scaling == 0.5
    assert set(got.recovery.factors) == set(list(lay)[:2])
    assert got.recovery.info["plain_fingerprint"] == plain.fingerprint
    # The recovery is part of the base's identity; the plain base keeps its version-1 fingerprint and bytes.
    assert got.fingerprint == quantized_fingerprint(lay, got.recovery) != plain.fingerprint == quantized_fingerprint(lay)
    assert set(got.dense) == set(dense)  # recovery tensors are not dense model tensors
    assert got.to_bytes() == out.read_bytes()
    sd = got.dequantized_state_dict()
    for name, qw in lay.items():
        want = qw.dequantize()
        if name in got.recovery.factors:
            a, b = (x.astype(np.float64) for x in got.recovery.factors[name])
            want = want + 0.5 * (b @ a)
        np.testing.assert_allclose(sd[f"{name}.weight"], want, rtol=1e-5, atol=1e-5)
    report = got.bits_report()
    assert report["recovery_bytes"] == sum(a.nbytes + b.nbytes for a, b in got.recovery.factors.values())
    assert report["effective_bits_with_recovery"] > report["effective_bits"]


def test_recovery_data_is_checked(tmp_path):
    from lowra.device_runtime.formats.quantized_base import Recovery, build_quantized_base_bytes

    path, lay, dense = write(tmp_path)
    meta = {**META, "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}
    good = recovery_for(lay)
    name = next(iter(good.factors))
    a, b = good.factors[name]
    cases = {
        "rank": Recovery(rank=0, scaling=0.5, factors=good.factors),
        "scaling": Recovery(rank=2, scaling=float("nan"), factors=good.factors),
        "shape": Recovery(rank=2, scaling=0.5, factors={name: (a[:, :-1], b)}),
        "not a quantized layer": Recovery(rank=2, scaling=0.5, factors={"model.norm": (a, b)}),
        "NaN": Recovery(rank=2, scaling=0.5, factors={name: (np.full_like(a, np.nan), b)}),
    }
    for why, recovery in cases.items():
        with pytest.raises(BlobContentError):
            build_quantized_base_bytes(lay, dense, meta, recovery=recovery)
    # A version-1 file must not carry recovery data, and a version-2 one needs its metadata.
    out = tmp_path / "r.safetensors"
    out.write_bytes(build_quantized_base_bytes(lay, dense, meta, recovery=good))
    rewrite_metadata(out, format_version="1")
    with pytest.raises(BlobContentError, match="version-1 base carries recovery data"):
        read_quantized_base(out)
    rewrite_metadata(out, format_version="2", recovery=json.dumps({"modules": ["nope"], "rank": 2, "scaling": 0.5},
                                                                    separators=(",", ":")))
    with pytest.raises(BlobContentError, match="names module 'nope' but lacks"):
        read_quantized_base(out)


def test_recovered_weight_is_the_specified_float64_sum_bit_for_bit():
    """FORMAT.md: float32(decode + s * sum_k B[:, k] A[k, :]) in float64, k ascending: the bytes every runtime hashes."""
    from lowra.device_runtime.formats.quantized_base import recovered_weight

    rng = np.random.default_rng(7)
    a = (rng.standard_normal((5, 9)) * 3).astype(np.float16)
    b = (rng.standard_normal((4, 5)) * 1e-3).astype(np.float16)
    decoded = rng.standard_normal((4, 9)).astype(np.float32)
    got = recovered_weight(decoded, a, b, 0.375)
    for i in range(4):
        for j in range(9):
            acc = 0.0
            for k in range(5):
                acc += float(b[i, k]) * float(a[k, j])
            assert got[i, j].tobytes() == np.float32(float(decoded[i, j]) + 0.375 * acc).tobytes()

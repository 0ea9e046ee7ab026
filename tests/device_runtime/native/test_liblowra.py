"""liblowra (device_runtime/native) against the numpy reference: the same bytes in, the same weights and the same
refusals out. The CMake project is built once per module (about 25 s on 2 cores) into a temporary folder."""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.errors import BlobContentError, ChecksumMismatchError, LowraError
from lowra.device_runtime.formats.container import parse_header, serialize
from lowra.device_runtime.formats.int_levels import (
    LEVEL_BITS,
    MIN_EXPONENT,
    decode_levels,
    encode_levels,
    level_limit,
    max_exponent,
)
from lowra.device_runtime.formats.quantized_base import read_quantized_base, write_quantized_base
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.runtime import BaseWeights, DeviceRuntime

from tests.device_runtime.conftest import (
    CREATED,
    TINY_MODULES,
    make_blob_bytes,
    normal_levels,
    random_channels,
    recovery_blob,
    write_base,
)
from tests.device_runtime.native.liblowra import NATIVE_DIR, Liblowra, UserInfo
from tests.device_runtime.native.printable_table import TABLE, table_text

U = 2.0 ** -24  # unit roundoff of float32


@pytest.fixture(scope="module")
def native(build_dir) -> Liblowra:
    return Liblowra(build_dir / "liblowra.so")


# --- blobs and bases ------------------------------------------------------------------------------
def blob_for(base: Path | BaseWeights, levels_of, seed: int = 0, rank: int = 4, widths=(4, 2, 1, 0),
             adapter_id: str = "user-a", modules: dict | None = None) -> bytes:
    """A blob for ``base`` whose channel of width w gets codebook ``levels_of(rng, w)`` (ascending float16)."""
    rng = np.random.default_rng(seed)
    weights = base if isinstance(base, BaseWeights) else BaseWeights(base)
    modules = modules or {n[: -len(".weight")]: a.shape for n, a in weights.tensors.items()
                          if n.endswith(".weight") and a.ndim == 2}
    entries = [fmt.ModuleEntry(m, o, i, rank) for m, (o, i) in modules.items()]
    all_widths, codes, levels = random_channels(rng, entries, widths, levels_of)
    meta = {"adapter_id": adapter_id, "base_fingerprint": weights.fingerprint([e.name for e in entries]),
            "lora": {"rank": rank}, "scheme": {"method": "test"}, "created": CREATED, "card": {"task": "test"}}
    return fmt.build_blob_bytes(entries, all_widths, codes, levels, meta)


def dyadic_levels(rng: np.random.Generator, width: int) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: every product of two levels is a multiple of 2**-12 of magnitude <= 1, so
    every partial sum of up to 2**11 of them is exact in float32 and any summation order gives the same bits."""
    return np.sort(rng.choice(np.arange(-64, 65), 1 << width, replace=False) / 64).astype(np.float16)


def safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """A plain safetensors file from raw (dtype name, shape, bytes), for dtypes numpy cannot write (BF16)."""
    table, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header = json.dumps(table).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(d for _, _, d in tensors.values())


def grid_levels(rng: np.random.Generator, width: int) -> np.ndarray:
    """Ascending levels k * 2**e on version 4's integer grid (k in [-31, 31] for 1- and 2-bit rows, [-127, 127] for
    4-bit ones; e in [-24, max_exponent(width)]: subnormal float16 levels to 31 * 2**11 or 127 * 2**9), so a base of
    them can be written with codebook_format="int". Half the rows take an edge exponent (the lowest, the highest, or
    the highest but one: 10, above a 4-bit row's 9, on a 6-bit row)."""
    limit, top = level_limit(width), max_exponent(width)
    k = np.sort(rng.integers(-limit, limit + 1, 1 << width))
    e = rng.choice([MIN_EXPONENT, top - 1, top]) if rng.random() < 0.5 else rng.integers(MIN_EXPONENT, top + 1)
    return (k * 2.0 ** e).astype(np.float16) + np.float16(0)  # no -0.0


def write_quantized(path: Path, seed: int = 0, report: dict | None = None, codebook_format: str = "float16",
                    grid: bool | None = None) -> Path:
    """A quantized base with mixed widths, grouped and ungrouped layers, a tied head and an int64 buffer (and
    ``report`` as its report metadata). Its levels are on the integer grid (:func:`grid_levels`) when ``grid`` (by
    default: when ``codebook_format`` is "int", a version-4 file); the same ``seed`` and ``grid`` give the same
    layers in either format."""
    grid = codebook_format == "int" if grid is None else grid
    rng = np.random.default_rng(seed)
    layers = {}
    for name, (out, n_in), group in (("model.layers.0.q_proj", (6, 20), 8), ("model.layers.0.down_proj", (4, 37), 8),
                                     ("model.layers.1.q_proj", (6, 20), 0)):
        widths = rng.choice([1, 2, 4], out).astype(np.uint8)
        codes = np.concatenate([fmt.pack_codes(rng.integers(0, 1 << w, (1, n_in)).astype(np.uint8), int(w))[0]
                                for w in widths])
        books = np.concatenate([grid_levels(rng, int(w)) if grid else np.sort(rng.standard_normal(1 << w)).astype(np.float16)
                                for w in widths])
        n_groups = -(-n_in // group) if group else 0
        scales = rng.uniform(0, 2, (out, n_groups)).astype(np.float16)
        layers[name] = QuantizedWeight(out, n_in, group, widths, codes, books, scales)
    dense = {"model.embed_tokens.weight": (rng.standard_normal((6, 4)) * 3).astype(np.float16),
             "model.norm.weight": np.ones(4, np.float32), "model.position_ids": np.arange(5, dtype=np.int64)}
    meta = {"source": "test", "group_size": 8, "scheme": {"method": "test"}, "report": report or {}, "created": CREATED,
            "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}
    return write_quantized_base(path, layers, dense, meta, codebook_format=codebook_format)


def merge_tolerance(blob: fmt.Blob, module: str, reference: np.ndarray) -> np.ndarray:
    """What float32 order alone can change, element by element.

    Each product of two float16 levels is exact in float32 (22 significant bits), so a K-term sum in any order
    (numpy's BLAS blocks and may fuse; liblowra adds in component order) is within gamma_K * sum|products| of the
    exact sum (Higham, Accuracy and Stability, 3.1). Both results then take one rounding adding the base weight,
    each within u |result|. Two such results differ by at most 2 gamma_K S + 2 u |reference| (+ 1% for u^2 terms).
    """
    up, down = blob.all_factors(drop_empty=True)[module]
    k = up.shape[1]
    gamma = k * U / (1 - k * U)
    total = np.abs(up.astype(np.float64)) @ np.abs(down.astype(np.float64))
    return 1.01 * (2 * gamma * total + 2 * U * np.abs(reference.astype(np.float64))) + 2.0 ** -149


def assert_same_weights(native: Liblowra, handle, runtime: DeviceRuntime, blob: fmt.Blob | None = None,
                        exact: bool = True) -> None:
    """Every floating tensor of the numpy runtime equals liblowra's: bit for bit where ``blob`` merges nothing (or
    ``exact``), else within :func:`merge_tolerance`."""
    blob_modules = {m.name for m in blob.modules} if blob else set()
    for name, reference in runtime.weights().items():
        if not np.issubdtype(reference.dtype, np.floating):
            continue
        ours = native.weight(handle, name)
        reference = reference.astype(np.float32)
        assert ours.shape == reference.shape, name
        module = name[: -len(".weight")]
        if exact or module not in blob_modules:
            assert np.array_equal(ours, reference), name
        else:
            tol = merge_tolerance(blob, module, reference)
            assert np.all(np.abs(ours.astype(np.float64) - reference) <= tol), name
            assert np.mean(ours == reference) > 0.5, name  # most elements are bit-identical anyway


def load_both(native: Liblowra, handle, runtime: DeviceRuntime, blob: bytes) -> fmt.Blob:
    """Load ``blob`` into both runtimes; returns it parsed (for the tolerance of its merge)."""
    runtime.load_user(blob)
    info = native.load(handle, blob)
    assert info.adapter_id.decode() == runtime.user.adapter_id
    assert info.n_modules == len(runtime.user.modules)
    assert info.effective_bits == pytest.approx(runtime.user.effective_bits, rel=1e-12)
    return fmt.parse_blob(blob)


# --- tests ---------------------------------------------------------------------------------------
def test_printable_table_is_pythons():
    """The C++ name check accepts exactly the names str.isprintable() accepts on this interpreter."""
    assert TABLE.read_text() == table_text(), "regenerate: python -m tests.device_runtime.native.printable_table"


def test_model_folder_fingerprint_and_merge(native, tiny_base):
    runtime = DeviceRuntime(tiny_base)
    handle = native.open(tiny_base)
    try:
        modules = sorted(TINY_MODULES)
        assert native.fingerprint(handle, modules) == runtime.base.fingerprint(modules)
        assert native.tensor_names(handle) == list(runtime.base.tensors)
        load_both(native, handle, runtime, blob_for(tiny_base, dyadic_levels))
        assert_same_weights(native, handle, runtime)
        blob = load_both(native, handle, runtime, make_blob_bytes(tiny_base, seed=3))
        assert_same_weights(native, handle, runtime, blob, exact=False)
        for name in runtime.weights():
            if name.endswith(".weight"):
                assert native.digest(handle, name) == fmt.tensor_digest(runtime.weight(name))
    finally:
        native.close(handle)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_folders_are_widened_exactly(native, tmp_path, dtype):
    rng = np.random.default_rng(7)
    tensors, arrays = {}, {}
    for module, shape in TINY_MODULES.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if dtype == "F16":
            raw = values.astype(np.float16)
            tensors[f"{module}.weight"] = ("F16", shape, raw.tobytes())
        else:
            raw = (values.view(np.uint32) >> 16).astype(np.uint16)
            tensors[f"{module}.weight"] = ("BF16", shape, raw.tobytes())
        arrays[module] = raw
    tensors["model.position_ids"] = ("I64", (5,), np.arange(5, dtype=np.int64).tobytes())
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    runtime = DeviceRuntime(folder)
    handle = native.open(folder)
    try:
        assert native.fingerprint(handle, sorted(TINY_MODULES)) == runtime.base.fingerprint(sorted(TINY_MODULES))
        assert_same_weights(native, handle, runtime)
        with pytest.raises(ValueError, match="not floating point"):
            native.weight(handle, "model.position_ids")
        load_both(native, handle, runtime, blob_for(folder, dyadic_levels, seed=2))
        assert_same_weights(native, handle, runtime)
    finally:
        native.close(handle)


def test_quantized_base_decodes_bit_exactly(native, tmp_path):
    path = write_quantized(tmp_path / "base.safetensors")
    runtime = DeviceRuntime(path)
    handle = native.open(path)
    try:
        reference = read_quantized_base(path).dequantized_state_dict()
        assert sorted(native.tensor_names(handle)) == sorted(reference)
        for name, array in reference.items():
            if np.issubdtype(array.dtype, np.floating):
                assert np.array_equal(native.weight(handle, name), array), name
        modules = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.down_proj"]
        assert native.fingerprint(handle, modules) == runtime.base.fingerprint(modules)
        quantized_modules = {m: runtime.base.tensors[f"{m}.weight"].shape for m in modules}
        load_both(native, handle, runtime, blob_for(runtime.base, dyadic_levels, modules=quantized_modules))
        assert_same_weights(native, handle, runtime)
        blob = load_both(native, handle, runtime, blob_for(runtime.base, normal_levels, seed=5, modules=quantized_modules))
        assert_same_weights(native, handle, runtime, blob, exact=False)
    finally:
        native.close(handle)


def test_integer_level_base_decodes_as_the_float16_one(native, tmp_path):
    """Version 4 (integer codebook levels, 6 bits on 1- and 2-bit rows and 8 on 4-bit ones, exponents over each
    width's whole stored range): liblowra expands the levels to the float16 codebooks bit for bit, so it decodes as
    the numpy reader does, verifies the fingerprint the writer hashed over those codebooks (the float16 file's), and
    binds and merges a user's blob alike."""
    f16 = write_quantized(tmp_path / "f16.safetensors", seed=1, grid=True)  # seed 1 meets every edge checked below
    path = write_quantized(tmp_path / "int.safetensors", seed=1, codebook_format="int")
    metadata = [parse_header(p.read_bytes(), p.stat().st_size, "x").metadata for p in (f16, path)]
    assert [m["format_version"] for m in metadata] == ["1", "4"]
    assert metadata[0]["fingerprint"] == metadata[1]["fingerprint"]
    runtime = DeviceRuntime(path)
    handle, handle16 = native.open(path), native.open(f16)
    try:
        base = read_quantized_base(path)
        assert base.codebook_format == "int"
        books = np.abs(np.concatenate([w.codebooks for w in base.layers.values()]).astype(np.float64))
        assert books[books > 0].min() < 2.0 ** -14 and books.max() > 2.0 ** 10  # subnormal and large levels both met
        # Each width's edges met: 6-bit rows at exponent 10 or 11 (above a 4-bit row's 9), 4-bit rows at 9 and with
        # levels beyond 6 bits.
        stored = stored_level_tensors(path.read_bytes())
        rows = [(int(w), int(e), np.abs(layer.codebooks[start: start + (1 << int(w))].astype(np.float64)).max() / 2.0**e)
                for m, layer in base.layers.items()
                for w, e, start in zip(layer.widths, stored[f"{m}.level_exponents"], level_offsets(layer))]
        assert any(w <= 2 and e >= 10 for w, e, _ in rows) and any(w == 4 and e == 9 for w, e, _ in rows)
        assert any(w == 4 and k > level_limit(2) for w, _, k in rows)
        reference = base.dequantized_state_dict()
        assert sorted(native.tensor_names(handle)) == sorted(reference)  # levels, exponents: not model tensors
        for name, array in reference.items():
            if np.issubdtype(array.dtype, np.floating):
                assert np.array_equal(native.weight(handle, name), array), name
                assert np.array_equal(native.weight(handle16, name), array), name
        modules = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.down_proj"]
        assert native.fingerprint(handle, modules) == native.fingerprint(handle16, modules) == (
            runtime.base.fingerprint(modules)) == DeviceRuntime(f16).base.fingerprint(modules)
        shapes = {m: runtime.base.tensors[f"{m}.weight"].shape for m in modules}
        load_both(native, handle, runtime, blob_for(runtime.base, dyadic_levels, modules=shapes))
        assert_same_weights(native, handle, runtime)
        native.load(handle16, blob_for(runtime.base, dyadic_levels, modules=shapes))  # the same blob binds to both
        native.unload(handle)
        assert np.array_equal(native.weight(handle, "model.layers.0.q_proj.weight"),
                              reference["model.layers.0.q_proj.weight"])
    finally:
        native.close(handle)
        native.close(handle16)


def stored_level_tensors(data: bytes) -> dict[str, np.ndarray]:
    """A version-4 file's ``levels`` (uint8) and ``level_exponents`` (int8) tensors, by name."""
    dtypes = {"U8": np.uint8, "I8": np.int8}
    return {n: np.frombuffer(data, np.uint8, i.end - i.start, i.start).view(dtypes[i.dtype]).copy()
            for n, i in parse_header(data, len(data), "x").tensors.items()
            if n.endswith((".levels", ".level_exponents"))}


def test_corrupt_int_level_bases_are_refused_alike(native, tmp_path):
    """Version-4 layers the numpy reader refuses (int_levels.decode_levels, the mixed layouts, the fingerprint over
    the decoded codebooks), refused by liblowra with the same error kind, and decode_levels' refusals with the same
    message; an exponent in range for its row's width (10 on a 6-bit row, 9 on a 4-bit one) decodes, and is refused
    only by the fingerprint."""
    path = write_quantized(tmp_path / "good.safetensors", codebook_format="int")
    good = path.read_bytes()
    base = read_quantized_base(path)
    cases: dict[str, bytes] = {}
    rewrite = rewriter(good, cases)
    # A layer with padding bits in its levels (an odd number of width-1 rows: 12 bits each), and a row of distinct
    # levels of each bit count: 6 (a 1- or 2-bit row, at an exponent other than 10) and 8 (a 4-bit row, below 9, its
    # levels straddling bytes: after an odd number of 1-bit rows).
    padded = next(n for n, w in base.layers.items() if sum(LEVEL_BITS[int(v)] << int(v) for v in w.widths) % 8)
    stored = stored_level_tensors(good)

    def distinct_row(wanted) -> tuple[str, int]:
        """The first row with distinct levels where ``wanted(width, exponent, first stream bit)``."""
        return next((m, r) for m, w in base.layers.items() for r, start in enumerate(level_offsets(w)[:-1])
                    if wanted(int(w.widths[r]), int(stored[f"{m}.level_exponents"][r]),
                              sum(LEVEL_BITS[int(v)] << int(v) for v in w.widths[:r]))
                    and w.codebooks[start] != w.codebooks[start + (1 << int(w.widths[r])) - 1])

    small = distinct_row(lambda w, e, bit: w <= 2 and e != 10)
    wide = distinct_row(lambda w, e, bit: w == 4 and e < 9 and bit % 8)
    name, row = small
    w = base.layers[name]
    levels, exponents = f"{name}.levels", f"{name}.level_exponents"
    offsets = level_offsets(w)

    def set_exponent(value, at=small):
        return lambda t: t[f"{at[0]}.level_exponents"].__setitem__(at[1], value)

    def set_first_level(raw, at):  # the row's first level stored as ``raw``, on its row's bits
        module, r = at
        widths = base.layers[module].widths
        bits = LEVEL_BITS[int(widths[r])]
        start = sum(LEVEL_BITS[int(v)] << int(v) for v in widths[:r])

        def edit(t):
            stream = np.unpackbits(t[f"{module}.levels"], bitorder="little")
            stream[start: start + bits] = (raw >> np.arange(bits)) & 1
            t[f"{module}.levels"] = np.packbits(stream, bitorder="little")
        return edit

    def descending(t):
        books = decode_levels(t[levels], t[exponents], w.widths, "t").copy()
        books[offsets[row]: offsets[row + 1]] = books[offsets[row]: offsets[row + 1]][::-1].copy()
        t[levels], t[exponents] = encode_levels(books, w.widths, "t")

    rewrite("exponent_12", tensor_edit=set_exponent(12))
    rewrite("exponent_-25", tensor_edit=set_exponent(-25))
    rewrite("exponent_-128", tensor_edit=set_exponent(-128))
    rewrite("exponent_10_on_a_4_bit_row", tensor_edit=set_exponent(10, wide))
    # In range for their rows: decoded, then refused as other levels than the fingerprint covers.
    rewrite("exponent_10_on_a_6_bit_row", tensor_edit=set_exponent(10, small))
    rewrite("exponent_9_on_a_4_bit_row", tensor_edit=set_exponent(9, wide))
    rewrite("level_-32_on_a_6_bit_row", tensor_edit=set_first_level(0x20, small))
    rewrite("level_-128_on_a_4_bit_row", tensor_edit=set_first_level(0x80, wide))
    rewrite("padding_bits", tensor_edit=lambda t: t[f"{padded}.levels"].__setitem__(-1, t[f"{padded}.levels"][-1] | 0x80))
    rewrite("descending", tensor_edit=descending)
    rewrite("stray_codebooks", tensor_edit=lambda t: t.__setitem__(f"{name}.codebooks", w.codebooks.copy()))
    rewrite("no_exponents", tensor_edit=lambda t: t.pop(exponents))
    rewrite("no_levels", tensor_edit=lambda t: t.pop(levels))
    rewrite("levels_int8", tensor_edit=lambda t: t.__setitem__(levels, t[levels].view(np.int8)))
    rewrite("levels_short", tensor_edit=lambda t: t.__setitem__(levels, t[levels][:-1].copy()))
    rewrite("levels_long", tensor_edit=lambda t: t.__setitem__(levels, np.append(t[levels], np.uint8(0))))
    rewrite("exponents_uint8", tensor_edit=lambda t: t.__setitem__(exponents, t[exponents].view(np.uint8)))
    rewrite("exponents_short", tensor_edit=lambda t: t.__setitem__(exponents, t[exponents][:-1].copy()))
    rewrite("exponents_2d", tensor_edit=lambda t: t.__setitem__(exponents, t[exponents].reshape(1, -1).copy()))
    # Valid levels, but not the ones the fingerprint covers: a row's exponent one lower halves its levels.
    rewrite("exponent_changed", tensor_edit=lambda t: t[exponents].__setitem__(
        row, t[exponents][row] - 1 if t[exponents][row] > MIN_EXPONENT else MIN_EXPONENT + 1))

    def negated(t):  # the row's levels negated and reversed: ascending, on the grid, another codebook
        books = decode_levels(t[levels], t[exponents], w.widths, "t").copy()
        flipped = -books[offsets[row]: offsets[row + 1]][::-1] + np.float16(0)
        assert flipped.tobytes() != books[offsets[row]: offsets[row + 1]].tobytes()
        books[offsets[row]: offsets[row + 1]] = flipped
        t[levels], t[exponents] = encode_levels(books, w.widths, "t")

    rewrite("level_changed", tensor_edit=negated)
    rewrite("as_version_1", _set("format_version", "1"))
    rewrite("as_version_3", _set("format_version", "3"))
    rewrite("recovery_blob_without_metadata", tensor_edit=lambda t: t.__setitem__("recovery.blob", np.zeros(8, np.uint8)))
    rewrite("recovery_metadata_without_tensors", _set("recovery", canonical({"rank": 1, "scaling": 1.0,
                                                                            "modules": [name]})))
    f16 = write_quantized(tmp_path / "f16.safetensors", grid=True).read_bytes()
    rewrite16 = rewriter(f16, cases)
    header16 = parse_header(f16, len(f16), "x")
    int_level_tensors = stored_level_tensors(good)
    assert not set(int_level_tensors) & set(header16.tensors)
    rewrite16("f16_with_levels", tensor_edit=lambda t: t.__setitem__(levels, int_level_tensors[levels]))
    rewrite16("f16_with_exponents", tensor_edit=lambda t: t.__setitem__(exponents, int_level_tensors[exponents]))
    rewrite16("f16_as_version_4", _set("format_version", "4"))
    rewrite16("f16_as_version_4_with_both", _set("format_version", "4"), tensor_edit=lambda t: t.update(int_level_tensors))
    assert_bases_refused_alike(native, tmp_path, cases, same_message={
        "exponent_12", "exponent_-25", "exponent_-128", "exponent_10_on_a_4_bit_row", "level_-32_on_a_6_bit_row",
        "level_-128_on_a_4_bit_row", "padding_bits", "descending"})
    for case in ("exponent_10_on_a_6_bit_row", "exponent_9_on_a_4_bit_row"):
        assert python_error(lambda case=case: BaseWeights(tmp_path / f"{case}.safetensors")) is ChecksumMismatchError


def level_offsets(layer: QuantizedWeight) -> np.ndarray:
    """Where each row's levels start in the layer's codebooks, and their count last."""
    return np.concatenate([[0], np.cumsum(1 << layer.widths.astype(int))])


def test_corrupt_int_level_recovered_bases_are_refused_alike(native, tmp_path):
    """A version-4 base's recovery adapter, either kind (told by recovery.blob), refused alike when it is wrong."""
    cases: dict[str, bytes] = {}
    for kind, path in (("blob", write_recovered_blob(tmp_path / "b.safetensors", "int")),
                       ("factors", write_recovered(tmp_path / "f.safetensors", codebook_format="int"))):
        good = path.read_bytes()
        header = parse_header(good, len(good), "x")
        recovery = json.loads(header.metadata["recovery"])
        rewrite = rewriter(good, cases)
        rewrite(f"{kind}_no_metadata", lambda m: m.pop("recovery"))
        rewrite(f"{kind}_scaling", _set("recovery", canonical({**recovery, "scaling": 0.5})))
        rewrite(f"{kind}_as_version_1", _set("format_version", "1"))
        rewrite(f"{kind}_stray", tensor_edit=lambda t: t.__setitem__("recovery.model.norm.lora_A", np.zeros(2, np.float16)))
        if kind == "blob":
            rewrite("blob_dropped", tensor_edit=lambda t: t.pop("recovery.blob"))  # read as factors: none there
            rewrite("blob_as_version_2", _set("format_version", "2"))
        else:
            a_name = f"recovery.{recovery['modules'][0]}.lora_A"
            rewrite("factors_missing", tensor_edit=lambda t, a_name=a_name: t.pop(a_name))
            rewrite("factors_nan", tensor_edit=lambda t, a_name=a_name: t[a_name].__setitem__((0, 0), np.nan))
            # recovery.blob makes it a compressed adapter: this one is no blob (and the factors would be stray)
            rewrite("factors_with_a_blob", tensor_edit=lambda t: t.__setitem__("recovery.blob", np.zeros(64, np.uint8)))
    assert_bases_refused_alike(native, tmp_path, cases)


def test_swaps_restore_the_base_bit_exactly(native, tiny_base):
    handle = native.open(tiny_base)
    try:
        names = [f"{m}.weight" for m in TINY_MODULES]
        pristine = {n: native.weight(handle, n) for n in names}
        blobs = [make_blob_bytes(tiny_base, seed=s, adapter_id=f"user-{s}") for s in (1, 2)]
        first = native.load(handle, blobs[0])
        assert first.adapter_id == b"user-1"
        merged_a = {n: native.weight(handle, n) for n in names}
        for _ in range(20):
            native.load(handle, blobs[1])
            native.load(handle, blobs[0])
        assert all(np.array_equal(native.weight(handle, n), merged_a[n]) for n in names)
        native.unload(handle)
        assert all(native.weight(handle, n).tobytes() == pristine[n].tobytes() for n in names)
    finally:
        native.close(handle)


# --- refusals: the same error kind as the numpy reader, file by file -------------------------------
def _rewrite(data: bytes, mutate_meta=None, mutate_tensors=None) -> bytes:
    header = parse_header(data, len(data), "x")
    dtypes = {"U8": np.uint8, "F16": np.float16}
    tensors = {n: np.frombuffer(data, np.uint8, i.end - i.start, i.start).view(dtypes[i.dtype]).copy()
               for n, i in header.tensors.items()}
    meta = dict(header.metadata)
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    meta["payload_sha256"] = fmt.payload_digest(tensors, meta)
    return serialize(tensors, meta)


def _set(key, value):
    return lambda m: m.update({key: value})


def canonical(value) -> str:
    """A JSON metadata value as lowra's writer spells it (container.encode_metadata)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _table(edit):
    def mutate(m):
        table = json.loads(m["modules"])
        edit(table)
        m["modules"] = canonical(table)  # so the table checks decide, not the spelling check
    return mutate


def corrupt_blobs(base: Path) -> dict[str, bytes]:
    good = make_blob_bytes(base)
    header_len = 8 + struct.unpack("<Q", good[:8])[0]
    cases = {f"cut{c}": good[:c] for c in (0, 5, 8, 100, len(good) - 1, len(good) - 37)}
    for i, pos in enumerate(np.random.default_rng(0).integers(header_len, len(good), 8)):
        flipped = bytearray(good)
        flipped[pos] ^= 1 << (i % 8)
        cases[f"payload_flip{i}"] = bytes(flipped)
    for pos in range(8, header_len, 7):  # every 7th header byte: JSON, names, numbers, metadata values
        flipped = bytearray(good)
        flipped[pos] ^= 0x04
        cases[f"header_flip{pos}"] = bytes(flipped)
    cases["version"] = _rewrite(good, _set("format_version", "2"))
    cases["version_padded"] = _rewrite(good, _set("format_version", " 1"))
    cases["not_lowra"] = serialize({"w": np.zeros(3, np.float32)}, {"format": "pt"})
    cases["missing_key"] = _rewrite(good, lambda m: m.pop("card"))
    cases["bad_json"] = _rewrite(good, _set("scheme", '{"a": NaN}'))
    cases["dup_key"] = _rewrite(good, _set("card", '{"a": 1, "a": 2}'))
    cases["deep_json"] = _rewrite(good, _set("lora", "[" * 70 + "]" * 70))
    cases["spaced_json"] = _rewrite(good, lambda m: m.update(modules=json.dumps(json.loads(m["modules"]))))
    cases["unsorted_json"] = _rewrite(good, _set("card", '{"task":"test","data":1}'))
    cases["long_int"] = _rewrite(good, _set("card", '{"n":' + "7" * 4301 + "}"))
    cases["nan_level"] = _rewrite(good, mutate_tensors=lambda t: t["codebooks"].__setitem__(3, np.nan))
    cases["descending"] = _rewrite(good, mutate_tensors=lambda t: t["codebooks"].__setitem__(
        slice(0, 16), np.sort(t["codebooks"][:16])[::-1]))
    cases["wrong_dtype"] = _rewrite(good, mutate_tensors=lambda t: t.__setitem__("codes", t["codes"].astype(np.float16)))
    cases["extra_tensor"] = _rewrite(good, mutate_tensors=lambda t: t.update(extra=t.pop("widths")))
    cases["table_in"] = _rewrite(good, _table(lambda t: t[0].__setitem__(2, t[0][2] + 8)))
    cases["table_rank"] = _rewrite(good, _table(lambda t: t[0].__setitem__(3, 0)))
    cases["table_float"] = _rewrite(good, _table(lambda t: t[0].__setitem__(1, 24.0)))
    cases["table_bool"] = _rewrite(good, _table(lambda t: t[0].__setitem__(1, True)))
    cases["table_name"] = _rewrite(good, _table(lambda t: t[0].__setitem__(0, "model..q")))
    cases["table_unprintable"] = _rewrite(good, _table(lambda t: t[0].__setitem__(0, "model.q\u200b")))
    cases["table_surrogate"] = _rewrite(good, lambda m: m.update(modules=m["modules"].replace(
        "model.layers.0.self_attn.q_proj", "\\ud800", 1)))
    cases["table_twice"] = _rewrite(good, _table(lambda t: t.append(list(t[0]))))
    cases["widths_short"] = _rewrite(good, mutate_tensors=lambda t: t.__setitem__("widths", t["widths"][:-1]))
    cases["wrong_base"] = make_blob_bytes(write_base(base.parent / "other", seed=9))
    cases["missing_module"] = make_blob_bytes(base, modules={"model.layers.9.mlp.up_proj": (16, 16)})
    cases["wrong_shape"] = make_blob_bytes(base, modules={"model.layers.0.self_attn.q_proj": (16, 24)})
    cases["fingerprint"] = _rewrite(good, _set("base_fingerprint", "sha256:" + "0" * 64))
    cases["signed"] = b"LOWRA\x00SG" + good
    return cases


def python_message(load) -> str:
    try:
        load()
    except LowraError as exc:
        return str(exc)
    raise AssertionError("accepted")


def python_error(load) -> type[Exception] | None:
    try:
        load()
    except LowraError as exc:
        return type(exc)
    return None


# Where liblowra refuses by design what the Python runtime reads: JSON nested deeper than 64 levels (Python stops only
# at its recursion limit). (Signed files: test_trust_native.py.)
STRICTER = {"deep_json": BlobContentError}


def test_corrupt_and_forged_blobs_are_refused_alike(native, tiny_base):
    runtime = DeviceRuntime(tiny_base)
    handle = native.open(tiny_base)
    try:
        native.load(handle, make_blob_bytes(tiny_base, seed=4, adapter_id="kept"))
        for case, data in corrupt_blobs(tiny_base).items():
            expected = STRICTER.get(case) or python_error(lambda data=data: runtime.load_user(data))
            assert expected is not None, f"{case}: the numpy reader accepted it"
            got = python_error(lambda data=data: native.load(handle, data))
            assert got is expected, f"{case}: numpy raised {expected.__name__}, liblowra {got and got.__name__}"
            info = UserInfo()
            assert native.lib.lowra_user_current(handle, info) == 0 and info.adapter_id == b"kept", case
    finally:
        native.close(handle)


JSON_BYTES = b'"\\,:{}[]0123456789e.-+u tfnIN\x00\x1f\x7f\x80\xc3\xed\xf0\xffab'


def test_mutated_headers_and_metadata_are_refused_alike(native, tiny_base):
    """Random JSON-significant bytes written into the header, and into the JSON metadata values with the checksum
    resealed (so the strict JSON parser, not the checksum, decides): the same error kind every time."""
    runtime = DeviceRuntime(tiny_base)
    handle = native.open(tiny_base)
    good = make_blob_bytes(tiny_base)
    header_len = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(11)
    try:
        for i in range(400):
            if i % 2:
                data = bytearray(good)
                data[rng.integers(8, header_len)] = JSON_BYTES[rng.integers(len(JSON_BYTES))]
            else:
                key = ("modules", "lora", "card", "scheme")[i // 2 % 4]

                def edit(meta, key=key):
                    text = bytearray(meta[key].encode())
                    text[rng.integers(len(text))] = JSON_BYTES[rng.integers(len(JSON_BYTES))]
                    meta[key] = text.decode("utf-8", "replace")
                data = _rewrite(good, edit)
            data = bytes(data)
            expected = python_error(lambda data=data: runtime.load_user(data))
            got = python_error(lambda data=data: native.load(handle, data))
            assert got is expected, f"mutation {i}: numpy {expected}, liblowra {got}: {native.lib.lowra_last_error()}"
    finally:
        native.close(handle)


# --- JSON metadata: one spelling per value, as lowra's writer spells it -----------------------------
def every_kind_of_value() -> dict:
    """JSON values of every kind lowra's writer may meet: floats of every magnitude and random bit patterns, ints
    beyond int64 (up to Python's 4300-digit limit), strings with every escape, keys whose code point order is not
    their UTF-16 order, lone surrogates, nesting. Insertion order is not sorted, so sort_keys matters."""
    rng = np.random.default_rng(5)
    floats = [float(x) for x in rng.integers(0, 2**64, 3000, dtype=np.uint64).view(np.float64) if np.isfinite(x)]
    floats += [float(f"{m}e{e}") for e in range(-323, 308) for m in ("1", "1.5", "9.999999999999999")]
    floats += [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e16, 1e15, 9999999999999998.0,
               1e-4, 1e-5, 0.1, 1 / 3, 123.25, 2.0**53 + 2, 2.0**63, -2.5e-05]
    floats += [float(np.float32(x)) for x in rng.standard_normal(300)] + [float(x) for x in rng.uniform(-1e6, 1e6, 300)]
    keys = ["z", "", "a", "Z", "aa", "\\u00e9", "\u00e9", "\u65e5\u672c", "\U0001f600", "\uffff", "\ue000", "\x00",
            "\x7f", "\ud800", 'q"\\/', "\U0010ffff"]
    strings = ["plain", "\\b\\f\\n\\r\\t\\u0001", "\b\f\n\r\t\x01\x1f\x7f\x80", "\u2028\u00ff\u0100\ufeff",
               "\U0001f600\U0010ffff", "\ud800", "\udfff", "\ud800\ud800", '"/\\']
    ints = [0, -1, 7, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**100, -(10**4299)]  # the last has 4300 digits
    return {"strings": strings, "floats": floats, "ints": ints,
            "nested": {k: {k2: [i, k, {"deep": [[], {}, [None]]}] for i, k2 in enumerate(keys)} for k in keys},
            "literals": [True, False, None, [], {}, [[]], {"": {}}]}


# Spellings of a value that lowra's writer never makes, and what makes each one non-canonical.
RESPELLED = {
    '{"x":1.50}': "trailing zero", '{"x":1E5}': "capital E", '{"x":1e5}': "exponent below 16",
    '{"x":1e16}': "exponent without sign", '{"x":1.0e+16}': "'.0' on a one-digit mantissa",
    '{"x":0.00001}': "fixed below 1e-4", '{"x":100000000000000000.0}': "fixed from 1e16",
    '{"x":2.5E-05}': "capital E", '{"x":1.7976931348623157e308}': "exponent without sign",
    '{"x":4.9e-324}': "not the shortest digits", '{"x":1e-400}': "underflows to 0.0", '{"x":-0}': "int -0 is 0",
    '{"x":0.10}': "trailing zero", '{"x":"\\u00E9"}': "capital hex", '{"x":"\u00e9"}': "raw non-ASCII",
    '{"x":"\\/"}': "escaped slash", '{"x":"\\u0041"}': "escaped ASCII", '{"x":"\\uD83D\\uDE00"}': "capital hex",
    '{"x":"\U0001f600"}': "raw astral", '{"x":"\\u000a"}': "long form of \\n", '{"x":[1, 2]}': "space",
    '{"b":1,"a":2}': "unsorted", '{"z":2,"\\u00e9":1}': "sorted by escaped text, not by code point",
    '{"\\ud83d\\ude00":2,"\\uffff":1}': "UTF-16 order, not code point order", ' {"x":1}': "leading space",
    '{"x":1}\n': "trailing newline", '{ "x":1}': "space",
}


def test_json_metadata_is_read_only_in_canonical_form(native, tiny_base, tmp_path):
    """Both readers accept exactly the spelling json.dumps(separators=(",", ":"), sort_keys=True) gives a value (the
    card and a base's report hold every kind of value, so liblowra's spelling is checked against Python's value by
    value) and refuse every other spelling of it with BlobContentError."""
    runtime = DeviceRuntime(tiny_base)
    handle = native.open(tiny_base)
    good = make_blob_bytes(tiny_base)
    value = every_kind_of_value()
    spellings = {canonical(value): None, json.dumps(value, sort_keys=True): BlobContentError,
                 json.dumps(value, separators=(",", ":")): BlobContentError,
                 '{"x":' + "1" * 4300 + "}": None, '{"x":-' + "1" * 4301 + "}": BlobContentError}
    for text in RESPELLED:
        spellings[text] = BlobContentError
        spellings[canonical(json.loads(text))] = None  # the same value, spelled as lowra writes it
    try:
        for text, expected in spellings.items():
            data = _rewrite(good, _set("card", text))
            why = RESPELLED.get(text, "canonical" if expected is None else "respelled")
            got = python_error(lambda data=data: runtime.load_user(data))
            assert got is expected, f"{text[:60]!r} ({why}): numpy raised {got}"
            got = python_error(lambda data=data: native.load(handle, data))
            assert got is expected, f"{text[:60]!r} ({why}): liblowra raised {got}: {native.lib.lowra_last_error()}"
    finally:
        native.close(handle)
    base = write_quantized(tmp_path / "base.safetensors", report=value)
    BaseWeights(base)
    native.close(native.open(base))


def rewriter(good: bytes, cases: dict[str, bytes]):
    """``rewrite(name, meta_edit, tensor_edit, reseal)``: store in ``cases[name]`` a copy of the file ``good`` with its
    metadata and tensors edited, the payload checksum recomputed unless ``reseal`` is False."""
    header = parse_header(good, len(good), "x")
    dtypes = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32, "I64": np.int64}

    def rewrite(name: str, meta_edit=None, tensor_edit=None, reseal=True) -> None:
        tensors = {n: np.frombuffer(good, np.uint8, i.end - i.start, i.start).view(dtypes[i.dtype]).reshape(i.shape).copy()
                   for n, i in header.tensors.items()}
        meta = dict(header.metadata)
        if meta_edit:
            meta_edit(meta)
        if tensor_edit:
            tensor_edit(tensors)
        if reseal:
            meta["payload_sha256"] = fmt.payload_digest(tensors, meta)
        cases[name] = serialize(tensors, meta)

    return rewrite


def corrupt_bases(tmp_path: Path) -> dict[str, Path]:
    good = write_quantized(tmp_path / "good.safetensors").read_bytes()
    header = parse_header(good, len(good), "x")
    cases: dict[str, bytes] = {"cut": good[:-3], "short": good[:5]}
    rewrite = rewriter(good, cases)
    flipped = bytearray(good)
    flipped[header.tensors["model.norm.weight"].start] ^= 1
    cases["flip_dense"] = bytes(flipped)
    rewrite("version", _set("format_version", "3"))  # neither reader knows version 3
    rewrite("adapter", lambda m: m.update(format="lowra-adapter"))
    rewrite("tampered_layer", tensor_edit=lambda t: t.__setitem__("model.layers.0.q_proj.codes",
                                                                  t["model.layers.0.q_proj.codes"] ^ np.uint8(1)))
    rewrite("inconsistent", _table(lambda t: t[0].__setitem__(2, t[0][2] + 1)))
    rewrite("width_zero", tensor_edit=lambda t: t["model.layers.0.q_proj.widths"].fill(0))
    rewrite("missing", tensor_edit=lambda t: t.pop("model.layers.1.q_proj.scales"))
    rewrite("nan_dense", tensor_edit=lambda t: t["model.norm.weight"].__setitem__(0, np.inf))
    rewrite("bad_alias", _set("aliases", '{"lm_head.bias":"model.embed_tokens.weight"}'))
    rewrite("alias_target", _set("aliases", '{"lm_head.weight":"nothing.weight"}'))
    rewrite("spaced_aliases", _set("aliases", '{"lm_head.weight": "model.embed_tokens.weight"}'))
    rewrite("unsorted_report", _set("report", '{"total":{},"model.layers.0.q_proj":[]}'))
    rewrite("shadow", tensor_edit=lambda t: t.__setitem__("model.layers.0.q_proj.weight", np.zeros(2, np.float32)))
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(data)
    paths["missing_file"] = tmp_path / "absent.safetensors"
    paths["empty_folder"] = tmp_path / "empty"
    paths["empty_folder"].mkdir()
    return paths


def assert_bases_refused_alike(native, tmp_path: Path, cases: dict[str, bytes], same_message=frozenset()) -> None:
    """Each case written as a base file is refused by the numpy reader, and by liblowra with the same error kind (and,
    for the cases in ``same_message``, the same message after the module's name)."""
    for case, data in cases.items():
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(data)
        expected = python_error(lambda path=path: BaseWeights(path))
        got = python_error(lambda path=path: native.close(native.open(path)))
        assert expected is not None, f"{case}: the numpy reader accepted it"
        assert got is expected, f"{case}: numpy raised {expected.__name__}, liblowra {got and got.__name__}"
        if case in same_message:
            messages = [python_message(lambda path=path: BaseWeights(path)),
                        python_message(lambda path=path: native.close(native.open(path)))]
            assert messages[0].split("': ", 1)[-1] == messages[1].split("': ", 1)[-1], (case, messages)


def write_recovered(path: Path, scaling: float = 0.375, codebook_format: str = "float16") -> Path:
    """write_quantized's base with an accuracy-recovery adapter on two of its layers (format version 2, or 4 with
    integer codebooks)."""
    from lowra.device_runtime.formats.quantized_base import Recovery

    plain = read_quantized_base(write_quantized(path.with_name("plain-" + path.name), codebook_format=codebook_format))
    rng = np.random.default_rng(3)
    factors = {name: ((rng.standard_normal((3, w.in_features)) * 2).astype(np.float16),
                      (rng.standard_normal((w.out_features, 3)) * 0.01).astype(np.float16))
               for name, w in list(plain.layers.items())[:2]}
    recovered = plain.__class__(layers=plain.layers, dense=plain.dense, metadata=plain.metadata, fingerprint="",
                                aliases=plain.aliases, recovery=Recovery(rank=3, scaling=scaling, factors=factors),
                                codebook_format=plain.codebook_format)
    return recovered.write(path)


def write_recovered_blob(path: Path, codebook_format: str = "float16") -> Path:
    """write_quantized's base with a compressed recovery adapter (format version 3, or 4 with integer codebooks) on two
    of its layers."""
    from lowra.device_runtime.formats.quantized_base import Recovery

    plain = read_quantized_base(write_quantized(path.with_name("plain-" + path.name), codebook_format=codebook_format))
    modules = {name: (w.out_features, w.in_features) for name, w in list(plain.layers.items())[:2]}
    recovery = Recovery.from_blob(recovery_blob(modules, fingerprint=plain.fingerprint),
                                  {"plain_fingerprint": plain.fingerprint})
    recovered = plain.__class__(layers=plain.layers, dense=plain.dense, metadata=plain.metadata, fingerprint="",
                                aliases=plain.aliases, recovery=recovery, codebook_format=plain.codebook_format)
    return recovered.write(path)


# repr spellings: "0.375", "2.0", "1e-05"; "blob": version 3; "int", "int-blob": version 4 with either kind
@pytest.mark.parametrize("scaling", [0.375, 2.0, 1e-05, "blob", "int", "int-blob"])
def test_recovered_base_decodes_bit_exactly_and_binds_users(native, tmp_path, scaling):
    codebook_format = "int" if str(scaling).startswith("int") else "float16"
    path = (write_recovered_blob(tmp_path / "recovered.safetensors", codebook_format) if str(scaling).endswith("blob")
            else write_recovered(tmp_path / "recovered.safetensors", 0.375 if scaling == "int" else scaling,
                                 codebook_format))
    version = "4" if codebook_format == "int" else "3" if scaling == "blob" else "2"
    assert parse_header(path.read_bytes(), path.stat().st_size, "x").metadata["format_version"] == version
    assert (read_quantized_base(path).recovery.blob is not None) == str(scaling).endswith("blob")
    runtime = DeviceRuntime(path)
    handle = native.open(path)
    try:
        reference = read_quantized_base(path).dequantized_state_dict()
        assert sorted(native.tensor_names(handle)) == sorted(reference)  # recovery factors are not model tensors
        for name, array in reference.items():
            if np.issubdtype(array.dtype, np.floating):
                assert np.array_equal(native.weight(handle, name), array), name
        plain = read_quantized_base(tmp_path / "plain-recovered.safetensors").dequantized_state_dict()
        assert not np.array_equal(reference["model.layers.0.q_proj.weight"], plain["model.layers.0.q_proj.weight"])
        modules = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.down_proj"]
        assert native.fingerprint(handle, modules) == runtime.base.fingerprint(modules)
        shapes = {m: runtime.base.tensors[f"{m}.weight"].shape for m in modules}
        load_both(native, handle, runtime, blob_for(runtime.base, dyadic_levels, modules=shapes))
        assert_same_weights(native, handle, runtime)
        native.unload(handle)  # a swap back restores the recovered weights, never the plain decode
        assert np.array_equal(native.weight(handle, "model.layers.0.q_proj.weight"),
                              reference["model.layers.0.q_proj.weight"])
    finally:
        native.close(handle)


def test_corrupt_recovered_bases_are_refused_alike(native, tmp_path):
    good = write_recovered(tmp_path / "good.safetensors").read_bytes()
    recovery = json.loads(parse_header(good, len(good), "x").metadata["recovery"])
    a_name = f"recovery.{recovery['modules'][0]}.lora_A"
    cases: dict[str, bytes] = {}
    rewrite = rewriter(good, cases)

    def recovery_meta(**edit):
        return _set("recovery", json.dumps({**recovery, **edit}, separators=(",", ":"), sort_keys=True))

    rewrite("as_version_1", _set("format_version", "1"))
    rewrite("no_metadata", lambda m: m.pop("recovery"))
    rewrite("rank_0", recovery_meta(rank=0))
    rewrite("rank_float", recovery_meta(rank=3.0))
    rewrite("scaling_negative", recovery_meta(scaling=-0.5))
    rewrite("scaling_text", recovery_meta(scaling="0.5"))
    rewrite("unknown_module", recovery_meta(modules=[*recovery["modules"], "model.norm"]))
    rewrite("repeated_module", recovery_meta(modules=[recovery["modules"][0]] * 2))
    rewrite("no_modules", recovery_meta(modules=[]))
    rewrite("missing_tensor", tensor_edit=lambda t: t.pop(a_name))
    rewrite("float32_tensor", tensor_edit=lambda t: t.__setitem__(a_name, t[a_name].astype(np.float32)))
    rewrite("wrong_shape", tensor_edit=lambda t: t.__setitem__(a_name, t[a_name][:, :-1].copy()))
    rewrite("nan_factor", tensor_edit=lambda t: t[a_name].__setitem__((0, 0), np.nan))
    rewrite("stray_tensor", tensor_edit=lambda t: t.__setitem__("recovery.model.norm.lora_A", np.zeros(2, np.float16)))
    rewrite("tampered_factor", tensor_edit=lambda t: t[a_name].__setitem__((0, 0), t[a_name][0, 0] + 1))
    rewrite("scaling_changed", recovery_meta(scaling=0.5))  # valid, but not the adapter the fingerprint covers
    assert_bases_refused_alike(native, tmp_path, cases)


def test_corrupt_compressed_recovery_is_refused_alike(native, tmp_path):
    good = write_recovered_blob(tmp_path / "good.safetensors").read_bytes()
    header = parse_header(good, len(good), "x")
    recovery = json.loads(header.metadata["recovery"])
    layers = json.loads(header.metadata["modules"])
    shapes = {name: (out, inp) for name, out, inp, _ in layers[:2]}
    cases: dict[str, bytes] = {}
    rewrite = rewriter(good, cases)

    def recovery_meta(**edit):
        return _set("recovery", json.dumps({**recovery, **edit}, separators=(",", ":"), sort_keys=True))

    def blob(data: bytes):
        return lambda t: t.__setitem__("recovery.blob", np.frombuffer(data, np.uint8).copy())

    stored = np.frombuffer(good, np.uint8, header.tensors["recovery.blob"].end - header.tensors["recovery.blob"].start,
                           header.tensors["recovery.blob"].start).tobytes()
    rewrite("as_version_2", _set("format_version", "2"))
    rewrite("as_version_1", _set("format_version", "1"))
    rewrite("no_blob", tensor_edit=lambda t: t.pop("recovery.blob"))
    rewrite("blob_float16", tensor_edit=lambda t: t.__setitem__("recovery.blob", t["recovery.blob"][:64].view(np.float16)))
    rewrite("blob_2d", tensor_edit=lambda t: t.__setitem__("recovery.blob", t["recovery.blob"][:64].reshape(8, 8)))
    rewrite("blob_cut", tensor_edit=blob(stored[:-1]))
    rewrite("blob_not_a_blob", tensor_edit=blob(b"\0" * 64))
    flipped = bytearray(stored)
    flipped[-1] ^= 1
    rewrite("blob_tampered", tensor_edit=blob(bytes(flipped)))  # the blob's own checksum
    rewrite("rank_2", recovery_meta(rank=2))
    rewrite("rank_float", recovery_meta(rank=3.0))
    rewrite("scaling_half", recovery_meta(scaling=0.5))
    rewrite("one_module_more", recovery_meta(modules=[*recovery["modules"], layers[2][0]]))
    rewrite("one_module_less", recovery_meta(modules=recovery["modules"][:1]))
    rewrite("stray_tensor", tensor_edit=lambda t: t.__setitem__("recovery.model.norm.lora_A", np.zeros(2, np.float16)))
    rewrite("fingerprint_changed", tensor_edit=blob(recovery_blob(shapes, seed=9)))  # valid, not the one hashed
    other = {layers[2][0]: (layers[2][1], layers[2][2]), **dict(list(shapes.items())[1:])}
    rewrite("unknown_module", recovery_meta(modules=sorted(other)), tensor_edit=blob(recovery_blob(other)))
    name, (out, inp) = next(iter(shapes.items()))
    rewrite("wrong_shape", tensor_edit=blob(recovery_blob({name: (out, inp + 8), **dict(list(shapes.items())[1:])})))
    outside = {"model.norm": (out, inp), **dict(list(shapes.items())[1:])}
    rewrite("not_a_layer", recovery_meta(modules=sorted(outside)), tensor_edit=blob(recovery_blob(outside)))
    (first, (out1, in1)), (second, (out2, in2)) = shapes.items()
    entries = [fmt.ModuleEntry(first, out1, in1, 3), fmt.ModuleEntry(second, out2, in2, 2)]  # two ranks
    meta = {"adapter_id": "recovery", "base_fingerprint": "sha256:" + "0" * 64, "lora": {"rank": 3},
            "scheme": {"method": "test"}, "created": CREATED, "card": {}}
    rewrite("two_ranks", tensor_edit=blob(fmt.build_blob_bytes(
        entries, *random_channels(np.random.default_rng(0), entries, (4, 2, 1), normal_levels), meta)))
    assert_bases_refused_alike(native, tmp_path, cases)


def test_corrupt_bases_are_refused_alike(native, tmp_path):
    for case, path in corrupt_bases(tmp_path).items():
        expected = python_error(lambda path=path: BaseWeights(path))
        got = python_error(lambda path=path: native.close(native.open(path)))
        assert expected is not None, f"{case}: the numpy reader accepted it"
        assert got is expected, f"{case}: numpy raised {expected.__name__}, liblowra {got and got.__name__}"


# --- the example app ------------------------------------------------------------------------------
def test_example_app_swaps_users(build_dir, tiny_base, tmp_path):
    blobs = {}
    for user, seed in (("alice", 1), ("bob", 2)):
        blobs[user] = tmp_path / f"{user}.safetensors"
        blobs[user].write_bytes(make_blob_bytes(tiny_base, seed=seed, adapter_id=user))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(blobs["bob"].read_bytes()[:-1])
    name = "model.layers.0.self_attn.q_proj.weight"
    script = "\n".join([f"load {blobs['alice']}", f"sum {name}", f"load {blobs['bob']}", f"sum {name}",
                        f"load {corrupt}", "user", "unload", f"sum {name}", "user", "quit"]) + "\n"
    result = subprocess.run([str(build_dir / "lowra_chat"), str(tiny_base)], input=script, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    runtime = DeviceRuntime(tiny_base)
    pristine = fmt.tensor_digest(runtime.weight(name))
    assert lines[0].startswith("ok base")
    assert lines[1].startswith("ok user alice modules 3")
    assert lines[3].startswith("ok user bob")
    assert lines[5].startswith("error 3 ") and "truncated" in lines[5]  # LOWRA_ERR_TRUNCATED
    assert lines[6] == "ok user bob"  # the refused blob kept the previous user
    assert lines[7] == "ok unloaded" and lines[8] == f"ok sum {name} {pristine}" and lines[9] == "ok user none"
    assert lines[2].split()[-1] != pristine and lines[4].split()[-1] not in (pristine, lines[2].split()[-1])


FLOAT_TO_HALF_PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include "container.hpp"
// argv[1]: float32 values; writes float_to_half of each, then floats_to_halves of all (the bulk path), to stdout.
int main(int, char** argv) {
  std::FILE* in = std::fopen(argv[1], "rb");
  std::vector<float> values;
  float v;
  while (std::fread(&v, 4, 1, in) == 1) values.push_back(v);
  std::fclose(in);
  std::vector<uint16_t> one(values.size()), bulk(values.size());
  for (size_t i = 0; i < values.size(); ++i) one[i] = lowra::float_to_half(values[i]);
  lowra::floats_to_halves(values.data(), values.size(), bulk.data());
  std::fwrite(one.data(), 2, one.size(), stdout);
  std::fwrite(bulk.data(), 2, bulk.size(), stdout);
}
"""


def test_float_to_half_rounds_as_numpy(build_dir: Path, tmp_path: Path):
    """liblowra's float32 -> float16 conversion (how a side program's float16 factors are written): every 4,093rd
    float32 bit pattern (all exponents, subnormals, the overflow edge, infinities, NaNs) and the values around each
    float16 step, one at a time and in bulk (F16C where the CPU has it), against numpy's astype."""
    rng = np.random.default_rng(0)
    patterns = np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = halves[np.isfinite(halves)]
    steps = np.concatenate([np.nextafter(finite, np.float32(np.inf)), np.nextafter(finite, np.float32(-np.inf))])
    edges = np.array([65504, 65519.996, 65520, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26], np.float32)
    values = np.concatenate([patterns, finite, steps, edges, -edges, rng.standard_normal(1001).astype(np.float32)])
    source = tmp_path / "float_to_half.cpp"
    source.write_text(FLOAT_TO_HALF_PROGRAM)
    program = tmp_path / "float_to_half"
    subprocess.run(["c++", "-std=c++17", "-O2", f"-I{NATIVE_DIR / 'src'}", f"-I{NATIVE_DIR / 'include'}", str(source),
                    str(build_dir / "liblowra.a"), "-lcrypto", "-o", str(program)], check=True, capture_output=True)
    (tmp_path / "values.bin").write_bytes(values.tobytes())
    out = np.frombuffer(subprocess.run([str(program), str(tmp_path / "values.bin")], check=True,
                                       capture_output=True).stdout, dtype=np.uint16)
    one, bulk = out[: values.size], out[values.size:]
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(np.float16)
    nan = np.isnan(values)
    for got in (one, bulk):
        assert np.array_equal(got[~nan], want[~nan].view(np.uint16))
        assert np.isnan(got[nan].view(np.float16)).all()

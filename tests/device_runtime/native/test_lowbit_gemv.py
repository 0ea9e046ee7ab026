"""The native low-bit kernels (device_runtime/native/kernels) against the numpy reference ``dequantize() @ x``.

Random layers of several shapes, row-width mixes and group sizes (including odd in_features, groups that are not a
multiple of 32, a group larger than the row and zero scales); random padding bits in every row's last byte, which
the kernels must ignore. Builds the kernel library once (about 2 s) into the test cache.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from lowra.device_runtime.errors import ConfigError
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.device_runtime.formats.int8_rows import dequantize_q8, quantize_q8
from lowra.device_runtime.native_kernels import (
    PackedLinear,
    attention,
    f16_gemm,
    lowrank4_add,
    lowrank_add,
    isa_available,
    load_library,
    q8_gemm,
)

# (out, in, group_size, widths to draw from)
CASES = [
    (40, 576, 64, (1, 2, 4)),
    (33, 77, 0, (1, 2, 4)),
    (19, 130, 32, (2,)),
    (25, 300, 32, (1,)),
    (17, 1001, 64, (4,)),
    (24, 96, 0, (1, 2)),
    (9, 45, 20, (1, 2, 4)),  # group not a multiple of 32: the generic path
    (6, 3, 32, (1, 2, 4)),  # one partial group, shorter than a table
    (3, 1, 0, (1, 2, 4)),
]
ISAS = [isa for isa in ("scalar", "avx2", "avx512") if isa_available(isa)]


def random_weight(out: int, inputs: int, group: int, widths: tuple[int, ...], seed: int) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    row_widths = rng.choice(widths, size=out).astype(np.uint8)
    n_code_bytes = int(((inputs * row_widths.astype(np.int64) + 7) // 8).sum())
    codebooks = np.concatenate([np.sort(rng.standard_normal(1 << int(w)).astype(np.float16)) for w in row_widths])
    n_groups = -(-inputs // group) if group else 0
    scales = rng.uniform(0.05, 2.0, size=(out, n_groups)).astype(np.float16)
    if scales.size:
        scales.flat[rng.integers(scales.size)] = 0  # a group whose scale is 0 decodes to 0
    weight = QuantizedWeight(
        out_features=out, in_features=inputs, group_size=group, widths=row_widths,
        codes=rng.integers(0, 256, size=n_code_bytes, dtype=np.uint8),  # padding bits random too
        codebooks=codebooks, scales=scales,
    )  # fmt: skip
    weight.validate()
    return weight


def assert_close(got: np.ndarray, reference: np.ndarray, rel: float = 1e-4) -> None:
    """Elementwise within ``rel`` of the largest reference output (float32 sums in another order than numpy's)."""
    np.testing.assert_allclose(got, reference, rtol=rel, atol=rel * float(np.abs(reference).max()))


@pytest.mark.parametrize("layout", ["blocked", "rows"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemv_and_gemm_match_the_reference(case: int, isa: str, layout: str) -> None:
    out, inputs, group, widths = CASES[case]
    weight = random_weight(out, inputs, group, widths, seed=case)
    dense = weight.dequantize()
    packed = PackedLinear(weight, layout=layout)
    rng = np.random.default_rng(100 + case)
    x = rng.standard_normal(inputs).astype(np.float32)
    assert_close(packed.gemv(x, isa=isa), dense @ x)
    for n_tokens in (1, 4, 7):
        tokens = rng.standard_normal((n_tokens, inputs)).astype(np.float32)
        assert_close(packed.gemm(tokens, isa=isa), tokens @ dense.T)


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_scalar_and_avx2_agree(case: int) -> None:
    out, inputs, group, widths = CASES[case]
    weight = random_weight(out, inputs, group, widths, seed=case)
    packed = PackedLinear(weight)
    rng = np.random.default_rng(200 + case)
    x = rng.standard_normal(inputs).astype(np.float32)
    assert_close(packed.gemv(x, isa="avx2"), packed.gemv(x, isa="scalar"), rel=1e-5)
    tokens = rng.standard_normal((5, inputs)).astype(np.float32)
    assert_close(packed.gemm(tokens, isa="avx2"), packed.gemm(tokens, isa="scalar"), rel=1e-5)
    if "avx512" in ISAS:  # the same kernels with one-instruction lookups: the same floats, the same sums
        assert np.array_equal(packed.gemv(x, isa="avx512"), packed.gemv(x, isa="avx2"))
    rows = PackedLinear(weight, layout="rows")  # the layouts only move bytes: the same products, bit for bit
    for isa in ISAS:
        assert np.array_equal(rows.gemv(x, isa=isa), packed.gemv(x, isa=isa))
        assert np.array_equal(rows.gemm(tokens, isa=isa), packed.gemm(tokens, isa=isa))


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_a_bit(isa: str) -> None:
    packed = PackedLinear(random_weight(203, 576, 64, (1, 2, 4), seed=7))
    rng = np.random.default_rng(8)
    x = rng.standard_normal(576).astype(np.float32)
    tokens = rng.standard_normal((5, 576)).astype(np.float32)
    one, two, three = (packed.gemv(x, threads=t, isa=isa) for t in (1, 2, 3))
    assert np.array_equal(one, two) and np.array_equal(one, three)
    one, two = (packed.gemm(tokens, threads=t, isa=isa) for t in (1, 2))
    assert np.array_equal(one, two)


@pytest.mark.parametrize("isa", ISAS)
def test_kept_tables_are_never_stale(isa: str) -> None:
    """Each thread keeps the tables of its last input for the next product of the same input (a layer's q, k and v):
    an input rewritten in place, a layer with other groups (other per-group sums) or another width must not find
    them."""
    rng = np.random.default_rng(31)
    weights = [random_weight(24, 96, group, (1, 2), seed=40 + group) for group in (0, 32, 64)]
    packed = [PackedLinear(w) for w in weights]
    x = rng.standard_normal(96).astype(np.float32)
    for _ in range(2):
        for weight, layer in zip(weights, packed):  # the same buffer, three group sizes
            assert_close(layer.gemv(x, isa=isa, threads=2), weight.dequantize() @ x)
        x[5] += 1.0  # the same buffer, new content
    narrow = random_weight(8, 64, 0, (1, 2), seed=50)
    assert_close(PackedLinear(narrow).gemv(x[:64], isa=isa), narrow.dequantize() @ x[:64])


def test_packing_keeps_the_callers_weight_and_the_file_size() -> None:
    weight = random_weight(16, 100, 32, (2,), seed=3)
    codes = weight.codes.copy()
    packed = PackedLinear(weight)
    assert np.array_equal(weight.codes, codes)
    assert packed.nbytes == weight.codes.nbytes + weight.codebooks.nbytes + weight.scales.nbytes + weight.widths.nbytes


def test_bad_inputs_are_refused_with_what_was_expected() -> None:
    packed = PackedLinear(random_weight(4, 10, 0, (1,), seed=4))
    with pytest.raises(ConfigError, match=r"expected \[in_features\] with in_features=10"):
        packed.gemv(np.zeros(11, dtype=np.float32))
    with pytest.raises(ConfigError, match=r"expected \[n_tokens, in_features\]"):
        packed.gemm(np.zeros(10, dtype=np.float32))
    with pytest.raises(ConfigError, match="isa 'neon' is unknown"):
        packed.gemv(np.zeros(10, dtype=np.float32), isa="neon")
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        packed.gemv(np.zeros(10, dtype=np.float32), threads=0)
    with pytest.raises(ConfigError, match=r"layout 'columns' is unknown; expected one of \['blocked', 'rows'\]"):
        PackedLinear(random_weight(4, 10, 0, (1,), seed=4), layout="columns")


def test_a_plan_gives_the_plain_calls_bits_and_refuses_another_layer() -> None:
    """PackedLinear multiplies through a kept plan; the plain entry points (a plan per call) give the same bits, and
    a plan used with a layer of other widths is refused instead of reading the codes wrongly."""
    lib = load_library()
    weight = random_weight(40, 576, 64, (1, 2, 4), seed=21)
    packed = PackedLinear(weight)
    rng = np.random.default_rng(22)
    x = rng.standard_normal(576).astype(np.float32)
    tokens = rng.standard_normal((3, 576)).astype(np.float32)
    plain = np.empty(40, dtype=np.float32)
    assert lib.lowra_lowbit_gemv(ctypes.byref(packed._layer), x.ctypes.data, plain.ctypes.data, 1, 0) == 0
    assert np.array_equal(plain, packed.gemv(x))
    plain = np.empty((3, 40), dtype=np.float32)
    assert lib.lowra_lowbit_gemm(ctypes.byref(packed._layer), tokens.ctypes.data, 3, plain.ctypes.data, 2, 0) == 0
    assert np.array_equal(plain, packed.gemm(tokens, threads=2))
    other = PackedLinear(random_weight(40, 576, 64, (1, 2, 4), seed=23))  # same shape, other widths
    y = np.empty(40, dtype=np.float32)
    status = lib.lowra_lowbit_plan_gemv(packed._plan, ctypes.byref(other._layer), x.ctypes.data, y.ctypes.data, 1, 0)
    assert lib.lowra_lowbit_status_name(status) == b"the plan was made for a layer of another shape, layout or widths"
    assert lib.lowra_lowbit_plan_gemv(None, ctypes.byref(packed._layer), x.ctypes.data, y.ctypes.data, 1, 0) == 1


def test_the_c_abi_refuses_a_width_outside_1_2_4() -> None:
    lib = load_library()
    widths, codes = np.array([3], dtype=np.uint8), np.zeros(3, dtype=np.uint8)
    status = lib.lowra_lowbit_repack(1, 8, widths.ctypes.data, codes.ctypes.data)
    assert lib.lowra_lowbit_status_name(status) == b"row width not in {1, 2, 4}"
    assert lib.lowra_lowbit_gemv(None, None, None, 1, 0) == 1  # null pointers: invalid argument, no crash
    assert ctypes.sizeof(ctypes.c_int) == 4


# ------------------------------------------------------------------------------------------------ float16 GEMM
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("out", "inputs", "tokens"), [(203, 576, 1), (203, 576, 5), (7, 13, 3), (4, 8, 2), (1, 1, 1)])
def test_f16_gemm_matches_float64_and_is_the_same_on_every_path(out: int, inputs: int, tokens: int, isa: str) -> None:
    rng = np.random.default_rng(out * inputs + tokens)
    weight = (rng.standard_normal((out, inputs)) * 0.1).astype(np.float16)
    x = rng.standard_normal((tokens, inputs)).astype(np.float32)
    reference = x.astype(np.float64) @ weight.astype(np.float64).T
    got = f16_gemm(weight, x, isa=isa)
    assert got.dtype == np.float32 and got.shape == (tokens, out)
    assert_close(got, reference, rel=1e-5)
    assert np.array_equal(got, f16_gemm(weight, x, threads=3, isa=isa))  # rows are split, sums are not
    assert np.array_equal(got[-1:], f16_gemm(weight, x[-1:], isa=isa))  # a token's row does not depend on the others
    if isa == "avx2":
        assert np.array_equal(got, f16_gemm(weight, x, isa="scalar"))  # the same order of additions


def test_f16_gemm_refuses_what_it_cannot_multiply() -> None:
    with pytest.raises(ConfigError, match=r"expected a float16 \[out, in\] matrix"):
        f16_gemm(np.zeros((2, 3), dtype=np.float32), np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"expected \[n_tokens >= 1, 3\]"):
        f16_gemm(np.zeros((2, 3), dtype=np.float16), np.zeros((1, 4), dtype=np.float32))
    assert load_library().lowra_f16_gemm(None, 1, 1, None, 1, None, 1, 0) == 1  # null pointers: invalid argument


# ------------------------------------------------------------------------------------------------ 8-bit GEMM
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("out", "inputs", "tokens"), [(203, 576, 1), (203, 576, 5), (7, 32, 3), (1, 64, 2)])
def test_q8_gemm_matches_the_decoded_rows_and_is_the_same_on_every_path(out: int, inputs: int, tokens: int,
                                                                        isa: str) -> None:
    rng = np.random.default_rng(out + inputs + tokens)
    weight = rng.standard_normal((out, inputs)).astype(np.float32) * rng.uniform(0.01, 3, size=(out, 1))
    weight[0, :32] = 0  # a block of zeros: scale 0
    codes, scales = quantize_q8(weight)
    decoded = dequantize_q8(codes, scales)
    assert np.abs(decoded - weight).max() <= np.abs(weight).max() / 254 * 1.01  # half a step of the largest block
    x = rng.standard_normal((tokens, inputs)).astype(np.float32)
    reference = x.astype(np.float64) @ decoded.astype(np.float64).T
    got = q8_gemm(codes, scales, x, isa=isa)
    assert got.shape == (tokens, out)
    assert_close(got, reference, rel=1e-5)
    assert np.array_equal(got, q8_gemm(codes, scales, x, threads=3, isa=isa))
    assert np.array_equal(got[-1:], q8_gemm(codes, scales, x[-1:], isa=isa))
    if isa != "scalar":
        assert np.array_equal(got, q8_gemm(codes, scales, x, isa="scalar"))  # the same order of additions


def test_q8_rows_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="cols a multiple of 32"):
        quantize_q8(np.zeros((2, 40), dtype=np.float32))
    with pytest.raises(ConfigError, match="NaN or infinite"):
        quantize_q8(np.full((1, 32), np.inf, dtype=np.float32))
    codes, scales = quantize_q8(np.ones((2, 32), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"expected int8 \[out, in\]"):
        q8_gemm(codes.astype(np.int16), scales, np.zeros((1, 32), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"expected \[n_tokens >= 1, 32\]"):
        q8_gemm(codes, scales, np.zeros((1, 31), dtype=np.float32))
    assert load_library().lowra_q8_gemm(None, None, 1, 32, None, 1, None, 1, 0) == 1  # null pointers: invalid


# ------------------------------------------------------------------------------------------------ low-rank side branch
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rank", "out", "inputs", "tokens"),
                         [(8, 1536, 576, 1), (8, 203, 575, 5), (16, 64, 1536, 2), (3, 19, 7, 3), (1, 1, 1, 1)])
def test_lowrank_add_matches_float64_and_is_the_same_on_every_path(rank: int, out: int, inputs: int, tokens: int,
                                                                   isa: str) -> None:
    rng = np.random.default_rng(rank * out + inputs)
    down = rng.standard_normal((rank, inputs)).astype(np.float32)
    up = rng.standard_normal((out, rank)).astype(np.float32)
    x = rng.standard_normal((tokens, inputs)).astype(np.float32)
    y0 = rng.standard_normal((tokens, out)).astype(np.float32)
    got = lowrank_add(down, up, x, y0.copy(), isa=isa)
    reference = y0.astype(np.float64) + (x.astype(np.float64) @ down.T.astype(np.float64)) @ up.T.astype(np.float64)
    scale = np.abs(x).max() * np.abs(down).max() * np.abs(up).max() * inputs * rank + np.abs(y0).max()
    assert np.abs(got - reference).max() <= 1e-6 * scale
    assert np.array_equal(got[-1:], lowrank_add(down, up, x[-1:], y0[-1:].copy(), isa=isa))  # tokens are independent
    assert np.array_equal(got, lowrank_add(down, up, x, y0.copy(), threads=2, isa=isa))  # the split changes no bit
    if isa != "scalar":
        assert np.array_equal(got, lowrank_add(down, up, x, y0.copy(), isa="scalar"))  # the same order of additions
    # float16 factors (what a blob's levels are): the bits of the same values in float32.
    down16, up16 = down.astype(np.float16), up.astype(np.float16)
    assert np.array_equal(lowrank_add(down16, up16, x, y0.copy(), isa=isa),
                          lowrank_add(down16.astype(np.float32), up16.astype(np.float32), x, y0.copy(), isa=isa))


def unpack4(codes: np.ndarray, length: int) -> np.ndarray:
    """[rows, ceil(length / 2)] bytes -> [rows, length] 4-bit codes (the even one in the low nibble)."""
    return np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)[:, :length]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rank", "out", "inputs", "tokens"), [(8, 1536, 576, 1), (8, 203, 575, 3), (3, 19, 7, 2)])
def test_lowrank4_add_is_lowrank_add_on_the_decoded_factors(rank: int, out: int, inputs: int, tokens: int,
                                                            isa: str) -> None:
    """4-bit codes and float16 books give the bits lowrank_add gives on the factors they decode to."""
    rng = np.random.default_rng(rank + out + inputs)
    down_codes = rng.integers(0, 256, (rank, -(-inputs // 2)), dtype=np.uint8)
    up_codes = rng.integers(0, 256, (rank, -(-out // 2)), dtype=np.uint8)
    down_books, up_books = (rng.standard_normal((rank, 16)).astype(np.float16) for _ in range(2))
    down = np.take_along_axis(down_books, unpack4(down_codes, inputs).astype(np.int64), axis=1)
    up = np.take_along_axis(up_books, unpack4(up_codes, out).astype(np.int64), axis=1).T
    x = rng.standard_normal((tokens, inputs)).astype(np.float32)
    y0 = rng.standard_normal((tokens, out)).astype(np.float32)
    got = lowrank4_add(down_codes, down_books, up_codes, up_books, x, y0.copy(), isa=isa)
    assert np.array_equal(got, lowrank_add(down, up, x, y0.copy(), isa=isa))
    assert np.array_equal(got, lowrank4_add(down_codes, down_books, up_codes, up_books, x, y0.copy(), threads=2, isa=isa))
    if isa != "scalar":
        assert np.array_equal(got, lowrank4_add(down_codes, down_books, up_codes, up_books, x, y0.copy(), isa="scalar"))


def test_lowrank_add_leaves_a_token_without_a_user_alone() -> None:
    """Zero factors (no user loaded) add nothing and up is not even read: a NaN there does not reach y."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = rng.standard_normal((2, 24)).astype(np.float32)
    up = np.full((24, 8), np.nan, dtype=np.float32)
    assert np.array_equal(lowrank_add(np.zeros((8, 64), np.float32), up, x, y.copy()), y)
    down = rng.standard_normal((8, 64)).astype(np.float32)
    x[1] = 0  # a zero input: that token alone is skipped
    got = lowrank_add(down, up, x, y.copy())
    assert np.isnan(got[0]).all() and np.array_equal(got[1], y[1])


def test_lowrank_add_refuses_what_it_cannot_multiply() -> None:
    down, up = np.zeros((8, 16), np.float32), np.zeros((4, 8), np.float32)
    with pytest.raises(ConfigError, match=r"expected \[rank, in\] and \[out, rank\]"):
        lowrank_add(down, np.zeros((4, 7), np.float32), np.zeros((1, 16), np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match=r"expected \[n_tokens >= 1, 16\]"):
        lowrank_add(down, up, np.zeros((1, 15), np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match=r"float32 array of shape \[1, 4\]"):
        lowrank_add(down, up, np.zeros((1, 16), np.float32), np.zeros((1, 4), np.float64))
    assert load_library().lowra_lowrank_add(None, None, 8, 16, 4, None, 1, None, 1, 0) == 1  # null pointers: invalid


# ------------------------------------------------------------------------------------------------ attention
def attention_float64(q, k, v, mask, scale, causal):
    """The definition, in float64: [B, H, Q, D] x [B, KV, S, D] -> [B, Q, H, D]."""
    heads, kv_heads, queries, keys = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k64, v64 = (np.repeat(t.astype(np.float64), heads // kv_heads, axis=1) for t in (k, v))
    scores = scale * q.astype(np.float64) @ k64.transpose(0, 1, 3, 2)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    elif causal:
        scores = np.where(np.tril(np.ones((queries, keys), bool)), scores, -np.inf)
    best = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(best), best, 0))
    total = weights.sum(axis=-1, keepdims=True)
    out = np.where(total > 0, weights @ v64 / np.where(total > 0, total, 1), 0)
    return out.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", ["bool", "float", "causal", "none"])
def test_attention_matches_float64_and_is_the_same_on_every_path(case: str, isa: str) -> None:
    rng = np.random.default_rng(len(case))
    batch, heads, kv_heads, queries, keys, dim = 2, 9, 3, 3, 37, 64
    q = rng.standard_normal((batch, heads, queries, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, keys, dim)).astype(np.float32) for _ in range(2))
    mask = None
    if case == "bool":  # per batch, broadcast over heads; one query sees no key at all
        mask = rng.random((batch, 1, queries, keys)) < 0.6
        mask[1, 0, 2] = False
    elif case == "float":  # per head, broadcast over the batch; -inf masks
        mask = rng.standard_normal((1, heads, queries, keys)).astype(np.float32)
        mask[rng.random(mask.shape) < 0.3] = -np.inf
    got = attention(q, k, v, mask, scale=0.125, causal=case == "causal", isa=isa)
    reference = attention_float64(q, k, v, mask, 0.125, case == "causal")
    assert got.shape == (batch, queries, heads, dim)
    assert np.abs(got - reference).max() <= 1e-5
    if case == "bool":
        assert not got[1, 2, :3].any()  # every key masked: zeros (heads 0-2 read that batch's mask row)
    assert np.array_equal(got, attention(q, k, v, mask, 0.125, case == "causal", threads=3, isa=isa))
    if isa != "scalar":
        assert np.array_equal(got, attention(q, k, v, mask, 0.125, case == "causal", isa="scalar"))


def test_attention_refuses_what_it_cannot_attend() -> None:
    q, kv = np.zeros((1, 4, 2, 8), np.float32), np.zeros((1, 3, 5, 8), np.float32)
    with pytest.raises(ConfigError, match="H a multiple of KV"):
        attention(q, kv, kv)
    kv = np.zeros((1, 2, 5, 8), np.float32)
    with pytest.raises(ConfigError, match=r"expected bool or float32 \[1\|1, 1\|4, 2, 5\]"):
        attention(q, kv, kv, np.zeros((1, 1, 2, 4), bool))
    assert load_library().lowra_attention(None, None, None, 1, 1, 1, 1, 1, 1, None, None, 0, 0, 0, 1.0, None, 1, 0) == 1


def test_kernel_layout_codes_is_the_c_repack_and_inverts() -> None:
    """The Python definition of the kernels' code layout (what exported programs store) equals lowra_lowbit_repack,
    and maps back to the file's bytes."""
    from lowra.device_runtime.formats.quantized_weight import kernel_layout_codes

    weight = random_weight(60, 77, 0, (1, 2, 4), seed=11)
    planar = kernel_layout_codes(weight.codes, weight.widths, weight.in_features)
    assert np.array_equal(planar, PackedLinear(weight, layout="rows")._codes)
    assert not np.array_equal(planar, weight.codes)  # 2-bit rows changed
    assert np.array_equal(kernel_layout_codes(planar, weight.widths, weight.in_features, to_kernel=False), weight.codes)


@pytest.mark.parametrize(("out", "inputs"), [(60, 77), (203, 576), (9, 3), (17, 64)])
def test_kernel_blocked_codes_is_the_c_layout_and_inverts(out: int, inputs: int) -> None:
    """The Python definition of the BLOCKED layout (what exported programs store) equals lowra_lowbit_block,
    including partial last words (in_features not a multiple of 32) and blocks of fewer than 8 rows."""
    from lowra.device_runtime.formats.quantized_weight import BLOCK_ROWS, blocked_code_order, kernel_blocked_codes

    weight = random_weight(out, inputs, 0, (1, 2, 4), seed=out)
    blocked = kernel_blocked_codes(weight.codes, weight.widths, weight.in_features)
    assert np.array_equal(blocked, PackedLinear(weight)._codes)
    assert np.array_equal(kernel_blocked_codes(blocked, weight.widths, weight.in_features, to_kernel=False), weight.codes)
    order = blocked_code_order(weight.widths, weight.in_features)
    assert np.array_equal(np.sort(order), np.arange(weight.codes.size))  # a permutation: the file's size exactly
    # the first block holds the first 8 one-bit rows' first words, interleaved
    one_bit = np.flatnonzero(weight.widths == 1)[:BLOCK_ROWS]
    starts = weight.row_code_offsets[one_bit]
    if inputs >= 32 and one_bit.size == BLOCK_ROWS:
        assert np.array_equal(order[: 4 * BLOCK_ROWS], (starts[:, None] + np.arange(4)).ravel())

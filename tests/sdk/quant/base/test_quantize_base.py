"""Base quantization: the decode is the formula, codes are nearest, budgets hold to the byte, refusals are clear."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.quant.base.apply import quantize_model
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import quantize_weight
from lowra.sdk.quant.base.sensitivity import CalibrationStats

CREATED = "2026-01-01T00:00:00+00:00"


class Toy(nn.Module):
    """Embedding, three linears (one with bias, one whose width does not divide the group), a norm, a tied head."""

    def __init__(self, seed: int = 0, hidden: int = 96, inner: int = 200):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, hidden)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, 50, bias=False)
        self.lm_head.weight = self.embed.weight
        with torch.no_grad():  # heavier-tailed rows of different scales, like trained weights
            for lin in (self.up, self.down, self.proj):
                lin.weight.mul_(torch.exp(torch.randn(lin.weight.shape[0], 1)))

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.proj(self.down(torch.relu(self.up(h))))
        return self.lm_head(self.norm(h))


def element_checks(W: torch.Tensor, qw, group: int) -> None:
    """Scales are float16 absmax, codes are nearest among the float16 levels, decode is level * scale."""
    Wn = W.double().numpy()
    out, n_in = Wn.shape
    deq = qw.dequantize().astype(np.float64)
    lev_off = qw.row_level_offsets
    for r in range(out):
        levels = qw.codebooks[lev_off[r] : lev_off[r + 1]].astype(np.float64)
        assert np.all(np.diff(levels) >= 0) and levels.size == 1 << int(qw.widths[r])
        for j in range(n_in):
            s = 1.0
            if group:
                g = j // group
                s = float(qw.scales[r, g])
                assert s == float(np.float16(np.abs(Wn[r, g * group : (g + 1) * group]).max()))
            if s == 0:
                assert deq[r, j] == 0
                continue
            level = deq[r, j] / s  # exact: a float16 x float16 product is exact in float32
            assert level in levels
            x = Wn[r, j] / s
            assert abs(x - level) <= np.min(np.abs(levels - x)) + 1e-12


@pytest.mark.parametrize("group", [32, 0, 16])
def test_quantize_weight_is_the_formula_with_nearest_codes(group):
    torch.manual_seed(0)
    W = torch.randn(7, 70)  # 70 = 2 * 32 + 6: a partial last group
    W[3, 40:] = 0  # zero groups: scale 0, decode 0
    widths = torch.tensor([1, 2, 4, 2, 1, 4, 4])
    qw = quantize_weight(W, widths, group_size=group)
    qw.validate()
    assert qw.widths.tolist() == widths.tolist()
    assert qw.scales.shape == ((7, -(-70 // group)) if group else (7, 0))
    element_checks(W, qw, group)
    if group == 32:
        assert np.all(qw.dequantize()[3, 64:] == 0) and qw.scales[3, 2] == 0


def test_error_shrinks_with_width_and_matches_gaussian_theory():
    torch.manual_seed(1)
    W = torch.randn(64, 512)
    errs = [float(((quantize_weight(W, w, 0).dequantize() - W.numpy()) ** 2).mean() / W.var()) for w in (1, 2, 4)]
    # Per-row Lloyd-Max on Gaussian rows: the optimal scalar quantizer is 0.3634 / 0.1175 / 0.0095.
    assert errs[0] == pytest.approx(0.3634, abs=0.01)
    assert errs[1] == pytest.approx(0.1175, abs=0.005)
    # 16 levels fitted to 512 samples do better than on the distribution (they fit the sample).
    assert 0.006 < errs[2] < 0.0095
    # Absmax groups pay off only where the scale varies along the row (i.i.d. rows: no gain, 0.1154 vs 0.1152).
    V = W * torch.exp(torch.randn(64, 8)).repeat_interleave(64, 1)
    err = lambda g: float(((quantize_weight(V, 2, g).dequantize() - V.numpy()) ** 2).mean() / V.var())  # noqa: E731
    assert err(64) < 0.7 * err(0)


def test_input_weighting_lowers_the_weighted_error():
    torch.manual_seed(2)
    W = torch.randn(16, 256)
    ms = torch.exp(3 * torch.randn(256))  # a few features dominate the output
    plain = quantize_weight(W, 1, 64).dequantize()
    weighted = quantize_weight(W, 1, 64, input_ms=ms).dequantize()
    e = lambda d: float((((d - W.numpy()) ** 2) * ms.numpy()[None, :]).sum())  # noqa: E731
    assert e(weighted) < 0.8 * e(plain)


def test_zero_rows_and_tiny_rows_decode_safely():
    W = torch.zeros(3, 40)
    W[1, 5] = 1e-9  # below float16's smallest subnormal: scale 0
    W[2] = torch.linspace(-1, 1, 40)
    for group in (0, 8):
        qw = quantize_weight(W, [1, 2, 4], group)
        deq = qw.dequantize()
        assert np.all(np.isfinite(qw.codebooks)) and np.all(deq[0] == 0)
        assert np.abs(deq[1]).max() <= 1e-6
        assert np.abs(deq[2] - W[2].numpy()).max() < 0.1


def test_refusals_name_the_problem():
    W = torch.randn(4, 10)
    W[2, 3] = float("nan")
    with pytest.raises(ConfigError, match=r"layer blocks.7.q: weight has NaN or Inf in 1 row\(s\) \(first: row 2\)"):
        quantize_weight(W, 2, name="blocks.7.q")
    with pytest.raises(ConfigError, match=r"row widths \[3\] are not storable"):
        quantize_weight(torch.randn(2, 8), [1, 3])
    with pytest.raises(ConfigError, match="one per output row"):
        quantize_weight(torch.randn(2, 8), [1, 2, 4])
    with pytest.raises(ConfigError, match="float16 range"):
        quantize_weight(torch.full((2, 8), 1e6), 2, group_size=4)
    with pytest.raises(ConfigError, match="input statistics must be 8"):
        quantize_weight(torch.randn(2, 8), 2, input_ms=torch.ones(5))
    with pytest.raises(ConfigError, match="group_size must be an integer"):
        QuantizeConfig(group_size=-1)
    for bad in (0, -1, float("nan"), "2"):
        with pytest.raises(BudgetError):
            QuantizeConfig(bits=bad)


# ----------------------------------------------------------------------------------------------- whole model
def quantize(bits: float, group: int = 32, **kw):
    return quantize_model(Toy(), QuantizeConfig(bits=bits, group_size=group, calibration=None), progress=False,
                          created=CREATED, **kw)


@pytest.fixture(scope="module")
def toy_bases():
    return {bits: quantize(bits) for bits in (2.5, 3.0, 4.0)}


def test_budget_is_honoured_to_the_byte(toy_bases, tmp_path):
    errors = []
    for bits, base in toy_bases.items():
        data = base.to_bytes()
        assert len(data) == base.file_bytes
        report = base.bits_report()
        n = report["n_quantized_params"]
        assert n == 96 * 200 * 2 + 96 * 96
        dense_bytes = report["bytes"]["dense"]
        assert 8 * (len(data) - dense_bytes) <= bits * n  # every byte but the dense data, under the budget
        # and nearly all of it is used: the slack is below one 4-bit row upgrade plus the header bound's slack
        assert bits * n - 8 * (len(data) - dense_bytes) < 8 * (200 // 2 + 32) + 8 * 64
        assert report["effective_bits"] == pytest.approx(8 * (len(data) - dense_bytes) / n)
        errors.append(base.report["total"]["mse_over_var"])
        hist = base.report["total"]["widths"]
        assert sum(hist.values()) == 200 + 96 + 96
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.2 and errors[2] < 0.03


def test_dense_tensors_are_float16_and_tied_head_is_an_alias(toy_bases):
    base = toy_bases[3.0]
    assert set(base.layers) == {"up", "down", "proj"}
    assert set(base.dense) == {"embed.weight", "down.bias", "norm.weight", "norm.bias"}
    assert all(a.dtype == np.float16 for a in base.dense.values())
    assert base.aliases == {"lm_head.weight": "embed.weight"}
    assert base.bits_report()["bytes"]["dense"] == 2 * (50 * 96 + 96 + 96 + 96)


def test_written_base_reads_back_and_runs_like_the_model(toy_bases, tmp_path):
    base = toy_bases[4.0]
    path = base.write(tmp_path / "toy.lowrabase")
    read = read_quantized_base(path)
    assert read.fingerprint == base.fingerprint and read.file_bytes == base.file_bytes
    assert read.metadata["report"] == base.metadata["report"]
    assert read.metadata["scheme"]["budget_bits"] == 4.0
    sd = read.dequantized_state_dict()
    model, quantized = Toy(), Toy()
    quantized.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    ids = torch.arange(20)[None, :]
    ref, got = model(ids), quantized(ids)
    assert float((got - ref).pow(2).mean() / ref.var()) < 0.02


def test_per_module_report_rows(toy_bases):
    base = toy_bases[2.5]
    report = base.report
    assert report["columns"] == ["mse_over_var", "effective_bits", "code_bits", "rows_1bit", "rows_2bit", "rows_4bit"]
    for (name, out, n_in, group), row in zip(base.metadata.get("modules") or [], report["modules"]):
        assert sum(row[3:]) == out
    rows = dict(zip(["up", "down", "proj"], report["modules"]))
    for name, row in rows.items():
        qw = base.layers[name]
        assert row[2] == pytest.approx(qw.code_bits() / (qw.out_features * qw.in_features), rel=1e-5)
        assert row[1] > row[2]  # effective bits include scales and codebooks


def test_budgets_outside_the_widths_are_refused():
    with pytest.raises(BudgetError, match=r"below the smallest storable base: \d+\.\d+.*at least"):
        quantize(2.0)  # this toy's header alone is ~0.7 bit/param
    with pytest.raises(BudgetError, match=r"above what the widths can use: \d+\.\d+.*at most"):
        quantize(12.0)


def test_group_size_zero_and_partial_groups():
    no_groups = quantize(2.5, group=0)
    assert all(q.scales.shape[1] == 0 for q in no_groups.layers.values())
    partial = quantize(2.5, group=64)  # 200 inputs of `down` -> groups of 64, 64, 64, 8
    assert partial.layers["down"].scales.shape == (96, 4)


def test_weighted_needs_statistics_and_uses_them():
    names = ["up", "down", "proj"]
    calibrated = QuantizeConfig(bits=2.5, group_size=32, sensitivity="none", error_feedback=False)
    with pytest.raises(ConfigError, match="calibrated QuantizeConfig needs input statistics.*missing"):
        quantize_model(Toy(), calibrated, calibration=CalibrationStats({}), progress=False)
    with pytest.raises(ConfigError, match="calibration needs the model's tokenizer"):
        quantize_model(Toy(), calibrated, progress=False)
    gen = torch.Generator().manual_seed(0)
    stats = {n: torch.exp(2 * torch.randn(Toy().get_submodule(n).in_features, generator=gen)) for n in names}
    weighted = quantize_model(Toy(), calibrated, calibration=CalibrationStats(stats), progress=False)
    plain = quantize(2.5, calibration=CalibrationStats(stats))  # stats given but calibration=None: ignored
    assert "output_error" in weighted.report["total"] and "output_error" not in plain.report["total"]
    model = Toy()

    def output_error(base):
        sd = base.dequantized_state_dict()
        tot = ref = 0.0
        for n in names:
            W = model.get_submodule(n).weight.detach().double().numpy()
            ms = stats[n].double().numpy()
            tot += float((((sd[f"{n}.weight"] - W) ** 2) * ms).sum())
            ref += float(((W**2) * ms).sum())
        return tot / ref

    assert output_error(weighted) < 0.8 * output_error(plain)
    assert weighted.report["total"]["output_error"] == pytest.approx(output_error(weighted), rel=1e-4)


def test_nan_weight_in_a_model_names_the_layer():
    model = Toy()
    with torch.no_grad():
        model.down.weight[5, 7] = float("inf")
    with pytest.raises(ConfigError, match=r"layer down: .* \(first: row 5\)"):
        quantize_model(model, QuantizeConfig(bits=2.5, group_size=32, calibration=None), progress=False)


def test_cli_quantize_base(tmp_path, capsys, tiny_tokenizer):
    from lowra.sdk.cli import main

    from tests.conftest import build_tiny_model

    base_dir = tmp_path / "tiny-base"
    build_tiny_model().save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    out = tmp_path / "base.safetensors"
    args = ["quantize-base", "--base", str(base_dir), "--bits", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "effective bits/param" in printed and "MSE / weight variance" in printed and "rows: 1-bit" in printed
    assert "codebooks: integers x 2**e per row (6 bits; 8 in 4-bit rows), format version 4" in printed
    read = read_quantized_base(out)
    assert read.bits_report()["effective_bits"] <= 8.0
    assert len(read.layers) == 14 and read.metadata["source"] == str(base_dir)
    assert main(args) == 2  # exists, no --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(args[:-2] + ["--out", str(tmp_path / "low.safetensors"), "--bits", "2"]) == 2
    assert "below the smallest storable base" in capsys.readouterr().err
    assert main(args + ["--force", "--group-size", "16"]) == 0
    assert read_quantized_base(out).layers["model.layers.0.mlp.down_proj"].scales.shape == (32, 4)


def test_record_input_stats_is_the_mean_square_of_each_linear_input():
    from lowra.sdk.quant.base.apply import record_input_stats

    model = Toy()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = record_input_stats(model, [{"input_ids": ids, "attention_mask": mask}])
    assert set(stats) == {"up", "down", "proj"}
    with torch.no_grad():
        h = model.embed(ids)[mask.bool()]  # the 6 real tokens
        expected_up = (h * h).mean(0)
        a = torch.relu(model.up(h))
        expected_down = (a * a).mean(0)
    torch.testing.assert_close(stats["up"], expected_up, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["down"], expected_down, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="no calibration tokens"):
        record_input_stats(model, [])


# ------------------------------------------------------------------------------------------ integer codebooks (v4)
def test_int_levels_are_on_the_grid_and_no_worse_than_nearest_rounding():
    from lowra.device_runtime.formats.int_levels import encode_levels, grid_exponents, level_limit
    from lowra.sdk.quant.base.fit import int_levels, prepare_layer, row_histogram
    from lowra.sdk.quant.codebook import _SortedRows, lloyd_max

    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 0.02
    W[5] = 0  # a dead row
    hist = row_histogram(prepare_layer("w", W, 0, None))
    rows = _SortedRows(hist.centroids, hist.mass)
    for width in (1, 2, 4):
        fitted = lloyd_max(hist.centroids, width, weight=hist.mass).levels
        got = int_levels(hist, fitted)
        assert torch.all(got[:, 1:] >= got[:, :-1])
        books = got.numpy().astype(np.float16)
        assert np.array_equal(books.astype(np.float64), got.numpy())  # exact float16 values
        encode_levels(books.reshape(-1), np.full(64, width, np.uint8), "w")  # storable: no ValueError
        assert not np.signbit(books[5]).any() and not books[5].any()
        # Nearest rounding at the smallest exponent that reaches the largest level is one of the candidates.
        step = torch.from_numpy(np.exp2(grid_exponents(fitted.abs().amax(1).numpy(), width)))[:, None]
        limit = level_limit(width)
        nearest = torch.sort(torch.round(fitted / step).clamp(-limit, limit) * step, 1).values
        got_sse, nearest_sse, fitted_sse = rows.distortion(got), rows.distortion(nearest), rows.distortion(fitted)
        assert torch.all(got_sse <= nearest_sse + 1e-18)
        # What the integer levels cost the fit on these short Gaussian rows: under 2% of its error at 1 and 2 bits
        # (6-bit levels) and at 4 bits (8-bit levels; 6-bit ones cost ~24% here, 16 levels on 63 grid points).
        assert float(got_sse.sum()) <= 1.02 * float(fitted_sse.sum()), width


def test_default_bases_store_integer_codebooks_and_spend_the_bits_on_wider_rows(tmp_path):
    toy = {fmt: quantize_model(Toy(), QuantizeConfig(bits=2.5, group_size=0, calibration=None, codebook_format=fmt),
                               progress=False, created=CREATED) for fmt in ("float16", "int")}
    assert QuantizeConfig().codebook_format == "int"
    f16, i6 = toy["float16"], toy["int"]
    assert (f16.codebook_format, i6.codebook_format) == ("float16", "int")
    assert i6.metadata["scheme"]["codebook_dtype"] == "integers (6 bits; 8 in 4-bit rows) x 2**e per row"
    for base in (f16, i6):
        r = base.bits_report()
        assert r["effective_bits"] <= 2.5 and len(base.to_bytes()) == base.file_bytes
    # Same budget: the cheaper codebooks buy wider rows and a smaller error.
    r16, r6 = f16.bits_report(), i6.bits_report()
    assert r6["bytes"]["codebooks"] < 0.7 * r16["bytes"]["codebooks"]
    assert r6["code_bits"] > r16["code_bits"]
    assert i6.report["total"]["mse_over_var"] < f16.report["total"]["mse_over_var"]
    # The per-module report counts the stored bytes of the layer (levels and exponents, not float16 levels).
    for name, row in zip(i6.layers, i6.report["modules"]):
        qw = i6.layers[name]
        level_bits = sum(int(np.sum(qw.widths == w)) * (6 if w < 4 else 8) << w for w in (1, 2, 4))
        stored = qw.codes.size + (level_bits + 7) // 8 + qw.out_features + (qw.out_features + 3) // 4
        assert row[1] == pytest.approx(8 * stored / (qw.out_features * qw.in_features), rel=1e-5)
    path = i6.write(tmp_path / "i6.safetensors")
    read = read_quantized_base(path)
    assert read.codebook_format == "int" and read.fingerprint == i6.fingerprint
    assert read.metadata["report"] == i6.metadata["report"]


def test_quantize_weight_int_levels_and_config_refusal():
    from lowra.device_runtime.formats.int_levels import encode_levels

    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    qw = quantize_weight(W, [1, 2, 4, 2, 1, 2, 4, 2], group_size=0, codebook_format="int")
    encode_levels(qw.codebooks, qw.widths, "w")
    with pytest.raises(ValueError, match="not 6-bit integers"):
        encode_levels(quantize_weight(W, 2, group_size=0).codebooks, np.full(8, 2, np.uint8), "w")
    with pytest.raises(ConfigError, match="codebook_format must be one of \\('float16', 'int'\\), got 'int8'"):
        QuantizeConfig(codebook_format="int8")

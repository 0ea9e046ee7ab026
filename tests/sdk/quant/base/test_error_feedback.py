"""Error-feedback rounding (GPTQ with per-row codebooks): nearest under an identity Hessian, a lower output error
where inputs correlate, codes always inside their row's codebook, and the file unchanged in layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.sdk.errors import ConfigError
from lowra.sdk.quant.base.apply import calibrate, quantize_model, record_input_stats, record_inputs
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import FINAL_GRID, assemble, fit_rows, prepare_layer, row_histogram
from lowra.sdk.quant.base.gptq import round_with_error_feedback
from lowra.sdk.quant.base.sensitivity import CalibrationStats

from tests.sdk.quant.base.test_quantize_base import CREATED, Toy

WIDTHS = np.array([1, 2, 4, 2, 1, 4, 4, 2] * 4, dtype=np.uint8)


def layer(group: int, n_in: int = 96, seed: int = 0, input_ms: torch.Tensor | None = None):
    """A prepared layer with mixed widths and its fitted codebooks (as the plan hands them to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(WIDTHS.size, n_in, generator=gen) * torch.exp(torch.randn(WIDTHS.size, 1, generator=gen))
    W[3, 40:] = 0  # zero groups: scale 0
    prep = prepare_layer("layer", W, group, input_ms)
    hist = row_histogram(prep)
    levels = {w: fit_rows(hist.rows(torch.from_numpy(np.nonzero(WIDTHS == w)[0])), w, FINAL_GRID[w])[0]
              for w in (1, 2, 4)}
    return prep, levels


def correlated_inputs(n_in: int, tokens: int = 4000, seed: int = 1) -> torch.Tensor:
    """Inputs driven by a few shared factors (like a transformer's residual stream): strongly correlated."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 8, generator=gen, dtype=torch.float64)
    mix = torch.randn(8, n_in, generator=gen, dtype=torch.float64)
    return factors @ mix + 0.1 * torch.randn(tokens, n_in, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("group", [0, 32])
def test_with_an_identity_hessian_the_codes_are_nearest_rounding(group):
    prep, levels = layer(group)
    rounding = round_with_error_feedback(prep, WIDTHS, levels, torch.eye(prep.shape[1]))
    fed, nearest = assemble(prep, WIDTHS, levels, rounding.codes), assemble(prep, WIDTHS, levels)
    assert np.array_equal(fed.codes, nearest.codes) and np.array_equal(fed.codebooks, nearest.codebooks)
    assert rounding.error_fed == rounding.error_nearest


@pytest.mark.parametrize("group", [0, 32])
def test_correlated_inputs_get_a_much_lower_output_error(group):
    X = correlated_inputs(96)
    H = X.T @ X / X.shape[0]
    prep, levels = layer(group, input_ms=H.diagonal().float())
    rounding = round_with_error_feedback(prep, WIDTHS, levels, H.float())
    fed, nearest = assemble(prep, WIDTHS, levels, rounding.codes), assemble(prep, WIDTHS, levels)
    W = prep.weight

    def output_error(qw) -> float:  # measured on the inputs themselves, not via the Hessian
        return float((((W - torch.from_numpy(qw.dequantize()).double()) @ X.T) ** 2).sum())

    assert output_error(fed) < 0.4 * output_error(nearest)  # measured 0.20 (no groups), 0.15 (32-groups)
    reference = float(((W @ X.T) ** 2).sum())
    assert rounding.error_fed / rounding.reference == pytest.approx(output_error(fed) / reference, rel=1e-3)
    assert rounding.error_nearest / rounding.reference == pytest.approx(output_error(nearest) / reference, rel=1e-3)
    # Only codes change: every code indexes its own row's codebook, which is the plan's, and scales are kept.
    assert np.array_equal(fed.codebooks, nearest.codebooks) and np.array_equal(fed.scales, nearest.scales)
    assert np.array_equal(fed.widths, WIDTHS)
    fed.validate()
    assert int(rounding.codes.max(initial=0)) < 16
    assert np.all(rounding.codes < (1 << WIDTHS.astype(np.int64))[:, None])
    deq = fed.dequantize()
    for r in range(WIDTHS.size):
        book = fed.codebooks[fed.row_level_offsets[r] : fed.row_level_offsets[r + 1]]
        scale = np.repeat(fed.scales[r], group)[: prep.shape[1]] if group else np.ones(prep.shape[1], np.float16)
        assert np.array_equal(deq[r], book[rounding.codes[r]].astype(np.float32) * scale.astype(np.float32))


def test_input_hessians_are_the_mean_outer_product_and_their_diagonal_is_the_mean_square():
    model = Toy()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    ms, hessians = record_inputs(model, batches, hessians=True)
    assert set(hessians) == {"up", "down", "proj"} and record_inputs(model, batches)[1] == {}
    for name, stat in record_input_stats(model, batches).items():
        assert torch.equal(ms[name], stat)
        torch.testing.assert_close(hessians[name].diagonal(), stat, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        h = model.embed(ids)[mask.bool()]
    torch.testing.assert_close(hessians["up"], h.T @ h / h.shape[0], rtol=1e-5, atol=1e-6)


def test_error_feedback_needs_hessians_and_a_bool():
    stats = CalibrationStats({n: torch.ones(Toy().get_submodule(n).in_features) for n in ("up", "down", "proj")})
    with pytest.raises(ConfigError, match="error feedback needs the input Hessian of every targeted module"):
        quantize_model(Toy(), QuantizeConfig(bits=2.5, sensitivity="none", error_feedback=True), calibration=stats,
                       progress=False)
    with pytest.raises(ConfigError, match="error_feedback must be True or False"):
        QuantizeConfig(error_feedback=1)
    assert not QuantizeConfig(calibration=None, error_feedback=True).feeds_back
    prep, levels = layer(0)
    with pytest.raises(ConfigError, match=r"input Hessian must be a finite \[96, 96\] matrix"):
        round_with_error_feedback(prep, WIDTHS, levels, torch.eye(95))


def test_an_error_fed_base_round_trips_bit_exactly_and_reports_its_errors(tiny_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    config = QuantizeConfig(bits=8.0, group_size=16, calibration=str(folder), error_feedback=True)
    stats = calibrate(tiny_model, config, tiny_tokenizer)
    assert set(stats.input_hessian) == set(stats.input_ms)
    base = quantize_model(tiny_model, config, calibration=stats, progress=False, created=CREATED)
    again = quantize_model(tiny_model, config, calibration=stats, progress=False, created=CREATED)
    assert base.to_bytes() == again.to_bytes()
    plain = quantize_model(tiny_model, QuantizeConfig(bits=8.0, group_size=16, calibration=str(folder),
                                                      error_feedback=False),
                           calibration=stats, progress=False, created=CREATED)
    path = base.write(tmp_path / "base.safetensors")
    read = read_quantized_base(path)
    assert read.fingerprint == base.fingerprint and path.read_bytes() == base.to_bytes()
    assert read.fingerprint != plain.fingerprint
    for name, layer_ in base.layers.items():
        got = read.layers[name]
        assert np.array_equal(got.codes, layer_.codes) and np.array_equal(got.widths, layer_.widths)
        assert np.array_equal(got.codebooks.view(np.uint16), layer_.codebooks.view(np.uint16))
    assert read.metadata["scheme"]["error_feedback"] is True
    assert plain.metadata["scheme"]["error_feedback"] is False
    report = read.report
    columns = report["columns"]
    assert columns[6:8] == ["output_error_nearest", "output_error_fed"]
    for row in report["modules"]:
        assert row[7] <= row[6]
    total = report["total"]
    assert total["output_error_fed"] < total["output_error_nearest"]
    assert "output_error_fed" not in plain.report["total"]
    assert read.bits_report()["effective_bits"] <= 8.0

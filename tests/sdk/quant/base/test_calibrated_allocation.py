"""Calibrated quantization: rows compete by expected output error (x layer sensitivity), not weight error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.sdk.errors import ConfigError
from lowra.sdk.quant.allocation import assign_precision
from lowra.sdk.quant.base.apply import calibrate, quantize_model
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.plan import plan_model
from lowra.sdk.quant.base.sensitivity import CalibrationStats, record_output_fisher

from tests.sdk.quant.base.test_quantize_base import CREATED, Toy

NAMES = ["up", "down", "proj"]


def constant_stats(value: float) -> CalibrationStats:
    model = Toy()
    return CalibrationStats({n: torch.full((model.get_submodule(n).in_features,), value) for n in NAMES})


def test_with_identical_statistics_the_cost_is_the_weight_error_times_a_constant():
    plain = plan_model(Toy(), QuantizeConfig(group_size=32, calibration=None), progress=False)
    calibrated = plan_model(Toy(), QuantizeConfig(group_size=32, sensitivity="none", error_feedback=False), constant_stats(3.0),
                            progress=False)
    np.testing.assert_allclose(calibrated.knapsack_distortion(), 3.0 * plain.knapsack_distortion(), rtol=1e-9)
    costs = plain.row_costs()
    for bits in (1.5, 2.5, 3.0):  # the same choice at the same budget (the files' headers differ in size)
        budget = bits * plain.n_params
        assert np.array_equal(assign_precision(costs, calibrated.knapsack_distortion(), budget),
                              assign_precision(costs, plain.knapsack_distortion(), budget))


def test_a_row_whose_inputs_never_fire_gets_the_fewest_bits():
    model = Toy()
    n_in = model.up.in_features
    with torch.no_grad():
        model.up.weight[:20, : n_in // 2] = 0  # rows 0-19 read only the second half of the inputs ...
    stats = constant_stats(1.0)
    stats.input_ms["up"][n_in // 2 :] = 0  # ... which never fire
    config = QuantizeConfig(bits=2.5, group_size=32, sensitivity="none", error_feedback=False)
    widths = quantize_model(model, config, calibration=stats, progress=False).layers["up"].widths
    assert np.all(widths[:20] == 1) and widths[20:].mean() > 1
    plain = quantize_model(model, QuantizeConfig(bits=2.5, group_size=32, calibration=None), progress=False)
    assert plain.layers["up"].widths[:20].mean() > 1  # by weight error alone these rows are ordinary


def test_output_fisher_is_the_mean_squared_loss_gradient_of_each_output():
    model = Toy()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    fisher = record_output_fisher(model, [{"input_ids": ids, "attention_mask": mask}])
    assert set(fisher) == set(NAMES) and all(p.requires_grad for p in model.parameters())
    h = model.embed(ids).detach()
    a = model.up(h)
    a.retain_grad()
    y = model.proj(model.down(torch.relu(a)))
    y.retain_grad()
    logits = model.lm_head(model.norm(h + y))[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
    for name, out in (("up", a), ("proj", y)):
        g = out.grad[mask.bool()].double()
        torch.testing.assert_close(fisher[name], (g * g).mean(0).float(), rtol=1e-4, atol=1e-12)


def test_layer_sensitivity_is_normalized_and_needs_the_fisher():
    stats = CalibrationStats({}, {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0])})
    assert stats.layer_sensitivity(["a", "b"], "fisher") == pytest.approx({"a": 2.0, "b": 1e-6})  # mean 1; b floored
    assert stats.layer_sensitivity(["a", "b"], "none") == {"a": 1.0, "b": 1.0}
    with pytest.raises(ConfigError, match="missing \\['c'\\]"):
        stats.layer_sensitivity(["a", "c"], "fisher")
    with pytest.raises(ConfigError, match="sensitivity must be one of"):
        QuantizeConfig(sensitivity="hessian")
    with pytest.raises(ConfigError, match="calibration must be"):
        QuantizeConfig(calibration="")


def test_calibrated_base_round_trips_through_the_file_and_reports_its_importance(tiny_model, tiny_tokenizer,
                                                                                 tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    config = QuantizeConfig(bits=8.0, group_size=16, calibration=str(folder))
    stats = calibrate(tiny_model, config, tiny_tokenizer)
    assert stats.tokens == 128 * 64 and set(stats.output_fisher) == set(stats.input_ms)
    base = quantize_model(tiny_model, config, tokenizer=tiny_tokenizer, progress=False, created=CREATED)
    again = quantize_model(tiny_model, config, calibration=stats, progress=False, created=CREATED)
    assert base.to_bytes() == again.to_bytes()  # deterministic: the same calibration recorded twice
    path = base.write(tmp_path / "base.safetensors")
    read = read_quantized_base(path)
    assert read.fingerprint == base.fingerprint and path.read_bytes() == base.to_bytes()
    for name, layer in base.layers.items():
        got = read.layers[name]
        assert np.array_equal(got.codes, layer.codes) and np.array_equal(got.widths, layer.widths)
        assert np.array_equal(got.codebooks.view(np.uint16), layer.codebooks.view(np.uint16))
    scheme, report = read.metadata["scheme"], read.report
    assert scheme["calibration"] == str(folder) and scheme["sensitivity"] == "fisher"
    assert scheme["calibration_tokens"] == stats.tokens and scheme["weighted"] is True
    columns = report["columns"]
    assert columns[3:6] == ["output_error", "input_ms_mean", "sensitivity"]
    sens = [row[columns.index("sensitivity")] for row in report["modules"]]
    assert np.mean(sens) == pytest.approx(1.0, rel=1e-4) and max(sens) > 1.0 > min(sens)

"""Every targeted row scored at every width, the precision assignment under a budget, and the packed base.

A :class:`QuantizePlan` holds the scores (the expensive part); :meth:`QuantizePlan.quantize` assigns widths under
a budget (step 3 in :mod:`lowra.sdk.quant.base`), refits each row at its width and packs the file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowra.device_runtime._files import utc_now
from lowra.device_runtime.formats.bitpack import packed_bytes
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.int_levels import codebook_bits as int_codebook_bits
from lowra.device_runtime.formats.quantized_base import (
    QuantizedBase,
    header_bytes_bound,
    quantized_fingerprint,
    serialized_size,
    stored_layer_tensors,
)
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.errors import BudgetError, ConfigError
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.allocation import assign_precision
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.fit import (
    DECISION_GRID,
    FINAL_GRID,
    HIST_BINS,
    TORCH_THREADS,
    PreparedLayer,
    RowBatcher,
    assemble,
    prepare_layer,
    row_histogram,
    intra_op_threads,
)
from lowra.sdk.quant.base.gptq import round_with_error_feedback
from lowra.sdk.quant.base.report import placeholder_report, report_json, report_round
from lowra.sdk.quant.base.sensitivity import CalibrationStats

METHOD = (
    "lowra: absmax groups + per-row weighted Lloyd-Max (128-bin) + knapsack over 1/2/4-bit rows "
    "(calibrated: E[x^2]-weighted output error x layer sensitivity)"
)


def row_costs(n_in: int, codebook_format: str = "float16") -> np.ndarray:
    """Bits of a row at widths 1, 2, 4: packed codes (byte-padded) + its codebook (float16 levels, or integer levels and
    the row's exponent)."""
    book = int_codebook_bits if codebook_format == "int" else (lambda w: 16 * (1 << w))
    return np.array([8 * packed_bytes(n_in, w) + book(w) for w in CODED_WIDTHS], dtype=np.float64)


def dense_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every state-dict tensor not quantized, floats as float16; tied tensors stored once (name -> alias)."""
    dense: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        t = tensor.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if t.is_floating_point():
            arr = t.to(torch.float32).numpy().astype(np.float16)
            if not np.all(np.isfinite(arr)):
                raise ConfigError(
                    f"tensor {name}: values are NaN/Inf or beyond the float16 range (65504) the quantized base "
                    "stores dense tensors in; fix the checkpoint"
                )
        else:
            arr = t.numpy().copy()
        dense[name] = arr
    return dense, aliases


class _Clock:
    """Adds the seconds since the last lap to ``sink[phase]`` (the ``timings`` argument; None: no-op)."""

    def __init__(self, sink: dict[str, float] | None):
        self.sink, self.last = sink, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.sink is not None:
            self.sink[phase] = self.sink.get(phase, 0.0) + now - self.last
        self.last = now


def refine(
    plan: "QuantizePlan", row_widths: np.ndarray, progress: bool
) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """Refit each row at its chosen width with FINAL_GRID's start; returns (levels, distortion) with the better
    fit per row (the plan's own arrays stay as scored, so it can serve other budgets)."""
    levels = {w: lv.clone() for w, lv in plan.levels.items()}
    distortion = plan.distortion.copy()
    widths = [w for w in CODED_WIDTHS if FINAL_GRID[w] != plan.scoring_grid[w] and np.any(row_widths == w)]
    if not widths:
        return levels, distortion
    batchers = {w: RowBatcher(w, FINAL_GRID[w], plan.config.codebook_format) for w in widths}
    start = 0
    for name, (o, _) in tqdm(list(zip(plan.names, plan.shapes)), desc="refitting", unit="layer", disable=not progress):
        layer_widths = row_widths[start : start + o]
        if any(np.any(layer_widths == w) for w in widths):
            hist = row_histogram(plan.prepare(name))
            for w in widths:
                rows = np.nonzero(layer_widths == w)[0]
                if rows.size:
                    batchers[w].add(hist.rows(torch.from_numpy(rows)))
        start += o
    for w in widths:
        lv, sse = batchers[w].result()
        rows = np.nonzero(row_widths == w)[0]
        col = CODED_WIDTHS.index(w)
        better = sse.numpy() < distortion[rows, col]
        levels[w][torch.from_numpy(rows[better])] = lv[torch.from_numpy(better)]
        distortion[rows[better], col] = sse.numpy()[better]
    return levels, distortion


@dataclass
class QuantizePlan:
    """Every targeted row of a model scored at every width: all :meth:`quantize` needs besides the budget.

    Scoring is most of the work; a plan quantizes at many budgets for the cost of one (benchmarks, sweeps).
    """

    config: QuantizeConfig
    names: list[str]
    shapes: list[tuple[int, int]]
    weights: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]  # module -> E[x^2] per input (empty: uncalibrated)
    hessians: dict[str, torch.Tensor]  # module -> E[x x^T] of its inputs [in, in] (empty: no error feedback)
    sensitivity: dict[str, float]  # module -> weight of its rows' distortions in the knapsack (1: uncalibrated)
    levels: dict[int, torch.Tensor]  # width -> float16-exact levels [all rows, 2**w]
    # float64 [all rows, 3]: SSE at widths 1, 2, 4, in weight space or (calibrated) weighted by E[x^2]: the
    # expected output error; the knapsack multiplies it by the layer's sensitivity (row_sensitivity)
    distortion: np.ndarray
    dense: dict[str, np.ndarray]
    aliases: dict[str, str]
    source: str
    scoring_grid: dict[int, int | None]
    device: torch.device | None = None  # where rows are fitted (None: CPU)
    calibration_source: str | None = None  # the calibration text (None: uncalibrated)
    calibration_tokens: int = 0

    def prepare(self, name: str) -> PreparedLayer:
        return prepare_layer(name, self.weights[name], self.config.group_size, self.stats.get(name), self.device)

    @property
    def calibrated(self) -> bool:
        return bool(self.stats)

    @property
    def feeds_back(self) -> bool:
        """Whether rows are rounded with error feedback (:mod:`.gptq`) instead of to their nearest levels."""
        return self.config.feeds_back and bool(self.hessians)

    @property
    def n_params(self) -> int:
        return int(sum(o * i for o, i in self.shapes))

    def row_sensitivity(self) -> np.ndarray:
        """The layer's sensitivity for every row [rows]: what the knapsack multiplies each row's distortion by."""
        return np.concatenate([np.full(o, self.sensitivity[n]) for n, (o, _) in zip(self.names, self.shapes)])

    def knapsack_distortion(self) -> np.ndarray:
        """What the knapsack minimizes [rows, 3]: each row's distortion times its layer's sensitivity."""
        return self.distortion * self.row_sensitivity()[:, None]

    def row_costs(self) -> np.ndarray:
        """Bits of each row at each width [rows, 3] (codes with byte padding + its codebook, see :func:`row_costs`)."""
        fmt = self.config.codebook_format
        return np.concatenate([np.broadcast_to(row_costs(i, fmt), (o, len(CODED_WIDTHS))) for o, i in self.shapes])

    def _metadata(self, bits: float, created: str, report: dict[str, object]) -> dict[str, object]:
        g = self.config.group_size
        return {
            "source": self.source,
            "group_size": g,
            "aliases": self.aliases,
            "scheme": {
                "method": METHOD, "budget_bits": float(bits), "group_size": g, "widths": list(CODED_WIDTHS),
                "weighted": self.calibrated, "hist_bins": HIST_BINS,
                "calibration": self.calibration_source, "calibration_tokens": self.calibration_tokens,
                "sensitivity": self.config.sensitivity if self.calibrated else "none",
                "error_feedback": self.feeds_back,
                "scale_dtype": "float16", "dense_dtype": "float16",
                "codebook_dtype": ("integers (6 bits; 8 in 4-bit rows) x 2**e per row"
                                   if self.config.codebook_format == "int" else "float16"),
            },
            "report": report,
            "created": created,
        }

    def fixed_bytes(self, bits: float, created: str) -> int:
        """Bytes that do not depend on the widths: the header (bounded above), scales and the width maps (and with
        integer codebooks each layer's last, partly filled level byte, counted as a whole byte)."""
        g, fmt = self.config.group_size, self.config.codebook_format
        meta = self._metadata(bits, created, placeholder_report(self.shapes, self.calibrated, self.feeds_back))
        table = [(n, o, i, g) for n, (o, i) in zip(self.names, self.shapes)]
        return header_bytes_bound(table, self.dense, meta, fmt) + sum(
            o * 2 * (-(-i // g) if g else 0) + (o + 3) // 4 + (fmt == "int") for o, i in self.shapes
        )

    def budget_range(self, created: str = "2000-01-01T00:00:00+00:00") -> tuple[float, float]:
        """(lowest, highest) storable budget in effective bits: every row at 1 bit / every row at 4 bits."""
        costs, fixed = self.row_costs(), 8 * self.fixed_bytes(0.0, created)
        return (fixed + costs[:, 0].sum()) / self.n_params, (fixed + costs[:, -1].sum()) / self.n_params

    def assign(self, bits: float, created: str) -> np.ndarray:
        """The width of every row under ``bits`` effective bits per parameter (BudgetError if out of range)."""
        n_params = self.n_params
        fixed = 8 * self.fixed_bytes(bits, created)
        costs = self.row_costs()
        lowest, highest = (fixed + costs[:, 0].sum()) / n_params, (fixed + costs[:, -1].sum()) / n_params
        if bits < lowest - 1e-12:
            raise BudgetError(
                f"a budget of {bits} effective bits/param is below the smallest storable base: {lowest:.4f} (every "
                f"row at 1 bit, plus codebooks, scales, width map and header). Raise --bits to at least {lowest:.4f}"
                f"{' or use a larger --group-size (or 0: no groups)' if self.config.group_size else ''}"
            )
        if bits > highest + 1e-12:
            raise BudgetError(
                f"a budget of {bits} effective bits/param is above what the widths can use: {highest:.4f} (every "
                f"row at 4 bits, with all overhead). Lower --bits to at most {highest:.4f}"
            )
        choice = assign_precision(costs, self.knapsack_distortion(), bits * n_params - fixed)
        return np.asarray(CODED_WIDTHS, dtype=np.uint8)[choice]

    def quantize(
        self,
        bits: float,
        progress: bool = True,
        created: str | None = None,
        timings: dict[str, float] | None = None,
        torch_threads: int | None = TORCH_THREADS,
    ) -> QuantizedBase:
        """The quantized base under ``bits`` effective bits per quantized parameter (see :mod:`lowra.sdk.quant.base`)."""
        QuantizeConfig(bits=bits, group_size=self.config.group_size)  # validates the number
        with intra_op_threads(torch_threads):
            return self._quantize(bits, progress, created, timings)

    def _quantize(
        self, bits: float, progress: bool, created: str | None, timings: dict[str, float] | None
    ) -> QuantizedBase:
        clock = _Clock(timings)
        created = created or utc_now()
        row_widths = self.assign(bits, created)
        clock.lap("assignment")
        levels, _ = refine(self, row_widths, progress)
        clock.lap("refitting")

        weighted, fed = self.calibrated, self.feeds_back
        layers: dict[str, QuantizedWeight] = {}
        module_rows, sse_total, energy_total, out_err, out_energy = [], 0.0, 0.0, 0.0, 0.0
        fed_totals = np.zeros(3)  # output error with nearest rounding, with error feedback, output energy
        start = 0
        for name, (o, i) in tqdm(list(zip(self.names, self.shapes)), desc="packing", unit="layer", disable=not progress):
            prep = self.prepare(name)
            w = row_widths[start : start + o]
            picked = {}
            for width in CODED_WIDTHS:
                rows = np.nonzero(w == width)[0]
                if rows.size:
                    picked[width] = levels[width][start + torch.from_numpy(rows)]
            if fed:
                rounding = round_with_error_feedback(prep, w, picked, self.hessians[name])
                qw = assemble(prep, w, picked, rounding.codes)
                fed_totals += (rounding.error_nearest, rounding.error_fed, rounding.reference)
                ref = max(rounding.reference, 1e-300)
                fed_row = [report_round(rounding.error_nearest / ref), report_round(rounding.error_fed / ref)]
            else:
                qw = assemble(prep, w, picked)
                fed_row = []
            layers[name] = qw
            W = prep.weight.cpu().numpy()
            err = W - qw.dequantize().astype(np.float64)
            sse, energy = float(np.sum(err * err)), float(W.size * np.var(W))
            stored = stored_layer_tensors(name, qw, self.config.codebook_format)
            stored_bits = 8 * sum(a.nbytes for a in stored.values())
            row = [report_round(sse / max(energy, 1e-300)), report_round(stored_bits / W.size), report_round(qw.code_bits() / W.size)]
            if weighted:
                ms = prep.input_ms.cpu().numpy()
                e_out, e_ref = float(np.sum(err * err * ms[None, :])), float(np.sum(W * W * ms[None, :]))
                row += [report_round(e_out / max(e_ref, 1e-300)), report_round(float(ms.mean())),
                        report_round(self.sensitivity[name])]
                out_err, out_energy = out_err + e_out, out_energy + e_ref
            module_rows.append(row + fed_row + [int(np.sum(w == 1)), int(np.sum(w == 2)), int(np.sum(w == 4))])
            sse_total, energy_total = sse_total + sse, energy_total + energy
            start += o
        clock.lap("packing")
        total: dict[str, object] = {
            "mse_over_var": report_round(sse_total / max(energy_total, 1e-300)),
            "code_bits": report_round(float(sum(q.code_bits() for q in layers.values())) / self.n_params),
            "widths": {str(width): int(np.sum(row_widths == width)) for width in CODED_WIDTHS},
        }
        if weighted:
            total["output_error"] = report_round(out_err / max(out_energy, 1e-300))
        if fed:
            total["output_error_nearest"] = report_round(fed_totals[0] / max(fed_totals[2], 1e-300))
            total["output_error_fed"] = report_round(fed_totals[1] / max(fed_totals[2], 1e-300))
        metadata = self._metadata(bits, created, report_json(module_rows, total, weighted, fed))
        file_bytes, header = serialized_size(layers, self.dense, metadata, self.config.codebook_format)
        effective = 8.0 * (file_bytes - sum(a.nbytes for a in self.dense.values())) / self.n_params
        if effective > bits + 1e-12:  # the header bound makes this unreachable; never hand out an over-budget base
            raise BudgetError(
                f"internal: the base takes {effective:.6f} effective bits/param, over the budget {bits}; please report"
            )
        clock.lap("file")
        return QuantizedBase(
            layers=layers, dense=self.dense, metadata=metadata, fingerprint=quantized_fingerprint(layers),
            file_bytes=file_bytes, header_bytes=header, aliases=dict(self.aliases),
            codebook_format=self.config.codebook_format,
        )


def plan_model(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: CalibrationStats | None = None,
    progress: bool = True,
    source: str = "",
    timings: dict[str, float] | None = None,
    scoring_grid: Mapping[int, int | None] | None = None,
    torch_threads: int | None = TORCH_THREADS,
    device: torch.device | str | None = None,
) -> QuantizePlan:
    """Score every row of every targeted linear layer of ``model`` at widths 1, 2 and 4 (see :class:`QuantizePlan`).

    ``scoring_grid`` overrides :data:`DECISION_GRID` (the bench uses FINAL_GRID to measure what cheap scoring costs).
    ``torch_threads``: intra-op threads while fitting (see TORCH_THREADS; None keeps torch's setting).
    ``device``: where each layer's rows are fitted (default CPU; "cuda" fits a layer's rows there in one batch,
    see CUDA_CHUNK_ROWS); the plan's levels and distortions always come back to the CPU.
    """
    with intra_op_threads(torch_threads):
        return _plan_model(model, config, calibration, progress, source, timings, scoring_grid, device)


def _plan_model(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: CalibrationStats | None,
    progress: bool,
    source: str,
    timings: dict[str, float] | None,
    scoring_grid: Mapping[int, int | None] | None,
    device: torch.device | str | None = None,
) -> QuantizePlan:
    clock = _Clock(timings)
    names = linear_module_names(model, config.targets)
    if not names:
        raise ConfigError("the model has no linear layers to quantize (targets matched nothing)")
    stats: dict[str, torch.Tensor] = {}
    hessians: dict[str, torch.Tensor] = {}
    sensitivity = dict.fromkeys(names, 1.0)
    if config.calibrated:
        missing = [n for n in names if calibration is None or n not in calibration.input_ms]
        if missing:
            raise ConfigError(
                f"a calibrated QuantizeConfig needs input statistics for every targeted module; missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(names)}). Record them with "
                "calibrate(...) (or pass quantize_model a tokenizer), or use QuantizeConfig(calibration=None)"
            )
        stats = {n: calibration.input_ms[n] for n in names}
        sensitivity = calibration.layer_sensitivity(names, config.sensitivity)
    if config.feeds_back:
        missing = [n for n in names if n not in calibration.input_hessian]
        if missing:
            raise ConfigError(
                f"error feedback needs the input Hessian of every targeted module; missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(names)}). Record them with "
                "calibrate(...) under a config with error_feedback=True, or use QuantizeConfig(error_feedback=False)"
            )
        hessians = {n: calibration.input_hessian[n] for n in names}
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}
    grid = dict(scoring_grid or DECISION_GRID)
    plan = QuantizePlan(
        config=config, names=names, shapes=[(int(weights[n].shape[0]), int(weights[n].shape[1])) for n in names],
        weights=weights, stats=stats, hessians=hessians, sensitivity=sensitivity, levels={}, distortion=np.zeros((0, len(CODED_WIDTHS))), dense={}, aliases={},
        source=source or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        scoring_grid=grid, device=None if device is None else torch.device(device),
        calibration_source=calibration.source if config.calibrated else None,
        calibration_tokens=calibration.tokens if config.calibrated else 0,
    )
    # Every row scored at every width: histograms fitted in chunks of rows across layers.
    scoring = {w: RowBatcher(w, grid[w], config.codebook_format) for w in CODED_WIDTHS}
    for name in tqdm(names, desc="scoring widths", unit="layer", disable=not progress):
        hist = row_histogram(plan.prepare(name))
        for batcher in scoring.values():
            batcher.add(hist)
    scored = {w: b.result() for w, b in scoring.items()}
    plan.levels = {w: lv for w, (lv, _) in scored.items()}
    plan.distortion = torch.stack([scored[w][1] for w in CODED_WIDTHS], 1).numpy()
    plan.dense, plan.aliases = dense_tensors(model, {f"{n}.weight" for n in names})
    clock.lap("scoring")
    return plan

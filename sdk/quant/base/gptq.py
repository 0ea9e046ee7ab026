"""Error-feedback rounding (GPTQ: Frantar et al. 2022, arXiv 2210.17323, Algorithm 1) with per-row codebooks.

Nearest rounding makes each weight's error as small as it can be on its own, but a layer's output error on its
calibration inputs, ``E||(W - Q) x||^2 = sum_r e_r^T H e_r`` with ``H = E[x x^T]``, also depends on how the
errors of correlated inputs add up. GPTQ rounds the columns in order and moves each column's rounding error onto
the columns not yet rounded along ``H^-1``, so that they compensate it. Here "rounding" a weight picks the nearest
level of its row's own codebook (times its group scale when groups are on), at the row's own width: widths and
codebooks are chosen first (the knapsack scores nearest rounding) and only the codes change, so the file layout
is the same. Rows are independent in the output error, so each row keeps the error-fed codes only where they beat
nearest rounding on the calibration Hessian.

Columns go in order of decreasing ``H_jj`` (GPTQ's "act-order": the inputs that carry the most energy are rounded
first, while many columns are left to absorb their error). Measured on 21 SmolLM2 layers (3 blocks) with the
3.0 / 2.0-bit plans' widths and codebooks, relative output error ||(W - Q) X||^2 / ||W X||^2 on the calibration
inputs: nearest 0.0232 / 0.0845, error feedback in input order 0.0108 / 0.0407, in act-order 0.0096 / 0.0353.
Refitting each row's codebook (weighted Lloyd-Max, same weights) on the error-fed weights and rounding again
gained nothing on its own (0.0108 / 0.0407) and 1% as a per-row third choice (0.0096 / 0.0350) for twice the
time, so codebooks stay as the plan fitted them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.sdk.errors import ConfigError
from lowra.sdk.quant.base.fit import PreparedLayer

# GPTQ's dampening: H + DAMPING * mean(diag H) * I stays positive definite when inputs are collinear or never fire.
DAMPING = 0.01
# Columns updated together (GPTQ's "lazy batch" updates): the per-column work stays inside a [rows, BLOCK] slice
# and the rest of the matrix is updated once per block with one matrix product.
BLOCK_COLUMNS = 128
# Each failed Cholesky multiplies the dampening by 10, this many times, before giving up.
DAMPING_RETRIES = 4
MAX_LEVELS = 1 << max(CODED_WIDTHS)


@dataclass
class FedRounding:
    """A layer's codes after error feedback and its calibrated output errors, ``sum_r e_r^T H e_r``."""

    codes: np.ndarray  # uint8 [out, in]: each weight's index in its row's codebook
    error_nearest: float  # output error of nearest rounding
    error_fed: float  # output error of the codes returned
    reference: float  # sum_r w_r^T H w_r: the output energy the errors are relative to


class RowCodebooks:
    """Every row's codebook padded to MAX_LEVELS (last level repeated) with the thresholds nearest rounding uses."""

    def __init__(self, widths: np.ndarray, levels: Mapping[int, torch.Tensor], device: torch.device):
        out = widths.size
        book = torch.zeros(out, MAX_LEVELS, dtype=torch.float64, device=device)
        for w in CODED_WIDTHS:
            rows = torch.from_numpy(np.nonzero(widths == w)[0]).to(device)
            if rows.numel():
                lv = levels[w].to(device, torch.float64)
                book[rows] = torch.cat([lv, lv[:, -1:].expand(-1, MAX_LEVELS - lv.shape[1])], 1)
        self.levels = book
        # The same midpoints as lowra.sdk.quant.codebook.assign_codes; padded thresholds equal the last level, so a
        # value past it lands beyond the row's codebook and is clamped back to its last level.
        self.thresholds = ((book[:, 1:] + book[:, :-1]) / 2).contiguous()
        self.last = torch.from_numpy((1 << widths.astype(np.int64)) - 1).to(device)

    def nearest(self, values: torch.Tensor) -> torch.Tensor:
        """Codes [rows] of the nearest level of each row's codebook to ``values`` [rows] (codebook units)."""
        codes = torch.searchsorted(self.thresholds, values[:, None].contiguous())[:, 0]
        return torch.minimum(codes, self.last)


def column_scales(prep: PreparedLayer) -> torch.Tensor | None:
    """Each weight's group scale [out, in] (float64, as prepare_layer divides by), or None without groups."""
    if not prep.group_size:
        return None
    scales = torch.from_numpy(prep.scales.astype(np.float64)).to(prep.weight.device)
    return scales.repeat_interleave(prep.group_size, 1)[:, : prep.shape[1]]


def inverse_cholesky(hessian: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``H^-1`` (float64): row i holds how column i's error spreads forward."""
    n = hessian.shape[0]
    mean = float(hessian.diagonal().mean())
    H = hessian if mean > 0 else torch.eye(n, dtype=hessian.dtype, device=hessian.device)  # no input ever fired
    damp = DAMPING * (mean if mean > 0 else 1.0)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(DAMPING_RETRIES):
        lower, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ConfigError(
        f"layer {name}: the calibration inputs' Hessian is not positive definite even dampened by {damp / 10:.3g}; "
        "expected E[x x^T] of finite inputs. Recalibrate, or use QuantizeConfig(error_feedback=False)"
    )


def feed_errors_forward(
    weight: torch.Tensor, books: RowCodebooks, scales: torch.Tensor | None, upper: torch.Tensor
) -> torch.Tensor:
    """GPTQ's rounding loop: codes [out, in] (long) of ``weight`` rounded column by column, each column's error
    spread onto the later columns through ``upper`` (see :func:`inverse_cholesky`)."""
    W = weight.clone()
    out, n = W.shape
    codes = torch.zeros(out, n, dtype=torch.long, device=W.device)
    for i1 in range(0, n, BLOCK_COLUMNS):
        i2 = min(i1 + BLOCK_COLUMNS, n)
        block = W[:, i1:i2]
        errors = torch.zeros_like(block)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = block[:, i]
            if scales is None:
                code = books.nearest(w)
                q = books.levels.gather(1, code[:, None])[:, 0]
            else:
                s = scales[:, i1 + i]
                code = books.nearest(torch.where(s > 0, w / s.clamp_min(1e-300), torch.zeros_like(w)))
                q = books.levels.gather(1, code[:, None])[:, 0] * s
            codes[:, i1 + i] = code
            err = (w - q) / u[i, i]
            block[:, i:] -= err[:, None] * u[i, i:][None, :]
            errors[:, i] = err
        W[:, i2:] -= errors @ upper[i1:i2, i2:]
    return codes


def decode(books: RowCodebooks, codes: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    q = books.levels.gather(1, codes)
    return q if scales is None else q * scales


def row_output_error(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``e_r^T H e_r`` per row [out]: each output's mean squared error on the calibration inputs."""
    return ((error @ hessian) * error).sum(1)


def round_with_error_feedback(
    prep: PreparedLayer, widths: np.ndarray, levels: Mapping[int, torch.Tensor], hessian: torch.Tensor
) -> FedRounding:
    """The codes of ``prep``'s weight under its rows' ``widths`` and codebooks ``levels`` (width -> float16-exact
    levels [rows of that width, 2**w] in row order, as :func:`lowra.sdk.quant.base.fit.assemble` takes them),
    rounded with error feedback against ``hessian`` (E[x x^T] of the layer's calibration inputs, [in, in])."""
    out, n_in = prep.shape
    if tuple(hessian.shape) != (n_in, n_in) or not bool(torch.isfinite(hessian).all()):
        raise ConfigError(
            f"layer {prep.name}: the input Hessian must be a finite [{n_in}, {n_in}] matrix (E[x x^T] over the "
            f"layer's {n_in} inputs), got {tuple(hessian.shape)}; record it on this model with calibrate(...)"
        )
    device = prep.weight.device
    H = hessian.to(device, torch.float64)
    books = RowCodebooks(np.asarray(widths), levels, device)
    scales = column_scales(prep)
    W = prep.weight
    nearest = torch.searchsorted(books.thresholds, prep.values.contiguous()).minimum(books.last[:, None])
    order = torch.argsort(H.diagonal(), descending=True, stable=True)
    fed = feed_errors_forward(
        W[:, order], books, None if scales is None else scales[:, order], inverse_cholesky(H[order][:, order], prep.name)
    )[:, torch.argsort(order)]
    err_nearest = row_output_error(W - decode(books, nearest, scales), H)
    err_fed = row_output_error(W - decode(books, fed, scales), H)
    better = err_fed < err_nearest
    codes = torch.where(better[:, None], fed, nearest)
    return FedRounding(
        codes=codes.to(torch.uint8).cpu().numpy(),
        error_nearest=float(err_nearest.sum()),
        error_fed=float(torch.minimum(err_fed, err_nearest).sum()),
        reference=float(row_output_error(W, H).sum()),
    )

"""LowRA base quantization: learned per-row codebooks, mixed 1/2/4-bit rows under a whole-file bit budget.

Method (LowRA, arXiv 2502.08141, sections 4.1-4.2; numbers measured in bench/bench_base_quantization.py):
1. **Normalize** (optional, ``group_size > 0``). Each row is cut into groups of ``group_size`` inputs (the last
   may be partial) divided by their absmax, rounded to float16 first so that decode multiplies by exactly what
   we divided by; a group of zeros gets scale 0 and decodes to 0. The paper (after QLoRA) uses 64-groups; on
   SmolLM2 no groups is better at every budget measured once the scales' bits are counted (see
   DEFAULT_GROUP_SIZE), so by default each row's codebook carries its scale itself.
2. **Map.** Every row learns its own codebook at each width 1, 2 and 4 with weighted Lloyd-Max
   (:func:`..codebook.lloyd_max`) on its normalized values. Element weights are ``scale**2`` (times the input
   second moment ``E[x^2]`` of the feature when input statistics are used), so the codebook minimizes the error
   in *weight space* (or the expected output error), not in the normalized space (measured -1..-4% SSE).
   Lloyd-Max runs on a 128-bin weighted histogram of each row (uniform bins over the row's range; exact moments
   per bin, cell boundaries on bin edges) instead of its raw values: measured on SmolLM2 rows +0.01% SSE at
   1 bit, +0.04% (64-groups) / +0.4% (no groups) at 2 bits and 1-4% *better* at 4 bits (the histogram smooths
   the discrete sample Lloyd-Max gets stuck on), and the cost no longer grows with the row length.
   Levels are stored in float16 and codes are nearest w.r.t. the float16 levels, so the decode is what we scored.
3. **Assign precision.** Every row picks a width; the cost of a choice is its packed codes (byte-padded rows) plus
   its codebook (16 * 2**w bits); the distortion is its weighted SSE in weight space. A multiple-choice knapsack
   (:func:`..allocation.assign_precision`, exact at its hull breakpoints; the paper's two ILPs over 128 channel
   clusters approximate the same problem) minimizes total distortion under the budget. Rows are scored with
   cheap Lloyd-Max starts, then refitted once at their chosen width with the better start (DECISION_GRID /
   FINAL_GRID), so the expensive fit runs once per row instead of three times.
   The budget is **effective bits per quantized parameter with every byte of the file counted** except the
   dense tensors' data (embeddings, norms; stored float16 and reported separately): codes, codebooks, scales,
   the 2-bit width map and the whole safetensors header with all metadata.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowra.device_runtime._files import utc_now
from lowra.device_runtime.formats.bitpack import pack_codes, packed_bytes
from lowra.device_runtime.formats.quantized_base import (
    QuantizedBase,
    header_bytes_bound,
    quantized_fingerprint,
    read_quantized_base,
    serialized_size,
)
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.quant.allocation import assign_precision
from lowra.sdk.base_model import linear_module_names
from lowra.sdk.quant.codebook import assign_codes, lloyd_max
from lowra.sdk.quant.adapter_compression import STATS_FLOOR
from lowra.sdk.errors import BudgetError, ConfigError

# Histogram bins per row for Lloyd-Max (see the module docstring for the measured loss).
HIST_BINS = 128
# Rows per lloyd_max call: bounds its float64 work buffers ([rows, bins] prefix sums, [rows, grid^2] DP).
CHUNK_ROWS = 4096
# On a GPU the same work is launch-bound at 4096 rows (dozens of small kernels per Lloyd iteration), so rows are
# fitted 64k at a time (a few GB of float64 buffers at the 4-bit refit's grid). Lloyd-Max stops on the largest level
# move of its chunk, so GPU results may differ from CPU ones in the last iterations of some rows; CPU results are
# unchanged by the device option.
CUDA_CHUNK_ROWS = 65536
# Grid-DP start of lloyd_max per width (None = its default, 0 = binary splitting only). Measured on 4,096
# SmolLM2 rows, seconds on one core / SSE above the default start:  2 bits: grid 48 2.4 s, grid 24 0.21 s +0.25%,
# splitting 0.11 s +0.5%;  4 bits: grid 64 4.7 s, grid 32 0.87 s +2.3%, splitting 0.23 s +7.7%.
# So every row is scored at every width with splitting (DECISION_GRID), and once the widths are chosen each row is
# refitted at its own width with a grid start (FINAL_GRID), keeping whichever fit is better. Whole SmolLM2,
# MSE/var at 4.0 / 2.5 bits and refit time: 4-bit grid 64 0.01733 / 0.08789, 126 s / 38 s; grid 32 0.01767 /
# 0.08801, 41 s / 18 s. Scoring every row with the final starts instead (114 s instead of 12 s) ends 0.1-0.3%
# *worse*: the refit keeps the better of two fits.
DECISION_GRID: dict[int, int | None] = {1: None, 2: 0, 4: 0}
FINAL_GRID: dict[int, int | None] = {1: None, 2: 24, 4: 32}
# torch intra-op threads while fitting. The work is many small ops on [4096, 128] chunks: measured on the 2-core
# dev machine (SmolLM2 at 1.5 bits) 19 s with 2 threads vs 25 s with 1 when the machine is quiet, but 199 s vs 23 s
# when another process holds a core (the pool's barriers spin). One thread is the robust default.
TORCH_THREADS = 1
# Floats in the file's report are rounded to this many significant digits (bounded header size).
REPORT_DIGITS = 6
# Longest JSON text a rounded float can take ("-1.23457e-100"): the header bound uses it.
_WIDEST_FLOAT = -1.23457e-100
METHOD = "lowra: absmax groups + per-row weighted Lloyd-Max (128-bin) + knapsack over 1/2/4-bit rows"


# Measured on SmolLM2 (bench/bench_base_quantization.py, MSE/var at 1.5 / 2.0 / 2.5 effective bits):
# no groups 0.233 / 0.131 / 0.088; G=256 0.257 / 0.147 / 0.095; G=128 0.273 / 0.157 / 0.098; G=64 0.304 / 0.177 /
# 0.103; G=32 infeasible / 0.232 / 0.125. The per-row codebook already absorbs the row's scale and the float16
# scales cost more bits than the local scale adaptation saves -- even 8-bit double-quantized scales would not
# change the order (bound measured: G=64 0.269 / 0.152 / 0.095). So rows get no groups by default.
DEFAULT_GROUP_SIZE = 0


@dataclass
class QuantizeConfig:
    bits: float = 1.5  # effective bits per quantized parameter, every byte of the file counted (dense data aside)
    group_size: int = DEFAULT_GROUP_SIZE  # inputs per absmax group; 0 = one codebook per row, no scales
    targets: str | list[str] = "all-linear"
    weighted: bool = False  # weight the error by input second moments (needs input_stats)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not (isinstance(self.bits, (int, float)) and np.isfinite(self.bits)):
            raise BudgetError(f"bits must be a finite number of effective bits per parameter, got {self.bits!r}")
        if not 0 < self.bits <= 32:
            raise BudgetError(f"bits must be in (0, 32] effective bits per parameter, got {self.bits}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(
                f"group_size must be an integer >= 0 (inputs per absmax group, 0 = no groups), got {self.group_size!r}"
            )
        if not (self.targets == "all-linear" or (isinstance(self.targets, (list, tuple)) and self.targets)):
            raise ConfigError(f"targets must be 'all-linear' or a non-empty list of module names, got {self.targets!r}")


# ----------------------------------------------------------------------------------------------- one layer
@dataclass
class _Prepared:
    """A layer normalized for fitting: values in codebook space and the weight of each element's error."""

    name: str
    weight: torch.Tensor  # float64 [out, in]
    values: torch.Tensor  # float64 [out, in]: W / scale (W itself without groups)
    importance: torch.Tensor  # float64 [out, in]: scale^2 * E[x^2] (error weight in weight space)
    scales: np.ndarray  # float16 [out, n_groups]
    group_size: int
    input_ms: torch.Tensor | None  # float64 [in] or None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


def _prepare(
    name: str,
    weight: torch.Tensor,
    group_size: int,
    input_ms: torch.Tensor | None,
    device: torch.device | str | None = None,
) -> _Prepared:
    if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ConfigError(f"layer {name}: weight must be a non-empty 2-D [out, in] matrix, got {tuple(weight.shape)}")
    device = torch.device(device or "cpu")
    w = weight.detach().to(device, torch.float64)
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(1))[:, 0]
        raise ConfigError(
            f"layer {name}: weight has NaN or Inf in {rows.numel()} row(s) (first: row {int(rows[0])}); expected a "
            "finite matrix. The checkpoint is corrupted or the model diverged: fix or re-export it before quantizing"
        )
    out, n_in = w.shape
    if group_size < 0:
        raise ConfigError(f"layer {name}: group_size must be >= 0, got {group_size}")
    ms = None
    if input_ms is not None:
        ms = input_ms.detach().to(device, torch.float64).reshape(-1)
        if ms.numel() != n_in or not bool(torch.all(torch.isfinite(ms))) or bool(torch.any(ms < 0)):
            raise ConfigError(
                f"layer {name}: input statistics must be {n_in} finite non-negative mean squares (one per input "
                f"feature), got {tuple(input_ms.shape)}; record them on this model's inputs"
            )
        # Features never seen active still get a little weight: their weights are not free to be anything.
        ms = ms.clamp_min(STATS_FLOOR * float(ms.mean().clamp_min(1e-30)))
    if group_size:
        n_groups = -(-n_in // group_size)
        padded = torch.nn.functional.pad(w.abs(), (0, n_groups * group_size - n_in))
        absmax = padded.view(out, n_groups, group_size).amax(2)
        scales16 = absmax.to(torch.float16)
        if bool(torch.isinf(scales16).any()):
            raise ConfigError(
                f"layer {name}: |weight| reaches {float(absmax.max()):.4g}, beyond the float16 range (65504) of the "
                "scales; rescale the model's weights before quantizing"
            )
        element_scale = scales16.to(torch.float64).repeat_interleave(group_size, 1)[:, :n_in]
        # Division by the float16-rounded scale: decode multiplies by exactly this number.
        values = torch.where(element_scale > 0, w / element_scale.clamp_min(1e-300), torch.zeros_like(w))
        importance = element_scale * element_scale
        scales = scales16.cpu().numpy()
    else:
        if float(w.abs().max()) > 65504:
            raise ConfigError(
                f"layer {name}: |weight| reaches {float(w.abs().max()):.4g}, beyond the float16 range (65504) of the "
                "codebook levels (group_size=0 stores levels in weight units); use group_size > 0"
            )
        values = w
        importance = torch.ones_like(w)
        scales = np.zeros((out, 0), dtype=np.float16)
    if ms is not None:
        importance = importance * ms[None, :]
    # A row with no weight anywhere (all-zero groups): any codebook decodes it exactly; keep Lloyd-Max defined.
    dead = importance.sum(1) <= 0
    if bool(dead.any()):
        importance[dead] = 1.0
    return _Prepared(name, w, values, importance, scales, group_size, ms)


@dataclass
class _Histogram:
    """Per row, a weighted histogram of the values: what Lloyd-Max sees instead of the raw row."""

    centroids: torch.Tensor  # float64 [rows, bins] weighted mean of each bin (bin centre if empty)
    mass: torch.Tensor  # float64 [rows, bins] total importance in each bin
    within: torch.Tensor  # float64 [rows] SSE of the values around their bin centroids

    def rows(self, index: torch.Tensor | slice) -> "_Histogram":
        return _Histogram(self.centroids[index], self.mass[index], self.within[index])

    @staticmethod
    def cat(parts: Sequence["_Histogram"]) -> "_Histogram":
        return _Histogram(*(torch.cat([getattr(p, f) for p in parts]) for f in ("centroids", "mass", "within")))


def _histogram(prep: _Prepared, bins: int = HIST_BINS) -> _Histogram:
    x, imp = prep.values, prep.importance
    span = x.abs().amax(1, keepdim=True).clamp_min(1e-30)  # ~1 with groups; the row's range without
    idx = ((x / span + 1) * (bins / 2)).floor().clamp_(0, bins - 1).long()
    zeros = torch.zeros(x.shape[0], bins, dtype=torch.float64, device=x.device)
    m0 = zeros.clone().scatter_add_(1, idx, imp)
    m1 = zeros.clone().scatter_add_(1, idx, imp * x)
    m2 = zeros.scatter_add_(1, idx, imp * x * x)
    centres = ((torch.arange(bins, dtype=torch.float64, device=x.device) + 0.5) * (2 / bins) - 1)[None, :] * span
    filled = m0 > 0
    centroids = torch.where(filled, m1 / m0.clamp_min(1e-300), centres)
    within = torch.where(filled, m2 - m1 * centroids, torch.zeros_like(m2)).sum(1).clamp_min(0.0)
    return _Histogram(centroids, m0, within)


def _fit(hist: _Histogram, width: int, grid: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-rounded levels as float64 [rows, 2**w], weighted SSE in weight space [rows]) for ``hist`` rows.

    The SSE is the histogram's: every bin goes to the level nearest its centroid, an upper bound of the
    per-element nearest assignment that differs only in bins straddling a threshold.
    """
    levels, sse = [], []
    chunk = CHUNK_ROWS if hist.mass.device.type == "cpu" else CUDA_CHUNK_ROWS
    for start in range(0, hist.mass.shape[0], chunk):
        part = hist.rows(slice(start, start + chunk))
        fit = lloyd_max(part.centroids, width, weight=part.mass, grid=grid)
        lv = fit.levels.to(torch.float16).to(torch.float64)
        codes = assign_codes(part.centroids, lv)
        err = part.centroids - lv.gather(1, codes.long())
        levels.append(lv)
        sse.append((part.mass * err * err).sum(1) + part.within)
    return torch.cat(levels), torch.cat(sse)


class _Batcher:
    """Collects histogram rows across layers and fits them ``CHUNK_ROWS`` at a time (few big lloyd_max calls)."""

    def __init__(self, width: int, grid: int | None):
        self.width, self.grid = width, grid
        self.pending: list[_Histogram] = []
        self.pending_rows = 0
        self.levels: list[torch.Tensor] = []
        self.sse: list[torch.Tensor] = []

    def add(self, hist: _Histogram) -> None:
        self.pending.append(hist)
        self.pending_rows += hist.mass.shape[0]
        if self.pending_rows >= (CHUNK_ROWS if hist.mass.device.type == "cpu" else CUDA_CHUNK_ROWS):
            self.flush()

    def flush(self) -> None:
        if self.pending_rows:
            lv, d = _fit(_Histogram.cat(self.pending), self.width, self.grid)
            # Results live on the CPU (small: [rows, 2**w]); the assignment and packing read them there.
            self.levels.append(lv.cpu())
            self.sse.append(d.cpu())
        self.pending, self.pending_rows = [], 0

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels [rows, 2**w], SSE [rows]) of every row added, in order."""
        self.flush()
        if not self.levels:
            return torch.zeros(0, 1 << self.width, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(self.levels), torch.cat(self.sse)


def _assemble(prep: _Prepared, widths: np.ndarray, levels: Mapping[int, torch.Tensor]) -> QuantizedWeight:
    """Pack a layer: ``levels[w]`` holds float16-exact levels [rows with width w, 2**w] in row order."""
    out, n_in = prep.shape
    widths = np.asarray(widths, dtype=np.uint8)
    sizes = np.array([packed_bytes(n_in, int(w)) for w in CODED_WIDTHS], dtype=np.int64)
    code_sizes = sizes[np.searchsorted(CODED_WIDTHS, widths)]
    code_off = np.concatenate([[0], np.cumsum(code_sizes)])
    level_off = np.concatenate([[0], np.cumsum(1 << widths.astype(np.int64))])
    codes = np.zeros(int(code_off[-1]), dtype=np.uint8)
    codebooks = np.zeros(int(level_off[-1]), dtype=np.float16)
    for w in CODED_WIDTHS:
        rows = np.nonzero(widths == w)[0]
        if rows.size == 0:
            continue
        lv = levels[w]
        if lv.shape != (rows.size, 1 << w):
            raise ValueError(f"levels for width {w}: {tuple(lv.shape)}, expected {(rows.size, 1 << w)}")
        idx = assign_codes(prep.values[torch.from_numpy(rows)], lv.to(prep.values.device)).cpu().numpy()
        packed = pack_codes(idx, w)
        codes[code_off[rows][:, None] + np.arange(packed.shape[1])[None, :]] = packed
        codebooks[level_off[rows][:, None] + np.arange(1 << w)[None, :]] = lv.cpu().numpy().astype(np.float16)
    qw = QuantizedWeight(out, n_in, prep.group_size, widths, codes, codebooks, prep.scales)
    qw.validate(f"layer {prep.name}")
    return qw


def _check_widths(widths: int | torch.Tensor | np.ndarray | Sequence[int], out: int) -> np.ndarray:
    arr = np.full(out, widths, dtype=np.int64) if np.isscalar(widths) else np.asarray(
        widths.cpu().numpy() if isinstance(widths, torch.Tensor) else widths, dtype=np.int64
    )
    if arr.shape != (out,):
        raise ConfigError(f"widths must be one int or one per output row ({out}), got shape {arr.shape}")
    bad = sorted(set(np.unique(arr).tolist()) - set(CODED_WIDTHS))
    if bad:
        raise ConfigError(f"row widths {bad} are not storable; expected values in {CODED_WIDTHS}")
    return arr.astype(np.uint8)


def quantize_weight(
    W: torch.Tensor,
    widths: int | torch.Tensor | Sequence[int],
    group_size: int = DEFAULT_GROUP_SIZE,
    input_ms: torch.Tensor | None = None,
    name: str = "weight",
    device: torch.device | str | None = None,
) -> QuantizedWeight:
    """Quantize one weight [out, in] with the given width per row (one int for all rows, or one per row).

    ``input_ms`` [in]: mean squared input of each feature; the codebooks then minimize the expected output
    error instead of the weight error. ``name`` appears in error messages. ``device``: where the fitting runs
    (default CPU; e.g. "cuda" fits all rows of the layer there, see CUDA_CHUNK_ROWS).
    """
    with _torch_threads(TORCH_THREADS):
        prep = _prepare(name, W, group_size, input_ms, device)
        w = _check_widths(widths, prep.shape[0])
        hist = _histogram(prep)
        levels = {}
        for width in CODED_WIDTHS:
            rows = np.nonzero(w == width)[0]
            if rows.size:
                levels[width], _ = _fit(hist.rows(torch.from_numpy(rows)), width, FINAL_GRID[width])
        return _assemble(prep, w, levels)


# ----------------------------------------------------------------------------------------------- baselines
def normal_float_levels(bits: int) -> np.ndarray:
    """QLoRA's NormalFloat levels for ``bits`` in {2, 4}: asymmetric, with an exact zero, scaled to [-1, 1].

    QLoRA (Dettmers et al. 2023, bitsandbytes ``create_normal_map``): ``2**(b-1)`` positive levels at normal
    quantiles ``linspace(offset, 0.5, 2**(b-1) + 1)[:-1]``, ``2**(b-1) - 1`` negative ones at
    ``linspace(offset, 0.5, 2**(b-1))[:-1]``, plus 0, all divided by the largest. ``offset`` is the mean of
    ``1 - 1/(2(n-1))`` and ``1 - 1/(2n)`` for ``n = 2**b`` levels (0.9677 at 4 bits, QLoRA's value). 1 bit has no
    NormalFloat (one sign would get no level at all).
    """
    if bits not in (2, 4):
        raise ConfigError(f"NormalFloat is defined here for 2 and 4 bits, got {bits}; use uniform_quantize at 1 bit")
    n = 1 << bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    dist = NormalDist()
    positive = [dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    negative = [-dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    levels = np.array(sorted(positive + [0.0] + negative), dtype=np.float64)
    return levels / levels.max()


def _fixed_levels(W: torch.Tensor, bits: int, group_size: int, unit_levels: np.ndarray, name: str) -> QuantizedWeight:
    prep = _prepare(name, W, group_size, None)
    out = prep.shape[0]
    lv = torch.from_numpy(unit_levels).to(torch.float64)[None, :].expand(out, -1)
    if not group_size:  # no scales: the row's absmax goes into its codebook
        lv = lv * prep.values.abs().amax(1, keepdim=True)
    lv = lv.to(torch.float16).to(torch.float64)
    return _assemble(prep, _check_widths(bits, out), {bits: lv})


def nf_quantize(W: torch.Tensor, bits: int, group_size: int = 64, name: str = "weight") -> QuantizedWeight:
    """QLoRA NormalFloat (NF2/NF4) with absmax groups, stored in the same container (one decode path).

    In QLoRA's own format the levels are global; here each row carries a copy (16 * 2**b bits per row), so
    compare NF at its native bits ``b + 16 / group_size`` (the bench does).
    """
    return _fixed_levels(W, bits, group_size, normal_float_levels(bits), name)


def uniform_quantize(W: torch.Tensor, bits: int, group_size: int = 64, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest on ``2**bits`` evenly spaced levels over ``[-absmax, absmax]`` of each group.

    This is min-max quantization of the *symmetric* range: the container has no per-group zero-point, so an
    asymmetric min-max (min and max per group, b + 32/G bits) cannot be stored; the bench measures that one
    separately in numpy. Native bits ``b + 16 / group_size``.
    """
    if bits not in CODED_WIDTHS:
        raise ConfigError(f"bits must be one of {CODED_WIDTHS}, got {bits}")
    return _fixed_levels(W, bits, group_size, np.linspace(-1.0, 1.0, 1 << bits), name)


def water_filling_bound(row_variances: np.ndarray, row_lengths: np.ndarray, total_bits: float) -> float:
    """Least total squared error any code of ``total_bits`` can reach on independent Gaussian rows.

    Reverse water-filling: a row of variance ``v`` costs ``0.5 * log2(v / theta)`` bits per element (0 when
    ``v <= theta``) and leaves ``min(theta, v)`` error per element; ``theta`` is set so the bits add up.
    """
    var = np.asarray(row_variances, dtype=np.float64)
    length = np.asarray(row_lengths, dtype=np.float64)
    pos = var > 0
    if total_bits <= 0 or not pos.any():
        return float(np.sum(var * length))

    def bits_at(theta: float) -> float:
        return float(np.sum(length[pos] * np.maximum(0.0, 0.5 * np.log2(var[pos] / theta))))

    lo, hi = np.log(var[pos].min()) - 2 * np.log(2) * total_bits / length.sum() - 50, np.log(var[pos].max())
    for _ in range(200):  # bisection on log theta
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bits_at(float(np.exp(mid))) > total_bits else (lo, mid)
    theta = float(np.exp(hi))
    return float(np.sum(length * np.minimum(theta, var)))


# ----------------------------------------------------------------------------------------------- whole model
@torch.no_grad()
def record_input_stats(
    model: nn.Module, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]], targets: str | list[str] = "all-linear"
) -> dict[str, torch.Tensor]:
    """Mean squared input per feature (float32 [in]) of every targeted linear layer over ``batches``.

    Each batch is token ids [batch, seq] or a dict of model inputs (e.g. with ``attention_mask``; padded positions
    are then left out). These are the ``input_stats`` that ``weighted=True`` needs: the error of weight ``W[r, j]``
    then counts by ``E[x_j^2]``, the expected output error, instead of equally. Plain forward hooks: works on any
    model, LoRA-wrapped or not.
    """
    names = linear_module_names(model, targets)
    sums = {n: None for n in names}
    counts = dict.fromkeys(names, 0)
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x = x[mask[0]]
            sq = (x * x).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
            counts[name] += x.shape[0]

        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            attention = inputs.get("attention_mask")
            mask[0] = attention.reshape(-1).bool() if attention is not None else None
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [n for n in names if counts[n] == 0]
    if unseen:
        raise ConfigError(f"no calibration tokens reached {unseen[:3]} ({len(unseen)} modules); pass non-empty batches")
    return {n: (sums[n] / counts[n]).float() for n in names}


def _row_costs(n_in: int) -> np.ndarray:
    """Bits that vary with a row's width: packed codes (byte-padded) + float16 codebook, for widths 1, 2, 4."""
    return np.array([8 * packed_bytes(n_in, w) + 16 * (1 << w) for w in CODED_WIDTHS], dtype=np.float64)


def _round(x: float) -> float:
    return float(f"{x:.{REPORT_DIGITS}g}")


def _dense_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
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


def _placeholder_report(shapes: Sequence[tuple[int, int]], weighted: bool) -> dict[str, object]:
    """A report with every number at its longest JSON text: the header bound uses it."""
    rows = sum(o for o, _ in shapes)
    return _report_json(
        [[_WIDEST_FLOAT] * (4 if weighted else 3) + [o, o, o] for o, _ in shapes],
        {"mse_over_var": _WIDEST_FLOAT, "code_bits": _WIDEST_FLOAT, "widths": {"1": rows, "2": rows, "4": rows},
         **({"output_error": _WIDEST_FLOAT} if weighted else {})},
        weighted,
    )


def _report_json(module_rows: list[list[float]], total: dict[str, object], weighted: bool) -> dict[str, object]:
    columns = ["mse_over_var", "effective_bits", "code_bits"] + (["output_error"] if weighted else [])
    return {"columns": columns + ["rows_1bit", "rows_2bit", "rows_4bit"], "modules": module_rows, "total": total}


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads and restore the previous setting (None: leave it alone)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Clock:
    def __init__(self, sink: dict[str, float] | None):
        self.sink, self.last = sink, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.sink is not None:
            self.sink[phase] = self.sink.get(phase, 0.0) + now - self.last
        self.last = now


def _refine(
    plan: "QuantizePlan", row_widths: np.ndarray, progress: bool
) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """Refit each row at its chosen width with FINAL_GRID's start; returns (levels, distortion) with the better
    fit per row (the plan's own arrays stay as scored, so it can serve other budgets)."""
    levels = {w: lv.clone() for w, lv in plan.levels.items()}
    distortion = plan.distortion.copy()
    widths = [w for w in CODED_WIDTHS if FINAL_GRID[w] != plan.scoring_grid[w] and np.any(row_widths == w)]
    if not widths:
        return levels, distortion
    batchers = {w: _Batcher(w, FINAL_GRID[w]) for w in widths}
    start = 0
    for name, (o, _) in tqdm(list(zip(plan.names, plan.shapes)), desc="refitting", unit="layer", disable=not progress):
        layer_widths = row_widths[start : start + o]
        if any(np.any(layer_widths == w) for w in widths):
            hist = _histogram(plan.prepare(name))
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
    stats: dict[str, torch.Tensor]
    levels: dict[int, torch.Tensor]  # width -> float16-exact levels [all rows, 2**w]
    distortion: np.ndarray  # float64 [all rows, 3]: weighted SSE in weight space at widths 1, 2, 4
    dense: dict[str, np.ndarray]
    aliases: dict[str, str]
    source: str
    scoring_grid: dict[int, int | None]
    device: torch.device | None = None  # where rows are fitted (None: CPU)

    def prepare(self, name: str) -> _Prepared:
        return _prepare(name, self.weights[name], self.config.group_size, self.stats.get(name), self.device)

    @property
    def n_params(self) -> int:
        return int(sum(o * i for o, i in self.shapes))

    def row_costs(self) -> np.ndarray:
        """Bits that vary with the width, per row [rows, 3] (codes with byte padding + float16 codebook)."""
        return np.concatenate([np.broadcast_to(_row_costs(i), (o, len(CODED_WIDTHS))) for o, i in self.shapes])

    def _metadata(self, bits: float, created: str, report: dict[str, object]) -> dict[str, object]:
        g = self.config.group_size
        return {
            "source": self.source,
            "group_size": g,
            "aliases": self.aliases,
            "scheme": {
                "method": METHOD, "budget_bits": float(bits), "group_size": g, "widths": list(CODED_WIDTHS),
                "weighted": bool(self.config.weighted), "hist_bins": HIST_BINS,
                "scale_dtype": "float16", "codebook_dtype": "float16", "dense_dtype": "float16",
            },
            "report": report,
            "created": created,
        }

    def fixed_bytes(self, bits: float, created: str) -> int:
        """Bytes that do not depend on the widths: the header (bounded above), scales and the width maps."""
        g = self.config.group_size
        meta = self._metadata(bits, created, _placeholder_report(self.shapes, bool(self.config.weighted)))
        table = [(n, o, i, g) for n, (o, i) in zip(self.names, self.shapes)]
        return header_bytes_bound(table, self.dense, meta) + sum(
            o * 2 * (-(-i // g) if g else 0) + (o + 3) // 4 for o, i in self.shapes
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
        choice = assign_precision(costs, self.distortion, bits * n_params - fixed)
        return np.asarray(CODED_WIDTHS, dtype=np.uint8)[choice]

    def quantize(
        self,
        bits: float,
        progress: bool = True,
        created: str | None = None,
        timings: dict[str, float] | None = None,
        torch_threads: int | None = TORCH_THREADS,
    ) -> QuantizedBase:
        """The quantized base under ``bits`` effective bits per quantized parameter (see the module docstring)."""
        QuantizeConfig(bits=bits, group_size=self.config.group_size)  # validates the number
        with _torch_threads(torch_threads):
            return self._quantize(bits, progress, created, timings)

    def _quantize(
        self, bits: float, progress: bool, created: str | None, timings: dict[str, float] | None
    ) -> QuantizedBase:
        clock = _Clock(timings)
        created = created or utc_now()
        row_widths = self.assign(bits, created)
        clock.lap("assignment")
        levels, _ = _refine(self, row_widths, progress)
        clock.lap("refitting")

        weighted = bool(self.config.weighted)
        layers: dict[str, QuantizedWeight] = {}
        module_rows, sse_total, energy_total, out_err, out_energy = [], 0.0, 0.0, 0.0, 0.0
        start = 0
        for name, (o, i) in tqdm(list(zip(self.names, self.shapes)), desc="packing", unit="layer", disable=not progress):
            prep = self.prepare(name)
            w = row_widths[start : start + o]
            picked = {}
            for width in CODED_WIDTHS:
                rows = np.nonzero(w == width)[0]
                if rows.size:
                    picked[width] = levels[width][start + torch.from_numpy(rows)]
            qw = _assemble(prep, w, picked)
            layers[name] = qw
            W = prep.weight.cpu().numpy()
            err = W - qw.dequantize().astype(np.float64)
            sse, energy = float(np.sum(err * err)), float(W.size * np.var(W))
            # storage_bits counts 2 bits per row for the width; the file pads each layer's width map to bytes.
            stored_bits = qw.storage_bits() - 2 * o + 8 * ((o + 3) // 4)
            row = [_round(sse / max(energy, 1e-300)), _round(stored_bits / W.size), _round(qw.code_bits() / W.size)]
            if weighted:
                ms = prep.input_ms.cpu().numpy()
                e_out, e_ref = float(np.sum(err * err * ms[None, :])), float(np.sum(W * W * ms[None, :]))
                row.append(_round(e_out / max(e_ref, 1e-300)))
                out_err, out_energy = out_err + e_out, out_energy + e_ref
            module_rows.append(row + [int(np.sum(w == 1)), int(np.sum(w == 2)), int(np.sum(w == 4))])
            sse_total, energy_total = sse_total + sse, energy_total + energy
            start += o
        clock.lap("packing")
        total: dict[str, object] = {
            "mse_over_var": _round(sse_total / max(energy_total, 1e-300)),
            "code_bits": _round(float(sum(q.code_bits() for q in layers.values())) / self.n_params),
            "widths": {str(width): int(np.sum(row_widths == width)) for width in CODED_WIDTHS},
        }
        if weighted:
            total["output_error"] = _round(out_err / max(out_energy, 1e-300))
        metadata = self._metadata(bits, created, _report_json(module_rows, total, weighted))
        file_bytes, header = serialized_size(layers, self.dense, metadata)
        effective = 8.0 * (file_bytes - sum(a.nbytes for a in self.dense.values())) / self.n_params
        if effective > bits + 1e-12:  # the header bound makes this unreachable; never hand out an over-budget base
            raise BudgetError(
                f"internal: the base takes {effective:.6f} effective bits/param, over the budget {bits}; please report"
            )
        clock.lap("file")
        return QuantizedBase(
            layers=layers, dense=self.dense, metadata=metadata, fingerprint=quantized_fingerprint(layers),
            file_bytes=file_bytes, header_bytes=header, aliases=dict(self.aliases),
        )


def plan_model(
    model: nn.Module,
    config: QuantizeConfig,
    input_stats: Mapping[str, torch.Tensor] | None = None,
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
    with _torch_threads(torch_threads):
        return _plan_model(model, config, input_stats, progress, source, timings, scoring_grid, device)


def _plan_model(
    model: nn.Module,
    config: QuantizeConfig,
    input_stats: Mapping[str, torch.Tensor] | None,
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
    if config.weighted:
        missing = [n for n in names if not input_stats or n not in input_stats]
        if missing:
            raise ConfigError(
                f"weighted=True needs input statistics for every targeted module; missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(names)}). Record them on "
                "calibration text or pass weighted=False"
            )
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}
    stats = {n: input_stats[n] for n in names} if config.weighted and input_stats else {}
    grid = dict(scoring_grid or DECISION_GRID)
    plan = QuantizePlan(
        config=config, names=names, shapes=[(int(weights[n].shape[0]), int(weights[n].shape[1])) for n in names],
        weights=weights, stats=stats, levels={}, distortion=np.zeros((0, len(CODED_WIDTHS))), dense={}, aliases={},
        source=source or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        scoring_grid=grid, device=None if device is None else torch.device(device),
    )
    # Every row scored at every width: histograms fitted in chunks of rows across layers.
    scoring = {w: _Batcher(w, grid[w]) for w in CODED_WIDTHS}
    for name in tqdm(names, desc="scoring widths", unit="layer", disable=not progress):
        hist = _histogram(plan.prepare(name))
        for batcher in scoring.values():
            batcher.add(hist)
    scored = {w: b.result() for w, b in scoring.items()}
    plan.levels = {w: lv for w, (lv, _) in scored.items()}
    plan.distortion = torch.stack([scored[w][1] for w in CODED_WIDTHS], 1).numpy()
    plan.dense, plan.aliases = _dense_tensors(model, {f"{n}.weight" for n in names})
    clock.lap("scoring")
    return plan


def cached_quantized_base(
    model: nn.Module, base_path: str | Path, config: QuantizeConfig, progress: bool = True
) -> Path:
    """The quantized base of ``model`` (loaded from ``base_path``) under ``config``, written once to the lowra cache.

    The cache key covers the base folder, its weight files' sizes and times, the config and the method, so a changed
    base or quantizer writes a new file. A cached file is verified (checksum) before use; a damaged one is redone.
    """
    from lowra.device_runtime.errors import LowraError
    from lowra.sdk.base_model import cache_dir

    base_path = Path(base_path).resolve()
    stamp = [str(base_path), repr(config), METHOD]
    for f in sorted(base_path.glob("*.safetensors")) if base_path.is_dir() else []:
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:12]
    path = cache_dir() / "quantized" / f"{base_path.name}-{config.bits:g}bit-{key}.safetensors"
    if path.is_file():
        try:
            read_quantized_base(path)
            return path
        except LowraError:
            pass  # damaged (e.g. a disk error): quantize again and replace it
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_model(model, config, progress=progress, source=str(base_path)).write(path, overwrite=True)
    return path


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig,
    input_stats: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    source: str = "",
    created: str | None = None,
    timings: dict[str, float] | None = None,
    torch_threads: int | None = TORCH_THREADS,
    device: torch.device | str | None = None,
) -> QuantizedBase:
    """Quantize every targeted linear layer of ``model`` under ``config.bits`` effective bits per parameter.

    Returns the in-memory quantized base (``.write(path)`` saves it; ``.bits_report()`` and ``.report`` hold the
    measured bits and errors). The model is not modified. ``input_stats`` maps module path -> mean squared input
    per feature [in] and is used when ``config.weighted``. ``timings``, when given, receives the seconds spent
    per phase (scoring, assignment, refitting, packing, file). ``torch_threads``: see TORCH_THREADS.
    ``device``: where the codebooks are fitted (see :func:`plan_model`; default CPU).
    """
    plan = plan_model(model, config, input_stats, progress=progress, source=source, timings=timings,
                      torch_threads=torch_threads, device=device)
    return plan.quantize(config.bits, progress=progress, created=created, timings=timings, torch_threads=torch_threads)


__all__ = [
    "QuantizeConfig",
    "QuantizePlan",
    "nf_quantize",
    "normal_float_levels",
    "cached_quantized_base",
    "plan_model",
    "quantize_model",
    "quantize_weight",
    "record_input_stats",
    "uniform_quantize",
    "water_filling_bound",
]

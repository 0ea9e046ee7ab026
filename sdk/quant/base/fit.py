"""Fitting one layer: normalize its rows, build their histograms, fit Lloyd-Max codebooks, pack the codes.

The method and its measured choices are described in :mod:`lowra.sdk.quant.base` (steps 1 and 2).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from lowra.device_runtime.formats.bitpack import pack_codes, packed_bytes
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.int_levels import MIN_EXPONENT, level_limit, max_exponent
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.errors import ConfigError
from lowra.sdk.quant.adapter_compression import STATS_FLOOR
from lowra.sdk.quant.base.config import DEFAULT_GROUP_SIZE
from lowra.sdk.quant.codebook import _SortedRows, assign_codes, lloyd_max

# Histogram bins per row for Lloyd-Max (measured loss: lowra.sdk.quant.base, step 2).
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


@dataclass
class PreparedLayer:
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


def prepare_layer(
    name: str,
    weight: torch.Tensor,
    group_size: int,
    input_ms: torch.Tensor | None,
    device: torch.device | str | None = None,
) -> PreparedLayer:
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
    return PreparedLayer(name, w, values, importance, scales, group_size, ms)


@dataclass
class RowHistogram:
    """Per row, a weighted histogram of the values: what Lloyd-Max sees instead of the raw row."""

    centroids: torch.Tensor  # float64 [rows, bins] weighted mean of each bin (bin centre if empty)
    mass: torch.Tensor  # float64 [rows, bins] total importance in each bin
    within: torch.Tensor  # float64 [rows] SSE of the values around their bin centroids

    def rows(self, index: torch.Tensor | slice) -> "RowHistogram":
        return RowHistogram(self.centroids[index], self.mass[index], self.within[index])

    @staticmethod
    def cat(parts: Sequence["RowHistogram"]) -> "RowHistogram":
        return RowHistogram(*(torch.cat([getattr(p, f) for p in parts]) for f in ("centroids", "mass", "within")))


def row_histogram(prep: PreparedLayer, bins: int = HIST_BINS) -> RowHistogram:
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
    return RowHistogram(centroids, m0, within)


def int_levels(hist: RowHistogram, levels: torch.Tensor) -> torch.Tensor:
    """Fitted ``levels`` [rows, k] moved onto the integer grid of base format 4 (k * 2**e, one e per row, integers
    of 6 bits for 1- and 2-bit rows, 8 bits for 4-bit rows), as float64, ascending: of the two smallest exponents
    that reach the row's largest level, and (up to 4 levels) every rounding of each level down or up, the choice
    with the least histogram SSE; 16 levels round to the nearest.

    Measured on SmolLM2 (weight MSE, 6-bit levels at every width, MSE/var at 2.0 / 4.0 bits): nearest rounding at
    the smallest exponent 0.12506 / 0.012872, this search 0.12492 / 0.012864. Lloyd steps on the grid after the
    search gained nothing measurable (prototype on raw rows at 2.0 bits: 0.1247 with and without three steps).
    """
    rows = _SortedRows(hist.centroids, hist.mass)
    k = levels.shape[1]
    width = k.bit_length() - 1
    limit = level_limit(width)
    absmax = levels.abs().amax(1, keepdim=True)
    e0 = torch.ceil(torch.log2(torch.where(absmax > 0, absmax / limit, torch.ones_like(absmax))))
    e0 = torch.where(absmax > 0, e0, torch.full_like(e0, MIN_EXPONENT))
    ups = torch.tensor([[(c >> j) & 1 for j in range(k)] for c in range(1 << k)] if k <= 4 else [[0.5] * k],
                       dtype=torch.float64, device=levels.device)
    best, best_sse = levels, torch.full((levels.shape[0],), float("inf"), dtype=torch.float64, device=levels.device)
    for shift in (0, 1):
        step = torch.exp2((e0 + shift).clamp(MIN_EXPONENT, max_exponent(width)))
        scaled = levels / step
        for up in ups:  # up 0.5 with floor: round half up, i.e. nearest
            ints = (torch.floor(scaled + up) if k > 4 else torch.floor(scaled) + up).clamp(-limit, limit)
            candidate = torch.sort(ints * step, 1).values + 0.0  # + 0.0: a -0.0 level is stored as 0
            sse = rows.distortion(candidate)
            better = sse < best_sse
            best = torch.where(better[:, None], candidate, best)
            best_sse = torch.where(better, sse, best_sse)
    return best


def fit_rows(hist: RowHistogram, width: int, grid: int | None,
             codebook_format: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
    """(levels as stored, as float64 [rows, 2**w], weighted SSE in weight space [rows]) for ``hist`` rows: the
    Lloyd-Max levels rounded to float16, or moved onto the integer grid (:func:`int_levels`).

    The SSE is the histogram's: every bin goes to the level nearest its centroid, an upper bound of the
    per-element nearest assignment that differs only in bins straddling a threshold.
    """
    levels, sse = [], []
    chunk = CHUNK_ROWS if hist.mass.device.type == "cpu" else CUDA_CHUNK_ROWS
    for start in range(0, hist.mass.shape[0], chunk):
        part = hist.rows(slice(start, start + chunk))
        fit = lloyd_max(part.centroids, width, weight=part.mass, grid=grid)
        if codebook_format == "int":
            lv = int_levels(part, fit.levels)
        else:
            lv = fit.levels.to(torch.float16).to(torch.float64)
        codes = assign_codes(part.centroids, lv)
        err = part.centroids - lv.gather(1, codes.long())
        levels.append(lv)
        sse.append((part.mass * err * err).sum(1) + part.within)
    return torch.cat(levels), torch.cat(sse)


class RowBatcher:
    """Collects histogram rows across layers and fits them ``CHUNK_ROWS`` at a time (few big lloyd_max calls)."""

    def __init__(self, width: int, grid: int | None, codebook_format: str = "float16"):
        self.width, self.grid, self.codebook_format = width, grid, codebook_format
        self.pending: list[RowHistogram] = []
        self.pending_rows = 0
        self.levels: list[torch.Tensor] = []
        self.sse: list[torch.Tensor] = []

    def add(self, hist: RowHistogram) -> None:
        self.pending.append(hist)
        self.pending_rows += hist.mass.shape[0]
        if self.pending_rows >= (CHUNK_ROWS if hist.mass.device.type == "cpu" else CUDA_CHUNK_ROWS):
            self.flush()

    def flush(self) -> None:
        if self.pending_rows:
            lv, d = fit_rows(RowHistogram.cat(self.pending), self.width, self.grid, self.codebook_format)
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


def assemble(
    prep: PreparedLayer, widths: np.ndarray, levels: Mapping[int, torch.Tensor], codes: np.ndarray | None = None
) -> QuantizedWeight:
    """Pack a layer: ``levels[w]`` holds float16-exact levels [rows with width w, 2**w] in row order. ``codes``
    (uint8 [out, in], each weight's index in its row's codebook) when rounding chose them, e.g. with error
    feedback; by default every weight gets its nearest level."""
    out, n_in = prep.shape
    widths = np.asarray(widths, dtype=np.uint8)
    sizes = np.array([packed_bytes(n_in, int(w)) for w in CODED_WIDTHS], dtype=np.int64)
    code_sizes = sizes[np.searchsorted(CODED_WIDTHS, widths)]
    code_off = np.concatenate([[0], np.cumsum(code_sizes)])
    level_off = np.concatenate([[0], np.cumsum(1 << widths.astype(np.int64))])
    code_bytes = np.zeros(int(code_off[-1]), dtype=np.uint8)
    codebooks = np.zeros(int(level_off[-1]), dtype=np.float16)
    for w in CODED_WIDTHS:
        rows = np.nonzero(widths == w)[0]
        if rows.size == 0:
            continue
        lv = levels[w]
        if lv.shape != (rows.size, 1 << w):
            raise ValueError(f"levels for width {w}: {tuple(lv.shape)}, expected {(rows.size, 1 << w)}")
        if codes is None:
            idx = assign_codes(prep.values[torch.from_numpy(rows)], lv.to(prep.values.device)).cpu().numpy()
        else:
            idx = codes[rows]
        packed = pack_codes(idx, w)
        code_bytes[code_off[rows][:, None] + np.arange(packed.shape[1])[None, :]] = packed
        codebooks[level_off[rows][:, None] + np.arange(1 << w)[None, :]] = lv.cpu().numpy().astype(np.float16)
    qw = QuantizedWeight(out, n_in, prep.group_size, widths, code_bytes, codebooks, prep.scales)
    qw.validate(f"layer {prep.name}")
    return qw


def check_widths(widths: int | torch.Tensor | np.ndarray | Sequence[int], out: int) -> np.ndarray:
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
    codebook_format: str = "float16",
) -> QuantizedWeight:
    """Quantize one weight [out, in] with the given width per row (one int for all rows, or one per row).

    ``input_ms`` [in]: mean squared input of each feature; the codebooks then minimize the expected output
    error instead of the weight error. ``name`` appears in error messages. ``device``: where the fitting runs
    (default CPU; e.g. "cuda" fits all rows of the layer there, see CUDA_CHUNK_ROWS). ``codebook_format="int"``
    fits the levels on the integer grid (base format version 4) instead of rounding them to float16.
    """
    with intra_op_threads(TORCH_THREADS):
        prep = prepare_layer(name, W, group_size, input_ms, device)
        w = check_widths(widths, prep.shape[0])
        hist = row_histogram(prep)
        levels = {}
        for width in CODED_WIDTHS:
            rows = np.nonzero(w == width)[0]
            if rows.size:
                levels[width], _ = fit_rows(hist.rows(torch.from_numpy(rows)), width, FINAL_GRID[width],
                                            codebook_format)
        return assemble(prep, w, levels)



@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
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

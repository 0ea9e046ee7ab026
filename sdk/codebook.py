"""Learned per-channel codebooks: weighted Lloyd-Max, vectorized over channels (LowRA section 4.1).

For each channel (a row of ``x``) we look for ``2**bits`` levels and the thresholds between them that minimize
the weighted squared error ``sum_j weight_j * (x_j - level[code_j])**2``. Lloyd-Max alternates the two optimality
conditions: thresholds at midpoints of neighbouring levels, and levels at the weighted mean of their cell.
Initialization from Gaussian quantiles (NormalFloat-style levels scaled by the channel's weighted moments)
starts near the optimum for the roughly normal weights of LLMs, so a few iterations suffice.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

MAX_ITERS = 40
# Stop when no level moves by more than this fraction of the channel's spread.
TOLERANCE = 1e-5


@dataclass
class Codebook:
    levels: torch.Tensor  # [n, 2**bits], ascending
    codes: torch.Tensor  # uint8 [n, L]
    distortion: torch.Tensor  # float64 [n]: weighted sum of squared errors per channel

    def dequantize(self) -> torch.Tensor:
        return torch.gather(self.levels, 1, self.codes.long())


def normal_levels(bits: int) -> torch.Tensor:
    """Centres of 2**bits equiprobable cells of a unit Gaussian (NormalFloat-style, symmetric, ascending)."""
    k = 1 << bits
    dist = NormalDist()
    return torch.tensor([dist.inv_cdf((i + 0.5) / k) for i in range(k)], dtype=torch.float64)


def assign_codes(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level per element (thresholds at midpoints); levels must be ascending per row."""
    thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(thresholds.shape[1]):  # at most 15 comparisons: cheaper than a [n, L, K] broadcast in memory
        codes += (x > thresholds[:, j : j + 1]).to(torch.uint8)
    return codes


def lloyd_max(
    x: torch.Tensor,
    bits: int,
    weight: torch.Tensor | None = None,
    iters: int = MAX_ITERS,
) -> Codebook:
    """Fit a ``2**bits``-level codebook to every row of ``x`` [n, L] under element weights ``weight``.

    ``weight`` broadcasts against ``x`` ([L] or [n, L]); it is the importance of each element (e.g. the input
    second moment of the feature it multiplies). Levels are returned ascending; distortion is float64.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [channels, length], got {tuple(x.shape)}")
    if bits < 1 or bits > 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    x = x.to(torch.float64)
    w = torch.ones_like(x) if weight is None else torch.broadcast_to(weight.to(torch.float64), x.shape).contiguous()
    if torch.any(w < 0) or not torch.all(torch.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    if not torch.all(torch.isfinite(x)):
        raise ValueError("values to quantize contain NaN or Inf")
    k = 1 << bits
    wsum = w.sum(1, keepdim=True).clamp_min(1e-300)
    mean = (w * x).sum(1, keepdim=True) / wsum
    std = ((w * (x - mean) ** 2).sum(1, keepdim=True) / wsum).sqrt()
    levels = mean + std * normal_levels(bits).to(x.device)[None, :]
    scale = (x.amax(1) - x.amin(1)).clamp_min(1e-30)[:, None]
    for _ in range(iters):
        codes = assign_codes(x, levels)
        idx = codes.long()
        sums = torch.zeros(x.shape[0], k, dtype=torch.float64, device=x.device).scatter_add_(1, idx, w * x)
        mass = torch.zeros_like(sums).scatter_add_(1, idx, w)
        # An empty cell keeps its level: it still separates its neighbours and may capture points later.
        new = torch.where(mass > 0, sums / mass.clamp_min(1e-300), levels)
        new, _ = torch.sort(new, dim=1)
        moved = ((new - levels).abs() / scale).max()
        levels = new
        if moved < TOLERANCE:
            break
    codes = assign_codes(x, levels)
    err = x - torch.gather(levels, 1, codes.long())
    return Codebook(levels=levels, codes=codes, distortion=(w * err * err).sum(1))

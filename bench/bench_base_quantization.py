"""Base quantization on the real SmolLM2-135M: lowra's mixed 1/2/4-bit learned codebooks against the baselines.

All numbers are MSE / weight variance over every linear layer (sum of squared errors over the sum of
numel * variance per layer), the unweighted weight-space error. Bits:
  lowra rows     effective bits of the file, every byte counted (codes, codebooks, scales, width maps, header)
                 except the dense tensors (embeddings, norms: float16, reported apart) -- the budget it was given
  baselines      native bits of the method (codes + its own scales), and in brackets what our container stores
                 for it (each row carries a float16 copy of the levels)
  bound          Gaussian reverse water-filling over rows (row variances) at the *same* effective bits, every bit
                 spent on codes: no scalar quantizer with any overhead can beat it
Baselines: NF4/NF2 = QLoRA NormalFloat with absmax-64 groups; uniform-sym = 2**b evenly spaced levels over
[-absmax, absmax] of 64-groups; uniform-asym = min-max with a zero-point per 64-group (numpy only, the container
has no zero-points); lloydmax-row = one learned codebook per row, no groups, every row the same width.

Sections: main table (budgets 4 .. 1.15), wall time of `quantize_model` at 1.5 bits (target <= 60 s on 2 cores),
group sizes (with an upper bound for 8-bit double-quantized scales), assign_precision vs the exact MILP on 2,000
rows, and optionally (--scoring-check) what scoring rows with cheap Lloyd-Max starts costs.
Target (issue 3): MSE/var <= 0.125 at 2.0 effective bits, all overhead counted.
Usage: python bench/bench_base_quantization.py [--threads 2] [--skip table,timing,groups,milp] [--scoring-check]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from lowra.sdk.quant.allocation import assign_precision
from lowra.sdk.quant.baselines import milp_assign
from lowra.sdk.modules import linear_module_names
from lowra.sdk.base_model import load_base
from lowra.sdk.errors import BudgetError
from lowra.sdk.quant.base.fit import FINAL_GRID, TORCH_THREADS, quantize_weight
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.baselines import nf_quantize, uniform_quantize, water_filling_bound
from lowra.sdk.quant.base.plan import plan_model
from lowra.sdk.quant.base.apply import quantize_model

BUDGETS = (4.0, 2.5, 2.1, 2.0, 1.75, 1.5, 1.25, 1.15)  # 2.1: where the 0.125 target is met
GROUP_SIZES = (0, 32, 64, 128, 256)
GROUP_BUDGETS = (1.5, 2.0, 2.5)


def uniform_asym(W: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Min-max round-to-nearest per group with a float16 minimum and step (b + 32/G bits)."""
    out, n_in = W.shape
    pad = -n_in % group
    x = np.pad(W, ((0, 0), (0, pad)), mode="edge").reshape(out, -1, group)
    lo = x.min(2, keepdims=True).astype(np.float16).astype(np.float64)
    step = ((x.max(2, keepdims=True) - lo) / (2**bits - 1)).astype(np.float16).astype(np.float64)
    step = np.where(step > 0, step, 1.0)
    q = np.clip(np.round((x - lo) / step), 0, 2**bits - 1)
    return (lo + q * step).reshape(out, -1)[:, :n_in]


class Weights:
    """Every linear weight of the model in float64 with the normalizer of MSE/var."""

    def __init__(self, model: torch.nn.Module):
        self.names = linear_module_names(model)
        self.tensors = {n: model.get_submodule(n).weight.detach() for n in self.names}
        self.energy = sum(float(t.numel() * t.double().var(unbiased=False)) for t in self.tensors.values())
        self.n = sum(t.numel() for t in self.tensors.values())
        rows = [(t.double().var(1, unbiased=False).numpy(), np.full(t.shape[0], t.shape[1])) for t in self.tensors.values()]
        self.row_var = np.concatenate([r for r, _ in rows])
        self.row_len = np.concatenate([length for _, length in rows])

    def bound(self, bits_per_param: float) -> float:
        return water_filling_bound(self.row_var, self.row_len, bits_per_param * self.n) / self.energy

    def error(self, decode) -> float:
        """MSE/var of a per-layer decode function W (torch) -> numpy approximation."""
        sse = 0.0
        for t in self.tensors.values():
            W = t.double().numpy()
            sse += float(np.sum((decode(t) - W) ** 2))
        return sse / self.energy


def row(table: list, method: str, bits: str, code_bits: str, err: float, bound: float | None, note: str = "") -> None:
    table.append((method, bits, code_bits, f"{err:.4f}", f"{bound:.4f}" if bound is not None else "",
                  f"{err / bound:.2f}" if bound else "", note))


def print_table(title: str, header: tuple, rows: list) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def main_table(model, weights: Weights, group: int) -> None:
    t0 = time.perf_counter()
    plan = plan_model(model, QuantizeConfig(group_size=group, calibration=None), progress=False)
    lo, hi = plan.budget_range()
    table: list = []
    for bits in BUDGETS:
        if not lo <= bits <= hi:
            table.append((f"lowra G={group}", f"{bits:.2f}", "", "infeasible", "", "", f"range {lo:.3f}..{hi:.3f}"))
            continue
        base = plan.quantize(bits, progress=False)
        r, total = base.bits_report(), base.report["total"]
        hist = total["widths"]
        rows = sum(hist.values())
        mix = "/".join(f"{100 * hist[k] / rows:.0f}" for k in ("1", "2", "4"))
        row(table, f"lowra G={group}", f"{r['effective_bits']:.3f}", f"{r['code_bits']:.3f}", total["mse_over_var"],
            weights.bound(r["effective_bits"]), f"rows 1/2/4-bit % {mix}")
    lowra_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = weights.n
    per_row_levels = lambda t, w: 16 * (2**w) * t.shape[0]  # noqa: E731
    for bits in (4, 2):
        native = bits + 16 / 64
        stored = native + sum(per_row_levels(t, bits) for t in weights.tensors.values()) / n
        err = weights.error(lambda t, b=bits: nf_quantize(t, b, 64).dequantize())
        row(table, f"NF{bits} absmax-64", f"{native:.3f} [{stored:.3f}]", f"{bits:.3f}", err, weights.bound(native))
    for bits in (2, 1):
        native = bits + 16 / 64
        err = weights.error(lambda t, b=bits: uniform_quantize(t, b, 64).dequantize())
        row(table, f"uniform-sym {bits}-bit absmax-64", f"{native:.3f}", f"{bits:.3f}", err, weights.bound(native))
    for bits in (2, 1):
        native = bits + 32 / 64
        err = weights.error(lambda t, b=bits: uniform_asym(t.double().numpy(), b, 64))
        row(table, f"uniform-asym {bits}-bit min-max-64", f"{native:.3f}", f"{bits:.3f}", err, weights.bound(native),
            "not storable in the container")
    for bits in (2, 1):
        stored = bits + sum(per_row_levels(t, bits) for t in weights.tensors.values()) / n
        err = weights.error(lambda t, b=bits: quantize_weight(t, b, group_size=0).dequantize())
        row(table, f"lloydmax-row {bits}-bit (no groups)", f"{stored:.3f}", f"{bits:.3f}", err, weights.bound(stored))
    base_s = time.perf_counter() - t0
    print_table(
        f"MSE / weight variance, all {len(weights.names)} linear layers of SmolLM2-135M ({n:,} weights); "
        f"lowra rows from one plan ({lowra_s:.0f} s), baselines {base_s:.0f} s",
        ("method", "eff. bits", "code bits", "MSE/var", "bound", "x bound", "note"), table,
    )


def timing(model, group: int, threads: int | None) -> None:
    phases: dict[str, float] = {}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    config = QuantizeConfig(bits=1.5, group_size=group, calibration=None)
    base = quantize_model(model, config, progress=False, timings=phases, torch_threads=threads)
    wall = time.perf_counter() - t0
    print(f"\nquantize_model(SmolLM2, bits=1.5, group_size={group}): {wall:.1f} s wall with torch_threads={threads} "
          f"on {os.cpu_count()} cores, load average {load:.1f} -> {os.getloadavg()[0]:.1f} (another process on the CPU "
          "inflates it)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    r = base.bits_report()
    print(f"  {r['effective_bits']:.4f} effective bits, {r['code_bits']:.4f} code bits, MSE/var "
          f"{base.report['total']['mse_over_var']:.4f}, widths {r['width_histogram']}, file {r['file_bytes']:,} bytes "
          f"(dense float16 {r['bytes']['dense']:,}, header {r['bytes']['header_and_metadata']:,})")


def groups(model, weights: Weights, budgets: tuple[float, ...] = GROUP_BUDGETS) -> None:
    table = []
    for group in GROUP_SIZES:
        t0 = time.perf_counter()
        plan = plan_model(model, QuantizeConfig(group_size=group, calibration=None), progress=False)
        lo, _ = plan.budget_range()
        cells = []
        for bits in budgets:
            try:
                cells.append(f"{plan.quantize(bits, progress=False).report['total']['mse_over_var']:.4f}")
            except BudgetError:
                cells.append(f"(min {lo:.3f})")
        # 8-bit double-quantized scales (QLoRA: 8-bit scales, one float16 absmax per 256 of them) would free
        # 16/G - 8/G - 16/(256 G) bits per param for codes; giving the codes exactly that with float16 scales
        # bounds what double quantization can reach (it also adds scale error, ignored here).
        dq = []
        if group:
            freed = 16 / group - 8 / group - 16 / (256 * group)
            for bits in budgets:
                try:
                    dq.append(f"{plan.quantize(bits + freed, progress=False).report['total']['mse_over_var']:.4f}")
                except BudgetError:
                    dq.append("-")
        table.append((f"G={group}" if group else "none (G=0)", f"{lo:.3f}", *cells, " / ".join(dq) or "-",
                      f"{time.perf_counter() - t0:.0f} s"))
    print_table(
        "Group size: MSE/var at equal effective bits (float16 scales counted)",
        ("groups", "min bits", *[f"@{b}" for b in budgets], "8-bit DQ scales (bound) @same", "time"), table,
    )


class _QuietFd1:
    """HiGHS prints progress lines from C++ straight to file descriptor 1; keep the table readable."""

    def __enter__(self):
        import sys

        sys.stdout.flush()
        self.saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 1)
        os.close(self.saved)


def milp_gap(model, group: int, n_rows: int = 2000) -> None:
    plan = plan_model(model, QuantizeConfig(group_size=group, calibration=None), progress=False)
    rng = np.random.default_rng(0)
    pick = rng.choice(plan.distortion.shape[0], n_rows, replace=False)
    costs, dists = plan.row_costs()[pick], plan.distortion[pick]
    lengths = np.concatenate([np.full(o, i) for o, i in plan.shapes])[pick]
    print(f"\nassign_precision vs exact MILP (HiGHS) on {n_rows} random SmolLM2 rows (their real costs/distortions):")
    for bits in (1.5, 2.0):
        budget = bits * lengths.sum()
        t0 = time.perf_counter()
        greedy = assign_precision(costs, dists, budget)
        tg = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _QuietFd1():
            exact = milp_assign(costs, dists, budget, time_limit=300, rel_gap=1e-6)
        tm = time.perf_counter() - t0
        g, e = dists[np.arange(n_rows), greedy].sum(), dists[np.arange(n_rows), exact].sum()
        print(f"  {bits:.2f} bits/param of codes+codebooks: greedy {tg * 1e3:.0f} ms, MILP {tm:.1f} s, "
              f"distortion gap {100 * (g / e - 1):.4f}% "
              "(MILP asked for a proven gap <= 1e-4 %)")


def scoring_check(model, group: int) -> None:
    """Does scoring with cheap Lloyd-Max starts (then refitting the chosen width) lose anything?"""
    t0 = time.perf_counter()
    exact = plan_model(model, QuantizeConfig(group_size=group, calibration=None), progress=False, scoring_grid=FINAL_GRID)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    cheap = plan_model(model, QuantizeConfig(group_size=group, calibration=None), progress=False)
    t_cheap = time.perf_counter() - t0
    print(f"\nscoring all rows with the final Lloyd-Max starts: {t_exact:.0f} s vs cheap starts {t_cheap:.0f} s")
    for bits in (1.5, 2.0, 2.5, 4.0):
        a = exact.quantize(bits, progress=False).report["total"]["mse_over_var"]
        b = cheap.quantize(bits, progress=False).report["total"]["mse_over_var"]
        print(f"  {bits:.2f} bits: MSE/var exact scoring {a:.5f}, cheap scoring + refit {b:.5f} ({100 * (b / a - 1):+.2f}%)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0,
                    help=f"torch threads for the timed run (default: the library's TORCH_THREADS = {TORCH_THREADS})")
    ap.add_argument("--group-size", type=int, default=QuantizeConfig().group_size, help="lowra's group size")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: table,timing,groups,milp")
    ap.add_argument("--scoring-check", action="store_true", help="also score every row with the final starts (slow)")
    ap.add_argument("--group-budgets", default=",".join(map(str, GROUP_BUDGETS)),
                    help="effective bits of the group-size section, comma-separated (e.g. 3.0,4.0: where groups pay)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # baselines too: see TORCH_THREADS in sdk/quant/base/fit.py
    torch.set_grad_enabled(False)
    skip = set(filter(None, args.skip.split(",")))
    model = load_base().model
    weights = Weights(model)
    if "timing" not in skip:
        timing(model, args.group_size, args.threads or TORCH_THREADS)
    if "table" not in skip:
        main_table(model, weights, args.group_size)
    if "groups" not in skip:
        groups(model, weights, tuple(float(b) for b in args.group_budgets.split(",")))
    if "milp" not in skip:
        milp_gap(model, args.group_size)
    if args.scoring_check:
        scoring_check(model, args.group_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

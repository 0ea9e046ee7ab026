"""What the base's codebook storage buys: MSE/var of SmolLM2-135M with float16 levels (format version 1) and with
integer levels (6-bit integers, 8-bit in 4-bit rows, times a power of two per row, version 4; the default) at the same budgets (issue 11,
item 4: 2.0 effective bits should reach MSE/var <= 0.125).

Both columns come from the quantizer as shipped: ``QuantizeConfig(codebook_format=...)`` prices each row's codebook
in the knapsack at what the file stores (16 bits a level, or 6 bits a level (8 in 4-bit rows) plus an 8-bit exponent per row) and,
for int, fits the levels on that grid (:func:`lowra.sdk.quant.base.fit.int_levels`). Same plan otherwise as
bench_base_quantization.py's main table: no groups, no calibration (weight MSE), every byte of the file counted.
Effective bits and codebook bytes are read back from the serialized file.

    python bench/bench_codebook_storage.py --budgets 1.5,2,2.5,3,4 --threads 1
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from lowra.device_runtime.formats.constants import CODEBOOK_FORMATS
from lowra.device_runtime.formats.quantized_base import parse_quantized_base
from lowra.sdk.base_model import load_base
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.plan import plan_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--budgets", default="1.5,2,2.5,3,4", help="comma-separated effective bits per parameter")
    ap.add_argument("--formats", default=",".join(CODEBOOK_FORMATS), help="codebook formats to compare")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_base().model
    budgets = [float(b) for b in args.budgets.split(",") if b]
    results = {}
    for fmt in (f for f in args.formats.split(",") if f):
        t0 = time.perf_counter()
        plan = plan_model(model, QuantizeConfig(group_size=0, calibration=None, codebook_format=fmt), progress=False)
        print(f"{fmt}: plan {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
        for bits in budgets:
            base = plan.quantize(bits, progress=False)
            stored = parse_quantized_base(base.to_bytes())  # what the file holds, read back
            assert stored.fingerprint == base.fingerprint
            r = stored.bits_report()
            results[fmt, bits] = (base.report["total"]["mse_over_var"], r)
    print(f"{'budget':>6} {'codebooks':>9} {'eff. bits':>9} {'codebook bits':>13} {'rows 1/2/4-bit %':>17} "
          f"{'MSE/var':>8} {'vs float16':>10}")
    for bits in budgets:
        for fmt in (f for f in args.formats.split(",") if f):
            mse, r = results[fmt, bits]
            hist = r["width_histogram"]
            rows = sum(hist.values())
            mix = "/".join(f"{100 * hist[w] / rows:.1f}" for w in ("1", "2", "4"))
            ref = results.get(("float16", bits), (None,))[0]
            ratio = f"{mse / ref:.3f}x" if ref else "-"
            print(f"{bits:>6g} {fmt:>9} {r['effective_bits']:9.4f} {8 * r['bytes']['codebooks'] / r['n_quantized_params']:13.4f} "
                  f"{mix:>17} {mse:8.5f} {ratio:>10}", flush=True)


if __name__ == "__main__":
    main()

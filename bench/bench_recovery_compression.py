"""What compressing a base's accuracy-recovery adapter like a user's adapter costs in held-out NLL.

A recovered base (``lowra recover``) stores its adapter as float16 factors: on SmolLM2 at rank 16 that is ~0.74 bits
per quantized weight on top of the base's budget (docs/RESULTS.md). User adapters are stored at 1-2 effective bits per
adapter parameter (``lowra compress``). This bench compresses the recovery factors with the same codec at each
budget, decodes them back and reports, side by side on the same held-out tokens:

- the base's NLL without its recovery adapter, with it (float16, as stored), and with it compressed at each budget;
- the adapter's bytes and what they add per quantized weight.

    python bench/bench_recovery_compression.py --quantized-base out/base-2bit-recovered.safetensors --bits 1,2,4

NLL = mean nats per answer token over the sample users' held-out sets (the same tokens as bench_base_nll.py).
Compression uses unweighted codebooks (no calibration statistics), so the figures are an upper bound on the loss.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.sdk.base_model import load_base
from lowra.sdk.quant.base.recovery import compress_recovery
from lowra.sdk.quant.lowbit_linear import load_quantized_base
from lowra.sdk.training.eval import heldout_nll


def nll_with(base, qb) -> float:
    model = copy.deepcopy(base.model)
    load_quantized_base(model, qb)
    model.eval()
    return heldout_nll(model, base.tokenizer)["nll"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quantized-base", required=True, type=Path, help="a base file with a recovery adapter")
    ap.add_argument("--bits", default="1,2,4", help="comma-separated budgets (effective bits per adapter parameter)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qb = read_quantized_base(args.quantized_base)
    if qb.recovery is None:
        raise SystemExit(f"{args.quantized_base} has no recovery adapter; make one with `lowra recover`")
    base = load_base()
    n_quantized = sum(layer.out_features * layer.in_features for layer in qb.layers.values())
    stored = sum(a.nbytes for a in qb.recovery.tensors().values())
    rows = []

    def row(name: str, nbytes: int, quantized_base) -> None:
        t0 = time.perf_counter()
        nll = nll_with(base, quantized_base)
        rows.append({"row": name, "adapter_bytes": nbytes, "bits_per_quantized_weight": 8 * nbytes / n_quantized,
                     "nll": nll, "eval_s": round(time.perf_counter() - t0, 1)})
        print(f"{name:<28} {nbytes:>11,} B {8 * nbytes / n_quantized:7.3f} bits/weight  NLL {nll:.4f}", flush=True)

    row("no recovery adapter", 0, replace(qb, recovery=None))
    row("recovery, float16 factors", stored, qb)
    for bits in (float(b) for b in args.bits.split(",") if b):
        recovery = compress_recovery(qb.recovery, bits, qb.recovery.info.get("plain_fingerprint", "sha256:" + "0" * 64))
        row(f"recovery compressed @ {bits:g} bits", len(recovery.blob), replace(qb, recovery=recovery))
    if args.out is not None:
        args.out.write_text(json.dumps({"quantized_base": str(args.quantized_base), "threads": args.threads,
                                        "load_avg_1m": round(os.getloadavg()[0], 2), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

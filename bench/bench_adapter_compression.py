"""Adapter compression, side by side: what each step of lowra's scheme buys, on the three sample users.

For each user an adapter is trained exactly as `lowra demo` trains it (or loaded with --adapters DIR, a folder
with one `lowra train` output per user), then compressed by every scheme below and evaluated on the held-out
split. Gain kept = (base loss - compressed loss) / (base loss - fp32 adapter loss).

Schemes (bits are per fp adapter parameter; baselines count codes + their fp16 scales/codebooks, lowra rows
count every byte of the blob file):
  uniform-2b     per-channel min-max uniform 2-bit on rows of A and columns of B (fp16 min + step each)
  uniform-1b     same at 1 bit
  lloydmax-1b    per-channel Lloyd-Max 1-bit on A and B (2 fp16 levels per channel)
  svd-greedy     SVD components + learned codebooks + {0,1,2,4}-bit knapsack, unweighted (lowra's skeleton)
  lowra          ... with activation-aware SVD and input-weighted codebooks: the shipped scheme

Targets (issue #2): >= 98% gain kept at 1.0 effective bit, >= 95% at 0.5, blob >= 14x smaller than PEFT fp16.
Usage: python bench/bench_adapter_compression.py [--adapters DIR] [--steps 40] [--out out/bench]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowra.sdk.base_model import load_base
from lowra.sdk.quant.codebook import lloyd_max
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.cli.demo_config import SAMPLE_USERS, DemoConfig
from lowra.sdk.adapters.model import delete_adapter, get_adapter_factors, set_active_adapters, set_adapter_factors
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.train import evaluate_loss, train_adapter
from lowra.sdk.adapters.peft_io import load_adapter, save_adapter
from lowra.sdk.workflow import apply_blob, compress_factors, model_fingerprint

USERS = ("terse_notes", "python_help", "json_reply")


def uniform_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return lo + torch.round((x - lo) / step) * step


def lloydmax_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    return lloyd_max(x, bits).dequantize().to(torch.float32)


def baseline(factors, quantize, bits: int):
    """Quantize each rank channel (rows of A, columns of B) on its own; returns (factors, bits/param).

    Two float16 numbers per channel (min and step, or the two 1-bit levels) are counted; B's own rows are only
    `rank` long, so quantizing them row-wise would spend 2 bits/param on scales alone."""
    out, code_bits, n = {}, 0.0, 0
    for name, (a, b) in factors.items():
        out[name] = (quantize(a, bits), quantize(b.T.contiguous(), bits).T.contiguous())
        n += a.numel() + b.numel()
        code_bits += bits * (a.numel() + b.numel()) + 32 * (a.shape[0] + b.shape[1])
    return out, code_bits / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=None, help="skip training: a folder with <user>/ adapters from `lowra train`, or a demo output "
                    "folder (<user>/adapter), e.g. out/demo")
    ap.add_argument("--steps", type=int, default=DemoConfig().steps)
    ap.add_argument("--users", default=",".join(USERS))
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_base()
    lora = DemoConfig().lora
    results = {}
    for uid in args.users.split(","):
        dataset = load_user_dataset(SAMPLE_USERS / uid)
        ev = lambda: evaluate_loss(base.model, base.tokenizer, dataset.heldout)  # noqa: E731
        base_loss = ev()
        if args.adapters:
            folder = Path(args.adapters) / uid
            files = load_adapter(folder / "adapter" if (folder / "adapter").is_dir() else folder)
            factors, stats, lora_used = files.factors, files.input_stats, files.lora
        else:
            res = train_adapter(base.model, base.tokenizer, dataset, lora, TrainConfig(steps=args.steps), adapter_name=uid)
            factors = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in get_adapter_factors(base.model, uid).items()}
            stats, lora_used = res.input_stats, lora
            save_adapter(base.model, uid, out / uid / "adapter", lora, input_stats=stats, overwrite=True)
            delete_adapter(base.model, uid)
        save_adapter_fp16 = out / uid / "peft_fp16"
        set_adapter_factors(base.model, "fp", factors, lora_used.scaling)
        set_active_adapters(base.model, "fp")
        fp_loss = ev()
        save_adapter(base.model, "fp", save_adapter_fp16, lora_used, dtype=torch.float16, overwrite=True)
        peft_bytes = (save_adapter_fp16 / "adapter_model.safetensors").stat().st_size
        delete_adapter(base.model, "fp")
        fingerprint = model_fingerprint(base.model, list(factors))
        gain = base_loss - fp_loss
        rows = []

        def record(scheme, bits, loss, extra=None):
            row = {"scheme": scheme, "bits": bits, "loss": loss, "kept": (base_loss - loss) / gain}
            row.update(extra or {})
            rows.append(row)
            print(f"  {uid:12s} {scheme:26s} {bits:6.3f} bits  loss {loss:.4f}  kept {100 * row['kept']:7.1f}%", flush=True)

        for scheme, fn, bits in (("uniform-2b", uniform_rows, 2), ("uniform-1b", uniform_rows, 1),
                                 ("lloydmax-1b", lloydmax_rows, 1)):
            q, b = baseline(factors, fn, bits)
            set_adapter_factors(base.model, "q", q, lora_used.scaling)
            set_active_adapters(base.model, "q")
            record(scheme, b, ev())
            delete_adapter(base.model, "q")
        variants = [("svd-greedy", bits, False) for bits in (0.5, 1.0)]
        variants += [("lowra", bits, True) for bits in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
        for scheme, bits, weighted in variants:
            t0 = time.perf_counter()
            c = compress_factors(factors, lora_used, CompressConfig(bits=bits, weighted=weighted),
                                 adapter_id=uid, base_fingerprint=fingerprint, input_stats=stats)
            secs = time.perf_counter() - t0
            apply_blob(base.model, c.blob, "c")
            record(f"{scheme} @{bits}", c.report["effective_bits"], ev(),
                   {"blob_bytes": c.report["file_bytes"], "size_ratio": peft_bytes / c.report["file_bytes"],
                    "compress_s": secs, "code_bits": c.report["code_bits"]})
            delete_adapter(base.model, "c")
        results[uid] = {"base_loss": base_loss, "fp_loss": fp_loss, "peft_fp16_bytes": peft_bytes, "rows": rows}

    print("\nscheme                       " + "  ".join(f"{u:>22s}" for u in results))
    for i, row in enumerate(next(iter(results.values()))["rows"]):
        cells = [f"{r['rows'][i]['bits']:5.2f}b {100 * r['rows'][i]['kept']:6.1f}%" for r in results.values()]
        print(f"{row['scheme']:28s} " + "  ".join(f"{c:>22s}" for c in cells))
    for uid, r in results.items():
        main_row = next(x for x in r["rows"] if x["scheme"] == "lowra @1.0")
        print(f"{uid}: PEFT fp16 {r['peft_fp16_bytes']:,} B vs blob {main_row['blob_bytes']:,} B = "
              f"{main_row['size_ratio']:.1f}x smaller")
    (out / "adapter_compression.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Held-out NLL of the low-bit SmolLM2-135M base alone (no adapter): how the allocation and calibration choices
move it at 4.0 / 3.0 / 2.0 effective bits (issue 11, first part).

NLL = mean nats per answer token over the sample users' held-out sets (:func:`lowra.sdk.training.eval.heldout_nll`;
the same tokens for every row). Every lowra row stores the same file format (1/2/4-bit rows, every byte counted; the
levels as int, format version 4, or with --codebook-format float16 as version 1).

Rows:
  fp              the fp32 base
  weight@b        lowra before issue 11: codebooks and widths by weight MSE, no calibration
  codebooks@b     codebooks weighted by calibration E[x^2]; widths still by the codebooks' weight MSE
  output@b        calibrated codebooks; widths by expected output error sum_j E[x_j^2] dW_rj^2 (sensitivity none)
  fisher@b        the same times the layer's output Fisher (the default QuantizeConfig)
  fisher_rows@b   per-row Fisher (each output's own mean squared loss gradient) instead of the layer mean
  gptq@b          fisher@b's widths and codebooks, rounded with error feedback against the calibration inputs'
                  Hessian (QuantizeConfig(error_feedback=True), lowra.sdk.quant.base.gptq)
  nf4             QLoRA NormalFloat-4 with absmax groups of 64 (4.25 bits; bitsandbytes' double quantization
                  stores the scales in ~4.13)
  q4_0            llama.cpp's Q4_0 rule: blocks of 32, d = (signed absmax) / -8 in float16, q = clamp(round(x / d)
                  + 8, 0, 15), x' = (q - 8) d (4.5 bits)
  recovered@b     gptq@b (the default quantizer) plus its accuracy-recovery adapter (`lowra recover`: LoRA distilled
                  from the fp model on the calibration text; --recovery-steps), stored in the base (format v2);
                  the "+rec bits" column adds the adapter's float16 bytes per quantized weight
  initialized@b   the same recovery adapter used the other way: the base is gptq@b *without* it (the NLL column is
                  that plain base), and each user's adapter (with --adapter-steps) starts from the recovery factors
                  instead of LoRA's zero init, so the user's blob carries recovery + user (the recovered@b row's users
                  train a fresh adapter stacked on base + recovery). Shares the recovered@b row's adapter when both
                  run in one invocation.
  ROW+rec<bits>   a recovered@b or initialized@b row with its recovery adapter compressed to <bits> effective bits
                  per adapter parameter and stored as version 3 (what `lowra recover` writes by default: +rec1);
                  shares the adapter trained for the row without it in the same invocation
  ROW+q8emb       any row with its token embedding and output head rounded to 8-bit rows
                  (lowra.device_runtime.formats.int8_rows: what an ExecuTorch folder exported with
                  embeddings="int8" computes), e.g. fp+q8emb, gptq@4.0+q8emb
Calibration: lowra.sdk.training.calibration's default set (sample users' train files + pydoc topics, never held-out).

--adapter-steps N adds the "after a user adapter" column: each sample user's LoRA adapter trained on the row's base
exactly as `lowra demo` trains it (default LoraConfig, TrainConfig(steps=N), N = 40 in the demo), then the held-out
NLL of that user with it; the table shows each row's token-weighted mean and its ratio to the fp row's (the issue's
target: within 10% on the demo's default base). The low-bit rows train on the decoded weights (the function a
LowBitLinear computes).

    python bench/bench_base_nll.py                     # every row, table at the end (~20 min on 2 busy cores)
    python bench/bench_base_nll.py --rows fp,fisher@4.0
Rows are cached as JSON under --out (a rerun skips them; --fresh recomputes).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lowra.device_runtime.formats.constants import CODEBOOK_FORMATS, CODED_WIDTHS
from lowra.sdk.adapters.model import delete_adapter, set_adapter_factors
from lowra.sdk.base_model import load_base
from lowra.sdk.quant.base.apply import calibrate
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.plan import QuantizePlan, plan_model
from lowra.sdk.quant.codebook import assign_codes
from lowra.sdk.training.eval import heldout_nll

ROOT = Path(__file__).resolve().parents[1]
BITS = (4.0, 3.0, 2.0)
VARIANTS = ("weight", "codebooks", "output", "fisher", "fisher_rows", "gptq", "recovered", "initialized")
DEFAULT_ROWS = ("fp", "nf4", "q4_0") + tuple(f"{v}@{b}" for v in VARIANTS for b in BITS)


@dataclass
class WeightErrorWidths(QuantizePlan):
    """Calibrated codebooks, but widths chosen by the codebooks' error in weight space (the 'codebooks' row)."""

    weight_distortion: np.ndarray | None = None

    def knapsack_distortion(self) -> np.ndarray:
        return self.weight_distortion


@dataclass
class RowFisherWidths(QuantizePlan):
    """Each row's output error times its own output's Fisher, not the layer mean (the 'fisher_rows' row)."""

    row_fisher: np.ndarray | None = None

    def row_sensitivity(self) -> np.ndarray:
        return self.row_fisher


def weight_space_distortion(plan: QuantizePlan) -> np.ndarray:
    """Unweighted SSE [rows, 3] of every row under the plan's scored levels at each width (nearest codes)."""
    out, start = [], 0
    for name, (o, _) in zip(plan.names, plan.shapes):
        values = plan.prepare(name).values
        cols = []
        for w in CODED_WIDTHS:
            lv = plan.levels[w][start : start + o]
            err = values - lv.gather(1, assign_codes(values, lv).long())
            cols.append((err * err).sum(1))
        out.append(torch.stack(cols, 1).numpy())
        start += o
    return np.concatenate(out)


class Plans:
    """One scored plan per variant, reused across budgets (scoring is most of the work)."""

    def __init__(self, base, codebook_format: str = QuantizeConfig().codebook_format) -> None:
        self.base, self.plans, self.calibration, self.seconds = base, {}, None, {}
        self.codebook_format = codebook_format
        self.recovered: dict[str, tuple[object, dict]] = {}  # bits -> (recovered base, its timing/KL info)

    def get(self, variant: str) -> QuantizePlan:
        if variant in self.plans:
            return self.plans[variant]
        model = self.base.model
        if variant == "weight":
            t0 = time.perf_counter()
            plan = plan_model(model, QuantizeConfig(calibration=None, codebook_format=self.codebook_format),
                              progress=False, source="SmolLM2-135M")
            self.seconds["plan_weight"] = time.perf_counter() - t0
        else:
            if self.calibration is None:  # with the input Hessians, which only the gptq rows use
                t0 = time.perf_counter()
                self.calibration = calibrate(model, QuantizeConfig(error_feedback=True), self.base.tokenizer)
                self.seconds["calibration"] = time.perf_counter() - t0
            sensitivity = "fisher" if variant in ("fisher", "gptq") else "none"
            if variant in ("codebooks", "output", "fisher_rows") and "output" in self.plans:
                plan = self.plans["output"]
            elif variant == "gptq" and "fisher" in self.plans:
                plan = self.plans["fisher"]
            else:
                t0 = time.perf_counter()
                config = QuantizeConfig(sensitivity=sensitivity, error_feedback=False,
                                        codebook_format=self.codebook_format)
                plan = plan_model(model, config, self.calibration, progress=False, source="SmolLM2-135M")
                self.seconds[f"plan_{variant}"] = time.perf_counter() - t0
            if variant == "gptq":
                plan = replace(plan, config=replace(plan.config, error_feedback=True),
                               hessians={n: self.calibration.input_hessian[n] for n in plan.names})
            elif variant == "codebooks":
                plan = WeightErrorWidths(**vars(plan), weight_distortion=weight_space_distortion(plan))
            elif variant == "fisher_rows":
                fisher = np.concatenate([self.calibration.output_fisher[n].double().numpy() for n in plan.names])
                fisher = np.maximum(fisher, 1e-6 * fisher.mean()) / fisher.mean()
                plan = RowFisherWidths(**vars(replace(plan, sensitivity=dict.fromkeys(plan.names, 1.0))),
                                       row_fisher=fisher)
        self.plans[variant] = plan
        return plan


def q4_0(weight: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_0 round trip of a float32 [out, in] weight (in a multiple of 32)."""
    blocks = weight.reshape(weight.shape[0], -1, 32).astype(np.float32)
    pick = np.abs(blocks).argmax(axis=2)[..., None]
    d = (np.take_along_axis(blocks, pick, axis=2) / -8.0).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.round(blocks * inv) + 8, 0, 15)
    return ((q - 8) * d).reshape(weight.shape).astype(np.float32)


def baseline_row(name: str, base) -> tuple[dict, object]:
    """The nf4 / q4_0 rows: every linear the lowra rows quantize, round-tripped by the baseline's rule."""
    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.baselines import nf_quantize

    model = copy.deepcopy(base.model)
    n = 0
    with torch.no_grad():
        for path in linear_module_names(model):
            layer = model.get_submodule(path)
            w = layer.weight.detach().float()
            decoded = nf_quantize(w, 4, 64, path).dequantize() if name == "nf4" else q4_0(w.numpy())
            layer.weight.copy_(torch.from_numpy(np.asarray(decoded)))
            n += w.numel()
    return {"bits": 4.25 if name == "nf4" else 4.5, "n_params": n}, model


def adapter_nll(model, tokenizer, steps: int, init=None) -> dict:
    """Each sample user's held-out NLL with its own adapter, trained on ``model`` as `lowra demo` trains it.

    ``init``: a base's :class:`Recovery`; each user's adapter then starts from its factors and scaling (the
    "initialized" rows) instead of LoRA's zero init."""
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.training.config import TrainConfig
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.eval import sample_user_dirs
    from lowra.sdk.training.train import train_adapter

    users, total, tokens = {}, 0.0, 0
    t0 = time.perf_counter()
    lora = LoraConfig()
    if init is not None:  # the recovery adapter's shape and strength, so its factors are the starting point
        lora = LoraConfig(rank=init.rank, alpha=init.scaling * init.rank)
    for folder in sample_user_dirs():
        dataset = load_user_dataset(folder)
        if init is not None:
            factors = {name: (torch.from_numpy(np.array(a, dtype=np.float32)),
                              torch.from_numpy(np.array(b, dtype=np.float32))) for name, (a, b) in init.factors.items()}
            set_adapter_factors(model, "bench", factors, init.scaling)
        train_adapter(model, tokenizer, dataset, lora, TrainConfig(steps=steps), adapter_name="bench",
                      progress=False)
        result = heldout_nll(model, tokenizer, users=[folder])
        delete_adapter(model, "bench")
        users[dataset.user_id] = result["nll"]
        total, tokens = total + result["nll"] * result["tokens"], tokens + result["tokens"]
    return {"nll": total / tokens, "users": users, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "init": "recovery" if init is not None else "zero"}


def recovered_base(base, plans: Plans, bits: str, recovery_steps: int):
    """gptq@bits plus its recovery adapter, trained once per invocation and shared by the recovered/initialized rows."""
    if bits not in plans.recovered:
        import tempfile

        from lowra.sdk.quant.base.config import RecoveryConfig
        from lowra.sdk.quant.base.recovery import recover_quantized_base

        qb = plans.get("gptq").quantize(float(bits), progress=False)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            qb = recover_quantized_base(base.model, base.tokenizer, qb, Path(tmp) / "recovered.safetensors",
                                        RecoveryConfig(steps=recovery_steps, bits=None), progress=True)
        info = {"recover_s": round(time.perf_counter() - t0, 1),
                "recovery": {k: qb.recovery.info["training"][k] for k in ("kl_first", "kl_last", "config")},
                "bits_with_recovery": float(qb.bits_report()["effective_bits_with_recovery"])}
        plans.recovered[bits] = (qb, info)
    return plans.recovered[bits]


def q8_embeddings(model) -> None:
    """Round the token embedding and output head (once when tied) to 8-bit rows, in place."""
    from lowra.device_runtime.formats.int8_rows import dequantize_q8, quantize_q8

    modules = {id(m.weight): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    with torch.no_grad():
        for module in modules.values():
            rounded = dequantize_q8(*quantize_q8(module.weight.detach().float().numpy()))
            module.weight.copy_(torch.from_numpy(rounded))


def run_row(name: str, base, plans: Plans, recovery_steps: int = 200, adapter_steps: int = 0) -> dict:
    info: dict = {"row": name}
    name, _, modifier = name.partition("+")
    try:
        compress_bits = float(modifier[3:]) if modifier.startswith("rec") and modifier[3:] else None
    except ValueError:
        compress_bits = None
    if modifier not in ("", "q8emb") and compress_bits is None:
        raise SystemExit(f"row modifier +{modifier} is unknown; expected +q8emb or +rec<bits> (e.g. +rec1)")
    if compress_bits is not None and not name.startswith(("recovered@", "initialized@")):
        raise SystemExit(f"+{modifier} compresses a recovery adapter: use it on a recovered@b or initialized@b row")
    model, init = base.model, None
    if name in ("nf4", "q4_0"):
        extra, model = baseline_row(name, base)
        info.update(extra)
    elif name != "fp":
        variant, bits = name.split("@")
        t0 = time.perf_counter()
        if variant in ("recovered", "initialized"):
            qb, extra = recovered_base(base, plans, bits, recovery_steps)
            info.update(extra)
            if compress_bits is not None:  # the same adapter stored as version 3 (lowra recover's default: 1 bit)
                from lowra.sdk.quant.base.recovery import compress_recovery

                plain_report = qb.bits_report()  # of the version-2 file: the low-bit layers' bits stay these
                qb = replace(qb, recovery=compress_recovery(qb.recovery, compress_bits,
                                                            qb.recovery.info["plain_fingerprint"]))
                info["bits_with_recovery"] = (float(plain_report["effective_bits"]) + 8.0 * len(qb.recovery.blob)
                                              / plain_report["n_quantized_params"])
                info["recovery_bits"] = compress_bits
        else:
            qb = plans.get(variant).quantize(float(bits), progress=False)
            info["quantize_s"] = round(time.perf_counter() - t0, 1)
        report = plain_report if compress_bits is not None else qb.bits_report()
        total = qb.report["total"]
        info.update(bits=float(report["effective_bits"]), mse_over_var=total["mse_over_var"],
                    output_error=total.get("output_error"), widths=total["widths"],
                    hessian_error={k: total[k] for k in ("output_error_nearest", "output_error_fed") if k in total})
        model = copy.deepcopy(base.model)
        if variant == "initialized":  # the plain base; the recovery adapter becomes each user's starting point
            init, qb = qb.recovery, replace(qb, recovery=None)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in qb.dequantized_state_dict().items()})
    else:
        info["bits"] = 32.0
    if modifier == "q8emb":
        if model is base.model:
            model = copy.deepcopy(base.model)
        q8_embeddings(model)
    t0 = time.perf_counter()
    result = heldout_nll(model, base.tokenizer)
    info.update(nll=result["nll"], tokens=result["tokens"], users={k: v["nll"] for k, v in result["users"].items()})
    info["eval_s"] = round(time.perf_counter() - t0, 1)
    if adapter_steps:
        if model is base.model:
            model = copy.deepcopy(base.model)  # adapters are injected: keep the shared fp model clean
        info["adapter"] = adapter_nll(model, base.tokenizer, adapter_steps, init)
    return info


def table(rows: list[dict]) -> str:
    fp = next((r["nll"] for r in rows if r["row"] == "fp"), None)
    fp_adapter = next((r["adapter"]["nll"] for r in rows if r["row"] == "fp" and "adapter" in r), None)
    lines = [f"{'row':<16} {'bits':>6} {'+rec bits':>9} {'MSE/var':>8} {'out.err':>8} {'rows 1/2/4-bit %':>17} "
             f"{'NLL':>7} {'vs fp':>7} {'adapter NLL':>11} {'/ fp':>6}"]
    def order(r: dict) -> tuple:
        variant = r["row"].partition("+")[0].split("@")[0]
        return (-r["bits"], VARIANTS.index(variant) if variant in VARIANTS else -1, r["row"])

    for r in sorted(rows, key=order):
        mix = "-"
        if "widths" in r:
            n = sum(r["widths"].values())
            mix = "/".join(f"{100 * r['widths'][str(w)] / n:.0f}" for w in CODED_WIDTHS)
        mse = f"{r['mse_over_var']:8.4f}" if "mse_over_var" in r else f"{'-':>8}"
        out = f"{r['output_error']:8.4f}" if r.get("output_error") is not None else f"{'-':>8}"
        gap = f"{r['nll'] - fp:+7.3f}" if fp is not None else f"{'-':>7}"
        rec = f"{r['bits_with_recovery']:9.3f}" if "bits_with_recovery" in r else f"{'-':>9}"
        adapted = f"{r['adapter']['nll']:11.3f}" if "adapter" in r else f"{'-':>11}"
        ratio = (f"{r['adapter']['nll'] / fp_adapter:6.3f}" if "adapter" in r and fp_adapter else f"{'-':>6}")
        lines.append(f"{r['row']:<16} {r['bits']:6.3f} {rec} {mse} {out} {mix:>17} {r['nll']:7.3f} {gap} {adapted} "
                     f"{ratio}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for forward passes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "base_nll", help="row cache + table")
    ap.add_argument("--fresh", action="store_true", help="recompute rows even if cached")
    ap.add_argument("--codebook-format", choices=CODEBOOK_FORMATS, default=QuantizeConfig().codebook_format,
                    help="how the low-bit rows store their levels (QuantizeConfig.codebook_format; use another --out "
                    "per format: the row cache does not tell them apart)")
    ap.add_argument("--recovery-steps", type=int, default=200, help="distillation steps of the recovered@b rows")
    ap.add_argument("--adapter-steps", type=int, default=0,
                    help="also train each sample user's adapter on each row's base for this many steps (the demo: "
                         "40) and report its held-out NLL (0: skip)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    base = load_base()
    base.model.eval()
    plans = Plans(base, args.codebook_format)
    for name in rows:
        path = args.out / f"{name.replace('@', '_at_').replace('+', '_plus_')}.json"
        cached = json.loads(path.read_text()) if path.is_file() and not args.fresh else None
        if cached is not None and (not args.adapter_steps or cached.get("adapter", {}).get("steps") == args.adapter_steps):
            print(f"{name}: cached ({path})")
            continue
        info = run_row(name, base, plans, args.recovery_steps, args.adapter_steps)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
        info["threads"] = args.threads
        info["codebook_format"] = args.codebook_format
        info["plan_seconds"] = {k: round(v, 1) for k, v in plans.seconds.items()}
        path.write_text(json.dumps(info, indent=1))
        print(f"{name}: {info['bits']:.3f} bits, NLL {info['nll']:.4f} ({info['tokens']} tokens), load "
              f"{info['load_avg_1m']}", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    results = [r for r in results if r["row"] in rows] or results
    text = table(results)
    print(text)
    (args.out / "table.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

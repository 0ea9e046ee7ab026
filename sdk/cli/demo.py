"""The main job (`lowra demo`): personalize the embedded SmolLM2 for each sample user, end to end.

Per user: train a short LoRA adapter on the frozen base, compress it to the bit budget (every byte counted),
write the blob, load it through the torch-free device runtime (verify, decode, merge at load), check the merged
weights against the sdk's own merge, and generate a reply to a held-out prompt with the device-merged weights.
Then one table on stdout and report.md / report.json / retained_gain.png under the output folder.
"""
from __future__ import annotations

import importlib.resources
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowra.device_runtime import DeviceRuntime
from lowra.device_runtime._files import atomic_write_bytes
from lowra.sdk.base_model import linear_module_names, load_base
from lowra.sdk.quant.adapter_compression import CompressConfig
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.adapters.lora import LoraConfig, delete_adapter, get_adapter_factors, lora_layers, set_active_adapters
from lowra.sdk.quant.lowbit_linear import load_quantized_base, lowbit_layers
from lowra.sdk.quant.base import QuantizeConfig, cached_quantized_base
from lowra.sdk.training.train import TrainConfig, evaluate_loss, save_adapter, train_adapter
from lowra.sdk.workflow import (
    apply_blob,
    compress_factors,
    frozen_weight,
    generate_reply,
    load_weights_into,
    model_fingerprint,
    sdk_merged_weight,
)

# The sample users ship as package data (lowra.samples), so an installed wheel runs the demo too.
SAMPLE_USERS = Path(str(importlib.resources.files("lowra.samples"))) / "users"


@dataclass
class DemoConfig:
    out: str = "out/demo"
    users: tuple[str, ...] = tuple(str(SAMPLE_USERS / u) for u in ("terse_notes", "python_help", "json_reply"))
    steps: int = 40
    bits: float = 1.0
    sweep: tuple[float, ...] = (0.5, 2.0)
    base: str | None = None
    # The base users train on: quantized to this many effective bits (LowRA, cached after the first run);
    # None trains on the full-precision base. 4 bits by default because that is what SmolLM2-135M survives:
    # measured 2026-11-29 at 1.5 bits (uncalibrated, no LoftQ), terse_notes' held-out loss was 14.2 on the base
    # and 6.08 with its adapter (0.23 on the fp base) and the replies were "- - -" (docs/RESULTS.md). Sub-2-bit
    # bases are for larger models; `--base-bits 1.5` runs that path.
    base_bits: float | None = 4.0
    weighted: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_new_tokens: int = 48


def _retained(base: float, fp: float, compressed: float) -> float:
    gain = base - fp
    return (base - compressed) / gain if gain > 0 else float("nan")


def run_demo(config: DemoConfig) -> dict[str, object]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"lowra demo: loading base {config.base or 'SmolLM2-135M-Instruct (embedded)'}")
    base = load_base(config.base)
    gen = load_base(config.base)  # a second, plain copy that receives the device-merged weights
    base_info = _prepare_base(base, config.base_bits)
    runtime = DeviceRuntime(base_info["runtime_base"])
    # gen computes with exactly what the device runtime decodes: the low-bit base's weights, then each user's merge
    params = dict(gen.model.named_parameters())
    load_weights_into(gen.model, {n: runtime.weight(n) for n in runtime.base.tensors if n in params})
    train_config = TrainConfig(steps=config.steps)
    rows: list[dict[str, object]] = []
    touched_ever: set[str] = set()
    fingerprint = None
    for user_dir in config.users:
        dataset = load_user_dataset(user_dir)
        uid = dataset.user_id
        udir = out / uid
        print(f"\n== {uid}: {dataset.card.get('task', '')}")
        base_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
        result = train_adapter(base.model, base.tokenizer, dataset, config.lora, train_config, adapter_name=uid)
        fp_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
        factors = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in get_adapter_factors(base.model, uid).items()}
        if fingerprint is None:
            fingerprint = model_fingerprint(base.model, list(factors))
        save_adapter(base.model, uid, udir / "adapter", config.lora, input_stats=result.input_stats,
                     base_name_or_path=str(base_info["runtime_base"]), overwrite=True)
        save_adapter(base.model, uid, udir / "peft_fp16", config.lora, dtype=torch.float16,
                     base_name_or_path=str(base_info["runtime_base"]), overwrite=True)
        peft_bytes = (udir / "peft_fp16" / "adapter_model.safetensors").stat().st_size

        card = {
            "task": dataset.card.get("task", ""),
            "data": {"user": uid, "n_train": len(dataset.train), "n_heldout": len(dataset.heldout),
                     "source": dataset.card.get("source", "")},
            "training": {"steps": train_config.steps, "batch_size": train_config.batch_size, "rank": config.lora.rank},
        }
        budgets = sorted({config.bits, *config.sweep})
        sweep_rows = []
        main = None
        for bits in budgets:
            t0 = time.perf_counter()
            compressed = compress_factors(
                factors, config.lora, CompressConfig(bits=bits, weighted=config.weighted),
                adapter_id=uid, base_fingerprint=fingerprint, input_stats=result.input_stats, card=card,
            )
            seconds = time.perf_counter() - t0
            apply_blob(base.model, compressed.blob, "compressed")
            loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
            delete_adapter(base.model, "compressed")
            sweep_rows.append({"bits": compressed.report["effective_bits"], "budget": bits, "loss": loss,
                               "retained": _retained(base_loss, fp_loss, loss), "compress_s": seconds})
            if bits == config.bits:
                main = (compressed, loss, seconds)
        compressed, c_loss, c_seconds = main
        card["heldout_loss"] = {"base": base_loss, "fp_adapter": fp_loss, "compressed": c_loss}
        compressed = compressed.with_card(card)
        blob_path = compressed.write(udir / f"{uid}.lowra", overwrite=True)

        # The device side: verify + decode + merge at load, then check against the sdk's own merge.
        info = runtime.load_user(blob_path)
        layers = lora_layers(base.model)
        max_diff = max(
            float(np.abs(runtime.weight(f"{m}.weight") - sdk_merged_weight(frozen_weight(layers[m].base), compressed.blob, m).numpy()).max())
            for m in info.modules
        )
        touched_ever |= {f"{m}.weight" for m in info.modules}
        load_weights_into(gen.model, {name: runtime.weight(name) for name in touched_ever})
        prompt = dataset.heldout[0].prompt
        reply = generate_reply(gen.model, gen.tokenizer, prompt, config.max_new_tokens)
        set_active_adapters(base.model, None)
        base_reply = generate_reply(base.model, base.tokenizer, prompt, config.max_new_tokens)
        delete_adapter(base.model, uid)

        row = {
            "user": uid,
            "loss_base": base_loss,
            "loss_fp": fp_loss,
            "loss_compressed": c_loss,
            "retained_gain": _retained(base_loss, fp_loss, c_loss),
            "peft_fp16_bytes": peft_bytes,
            "blob_bytes": compressed.report["file_bytes"],
            "size_ratio": peft_bytes / compressed.report["file_bytes"],
            "effective_bits": compressed.report["effective_bits"],
            "code_bits": compressed.report["code_bits"],
            "width_histogram": compressed.report["width_histogram"],
            "train_s": result.seconds,
            "compress_s": c_seconds,
            "load_ms": info.load_ms,
            "merge_ms": info.merge_ms,
            "max_abs_diff_device_vs_sdk": max_diff,
            "prompt": prompt,
            "expected": dataset.heldout[0].response,
            "reply_base": base_reply,
            "reply_personalized": reply,
            "sweep": sweep_rows,
            "blob": str(blob_path),
        }
        rows.append(row)
        print(f"   loss base {base_loss:.3f} -> fp {fp_loss:.3f} -> {compressed.report['effective_bits']:.2f}-bit "
              f"{c_loss:.3f} ({100 * row['retained_gain']:.1f}% of the gain kept); blob {row['blob_bytes']} bytes; "
              f"merged in {info.load_ms:.0f} ms")
        print(f"   prompt: {prompt}\n   base:   {base_reply}\n   user:   {reply}")

    base_info["runtime_base"] = str(base_info["runtime_base"])
    report = {"config": _jsonable(asdict(config)), "base": base_info, "users": rows,
              "seconds": time.perf_counter() - t_start}
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode(), overwrite=True)
    table = format_table(rows)
    print("\n" + table)
    _plot(rows, out / "retained_gain.png")
    atomic_write_bytes(out / "report.md", _markdown(rows, table, report["seconds"], base_info).encode(), overwrite=True)
    print(f"\nreport: {out / 'report.md'}  plot: {out / 'retained_gain.png'}  ({report['seconds']:.0f} s)")
    return report


def _prepare_base(base, bits: float | None) -> dict[str, object]:
    """Quantize the base in place to ``bits`` effective bits (cached file) and say what it costs."""
    linears = linear_module_names(base.model)
    fp32_bytes = sum(base.model.get_submodule(p).weight.nbytes for p in linears)
    info: dict[str, object] = {"bits": bits, "runtime_base": base.path, "source": str(base.path),
                               "linear_fp32_bytes": fp32_bytes,
                               "n_linears": len(linears)}
    if bits is None:
        print(f"   base: full precision, linears {fp32_bytes / 2**20:.1f} MiB (float32)")
        return info
    t0 = time.perf_counter()
    path = cached_quantized_base(base.model, base.path, QuantizeConfig(bits=bits))
    qb = load_quantized_base(base.model, path)
    report = qb.bits_report()
    packed = sum(m.nbytes() for m in lowbit_layers(base.model).values())
    info.update(runtime_base=path, file_bytes=report["file_bytes"], effective_bits=report["effective_bits"],
                code_bits=report["code_bits"], width_histogram=report["width_histogram"],
                dense_bytes=report["bytes"]["dense"], linear_packed_bytes=packed,
                mse_over_var=qb.report.get("total", {}).get("mse_over_var"), seconds=time.perf_counter() - t0)
    print(f"   base: quantized to {report['effective_bits']:.3f} effective bits/param ({path}, "
          f"{report['file_bytes']:,} bytes incl. {report['bytes']['dense']:,} of float16 embeddings/norms); "
          f"linears {packed / 2**20:.1f} MiB packed vs {fp32_bytes / 2**20:.1f} MiB float32 "
          f"({fp32_bytes / packed:.1f}x smaller), {info['seconds']:.0f} s")
    return info


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def format_table(rows: list[dict[str, object]]) -> str:
    head = ("user", "loss base", "loss fp", "loss lowra", "gain kept", "PEFT fp16 B", "blob B", "smaller",
            "eff. bits", "code bits", "merge ms")
    lines = [head]
    for r in rows:
        lines.append((
            r["user"], f"{r['loss_base']:.3f}", f"{r['loss_fp']:.3f}", f"{r['loss_compressed']:.3f}",
            f"{100 * r['retained_gain']:.1f}%", f"{r['peft_fp16_bytes']:,}", f"{r['blob_bytes']:,}",
            f"{r['size_ratio']:.1f}x", f"{r['effective_bits']:.3f}", f"{r['code_bits']:.3f}", f"{r['load_ms']:.0f}",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    fmt_line = lambda line: "| " + " | ".join(str(c).rjust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt_line(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt_line(l) for l in lines[1:]])


def _plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        pts = sorted((s["bits"], 100 * s["retained"]) for s in r["sweep"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["user"])
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("effective bits per adapter parameter (every byte counted)")
    ax.set_ylabel("held-out gain kept vs fp32 adapter (%)")
    ax.set_title("lowra: compressed adapter quality vs size")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(rows: list[dict[str, object]], table: str, seconds: float, base: dict[str, object]) -> str:
    if base.get("bits") is None:
        base_line = "base: full precision (float32)"
    else:
        base_line = (f"base: quantized with lowra to {base['effective_bits']:.3f} effective bits/param, "
                     f"{base['file_bytes']:,} bytes on disk ({base['dense_bytes']:,} of them float16 embeddings and "
                     f"norms); linears {base['linear_packed_bytes']:,} bytes packed in RAM vs "
                     f"{base['linear_fp32_bytes']:,} float32; widths {base['width_histogram']}; "
                     f"MSE/var {base['mse_over_var']}")
    parts = ["# lowra demo report", "", base_line, "", table, "",
             "gain kept = (base loss - compressed loss) / (base loss - fp32 adapter loss), held-out split.",
             "effective bits count every byte of the blob file; code bits count only the indices.",
             "merge ms = read + verify (checksum, base fingerprint) + decode + merge on the device runtime.", "",
             "![retained gain vs effective bits](retained_gain.png)", ""]
    for r in rows:
        parts += [f"## {r['user']}", "", f"- prompt: {r['prompt']}", f"- expected: {r['expected']}",
                  f"- base model: {r['reply_base']}", f"- personalized (device-merged): {r['reply_personalized']}",
                  f"- device merge vs sdk merge, max abs diff: {r['max_abs_diff_device_vs_sdk']:.2e}",
                  f"- bit widths of channels: {r['width_histogram']}",
                  "- sweep: " + ", ".join(f"{s['bits']:.2f} bits -> {100 * s['retained']:.1f}%" for s in r["sweep"]), ""]
    parts.append(f"total time {seconds:.0f} s")
    return "\n".join(parts)

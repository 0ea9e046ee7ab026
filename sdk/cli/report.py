"""The demo's report: the table on stdout, report.json, report.md and the retained-gain plot.

Kept apart from :mod:`lowra.sdk.cli.demo` so the demo reads as its pipeline; this module only formats rows the
demo measured (one dict per user, see ``run_demo``) and writes them atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from lowra.device_runtime._files import atomic_write_bytes


def write_report(out: Path, report: dict[str, object]) -> str:
    """Write report.json, retained_gain.png and report.md under ``out``; return the table for stdout."""
    rows, base = report["users"], report["base"]
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode(), overwrite=True)
    table = format_table(rows)
    plot_retained_gain(rows, out / "retained_gain.png")
    atomic_write_bytes(out / "report.md", _markdown(rows, table, report["seconds"], base).encode(), overwrite=True)
    return table


def retained_gain(base_loss: float, fp_loss: float, compressed_loss: float) -> float:
    """The share of the fp adapter's held-out gain the compressed adapter keeps (nan when there was no gain)."""
    gain = base_loss - fp_loss
    return (base_loss - compressed_loss) / gain if gain > 0 else float("nan")


def jsonable(value: object) -> object:
    """``value`` with tuples as lists and anything JSON cannot hold (paths, configs' odd types) as strings."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def format_table(rows: list[dict[str, object]]) -> str:
    head = ("user", "loss base", "fp32 base", "loss fp", "loss lowra", "gain kept", "PEFT fp16 B", "blob B",
            "smaller", "eff. bits", "code bits", "merge ms")
    lines = [head]
    for r in rows:
        fp_base = r.get("loss_base_fp")
        lines.append((
            r["user"], f"{r['loss_base']:.3f}", "-" if fp_base is None else f"{fp_base:.3f}", f"{r['loss_fp']:.3f}",
            f"{r['loss_compressed']:.3f}",
            f"{100 * r['retained_gain']:.1f}%", f"{r['peft_fp16_bytes']:,}", f"{r['blob_bytes']:,}",
            f"{r['size_ratio']:.1f}x", f"{r['effective_bits']:.3f}", f"{r['code_bits']:.3f}", f"{r['load_ms']:.0f}",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]

    def fmt_line(line: tuple[object, ...]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(line, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_line(lines[0]), rule] + [fmt_line(line) for line in lines[1:]])


def plot_retained_gain(rows: list[dict[str, object]], path: Path) -> None:
    """Gain kept vs effective bits, one line per user over its budget sweep (matplotlib, imported only here)."""
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

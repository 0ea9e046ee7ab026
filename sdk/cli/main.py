"""The ``lowra`` command: train, compress, inspect, merge, generate, demo.

Every subcommand runs offline on the CPU (CUDA when present), refuses to overwrite outputs unless --force,
and exits with status 2 and a one-line explanation when lowra refuses an input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

DESCRIPTION = """\
lowra: personalize a small LLM per user on the server, ship each user a sub-2-bit adapter blob,
merge it on the device.

typical flow:
  lowra train    --user samples/users/terse_notes --out out/terse_notes/adapter
  lowra compress --adapter out/terse_notes/adapter --bits 1.0 --out out/terse_notes/user.lowra
  lowra inspect  out/terse_notes/user.lowra
  lowra generate --blob out/terse_notes/user.lowra --prompt "Lunch with Ana on Monday at noon."
  lowra demo     (all of the above for the three sample users, with a report)

--base defaults to the embedded SmolLM2-135M-Instruct (converted once into ~/.cache/lowra or $LOWRA_CACHE);
pass a local Hugging Face causal-LM folder to use another model.
"""


def _add_base(p: argparse.ArgumentParser, quantized: bool = True) -> None:
    p.add_argument(
        "--base",
        default=None,
        help="base model: a local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    if quantized:
        p.add_argument(
            "--quantized-base",
            default=None,
            metavar="FILE",
            help="a low-bit base written by `lowra quantize-base` from this --base: its linears (packed) and dense "
            "tensors replace the base's, and adapters bind to it (use the same file in train, compress, merge, "
            "generate)",
        )


def _load_base(args: argparse.Namespace):
    """The torch base of --base, turned into the --quantized-base file's low-bit base when one is given."""
    from lowra.sdk.base_model import load_base

    base = load_base(args.base)
    if getattr(args, "quantized_base", None):
        from lowra.sdk.quant.lowbit_linear import load_quantized_base

        load_quantized_base(base.model, args.quantized_base)
    return base


def _runtime_base(args: argparse.Namespace) -> Path:
    """What the device runtime loads: the --quantized-base file, else the --base folder."""
    from lowra.sdk.base_model import resolve_base

    if getattr(args, "quantized_base", None):
        path = Path(args.quantized_base)
        if not path.is_file():
            raise FileNotFoundError(f"--quantized-base {path} does not exist; write it with `lowra quantize-base`")
        return path
    return resolve_base(args.base)


def _add_lora_train(p: argparse.ArgumentParser) -> None:
    from lowra.sdk.adapters.lora import LoraConfig
    from lowra.sdk.training.train import TrainConfig

    lc, tc = LoraConfig(), TrainConfig()
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=lc.rank, help=f"LoRA rank (default {lc.rank})")
    g.add_argument("--alpha", type=float, default=lc.alpha, help=f"LoRA alpha; scaling = alpha/rank (default {lc.alpha})")
    g.add_argument(
        "--targets",
        default="all-linear",
        help="'all-linear' (every linear but the output head) or comma-separated names, e.g. q_proj,v_proj",
    )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=tc.steps, help=f"optimizer steps (default {tc.steps})")
    g.add_argument("--batch-size", type=int, default=tc.batch_size, help=f"examples per step (default {tc.batch_size})")
    g.add_argument("--lr", type=float, default=tc.learning_rate, help=f"peak learning rate (default {tc.learning_rate})")
    g.add_argument("--max-len", type=int, default=tc.max_len, help=f"tokens per example (default {tc.max_len})")
    g.add_argument("--seed", type=int, default=tc.seed, help="random seed; same seed + data = same adapter")


def _add_compress(p: argparse.ArgumentParser, bits_default: float = 1.0) -> None:
    g = p.add_argument_group("compression")
    g.add_argument(
        "--bits",
        type=float,
        default=bits_default,
        help=f"budget in effective bits per adapter parameter, counting every stored byte (default {bits_default})",
    )
    g.add_argument("--unweighted", action="store_true", help="ignore recorded input statistics (plain SVD and MSE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowra", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a LoRA adapter for one user on the frozen base",
        description="Train a LoRA adapter on a user folder (train.jsonl / heldout.jsonl of prompt/response pairs) and "
        "save it as a PEFT-compatible folder plus the input statistics compression uses. Prints held-out loss of "
        "the base and of the adapter.",
    )
    p.add_argument("--user", required=True, help="user dataset folder, e.g. samples/users/terse_notes")
    p.add_argument("--out", required=True, help="adapter folder to write (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_base(p)
    _add_lora_train(p)

    p = sub.add_parser(
        "compress",
        help="compress a trained adapter into a sub-2-bit lowra blob",
        description="Compress a trained adapter folder into a lowra blob (docs/FORMAT.md) that fits --bits effective "
        "bits per parameter with every byte counted, bound to the base it was trained on. With --user, also "
        "reports held-out loss of base, fp adapter and compressed adapter and stores it in the adapter card.",
    )
    p.add_argument("--adapter", required=True, help="adapter folder written by `lowra train` (or PEFT)")
    p.add_argument("--out", required=True, help="blob file to write, e.g. user.lowra")
    p.add_argument("--id", default=None, help="adapter id stored in the blob (default: the adapter folder's name)")
    p.add_argument("--user", default=None, help="user folder to evaluate held-out loss on (optional)")
    p.add_argument("--force", action="store_true", help="replace an existing blob")
    _add_base(p)
    _add_compress(p)

    p = sub.add_parser(
        "inspect",
        help="show a blob's metadata, effective bits and bit-width histogram",
        description="Verify a blob (format, version, checksum) and print its metadata, effective bits (every byte) "
        "beside code bits, the byte breakdown and the histogram of channel widths.",
    )
    p.add_argument("blob", help="blob file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--modules", action="store_true", help="also list every module with its widths")

    p = sub.add_parser(
        "merge",
        help="merge a blob into the base (device runtime) and save the merged model",
        description="Load the base with the torch-free device runtime, verify the blob against it, merge at load "
        "time and write the merged weights as a Hugging Face model folder (config and tokenizer copied).",
    )
    p.add_argument("--blob", required=True, help="blob file")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_base(p)

    p = sub.add_parser(
        "generate",
        help="generate a reply with a user's blob merged on the device runtime",
        description="Merge the blob with the device runtime (verify, decode, W += up @ down) and generate a greedy "
        "reply with the merged weights. Without --blob, the base model answers.",
    )
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--blob", default=None, help="blob file (omit for the plain base)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit (default 64)")
    _add_base(p)

    p = sub.add_parser(
        "quantize-base",
        help="quantize the base model's linear layers below 2 bits (LowRA) into one lowra-base file",
        description="Quantize every linear layer of the base (not embeddings/norms/head, kept in float16) with "
        "per-row learned codebooks and 1/2/4-bit rows chosen under --bits effective bits per parameter, every byte "
        "of the file counted except the dense tensors. Prints effective bits, error (MSE / weight variance) and "
        "the width histogram. Format: docs/FORMAT.md (Quantized base).",
    )
    p.add_argument("--out", required=True, help="file to write, e.g. out/base-1.5bit.safetensors")
    p.add_argument("--bits", type=float, default=1.5, help="budget in effective bits per parameter (default 1.5)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per absmax scale group; 0 = none, one codebook per row (default: the measured best)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    _add_base(p, quantized=False)

    from lowra.sdk.cli.demo import DemoConfig

    dc = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="the main job: train, compress, ship and merge an adapter for each sample user, with a report",
        description="For each sample user: train a short adapter, compress it to --bits effective bits, write the "
        "blob, load it through the device runtime, merge, and generate a reply to a held-out prompt. Prints one "
        "table and writes report.md, report.json and retained_gain.png under --out.",
    )
    p.add_argument("--out", default=dc.out, help=f"output folder (default {dc.out})")
    p.add_argument("--users", default=None, help="comma-separated user folders (default: the three sample users)")
    p.add_argument("--steps", type=int, default=dc.steps, help=f"training steps per user (default {dc.steps})")
    p.add_argument(
        "--sweep",
        default=",".join(str(b) for b in dc.sweep),
        help="extra budgets (effective bits) evaluated for the plot (default %(default)s; '' to skip)",
    )
    p.add_argument(
        "--base-bits",
        type=float,
        default=dc.base_bits,
        help=f"quantize the base to this many effective bits per parameter before training (LowRA; cached in "
        f"~/.cache/lowra/quantized after the first run, ~1 min); 0 = train on the full-precision base "
        f"(default {dc.base_bits})",
    )
    _add_base(p, quantized=False)
    _add_compress(p, bits_default=dc.bits)
    return parser


def _lora_config(args: argparse.Namespace):
    from lowra.sdk.adapters.lora import LoraConfig

    targets = "all-linear" if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    return LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets)


def _compress_config(args: argparse.Namespace):
    from lowra.sdk.quant.adapter_compression import CompressConfig

    return CompressConfig(bits=args.bits, weighted=not args.unweighted)


def cmd_train(args: argparse.Namespace) -> int:
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.train import TrainConfig, evaluate_loss, save_adapter, train_adapter

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already exists and is not empty; pass --force to replace it")
    dataset = load_user_dataset(args.user)
    lora = _lora_config(args)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, max_len=args.max_len, seed=args.seed
    )
    base = _load_base(args)
    base_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, config.max_len)
    result = train_adapter(base.model, base.tokenizer, dataset, lora, config)
    loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, config.max_len)
    save_adapter(
        base.model, result.adapter_name, out, lora, input_stats=result.input_stats,
        base_name_or_path=str(args.quantized_base or base.path), overwrite=args.force,
    )
    print(f"trained {dataset.user_id}: {config.steps} steps in {result.seconds:.0f} s")
    print(f"held-out loss: base {base_loss:.4f} -> adapter {loss:.4f}")
    print(f"adapter written to {out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from lowra.sdk.training.train import load_adapter
    from lowra.sdk.workflow import base_dir_fingerprint, compress_factors

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    adapter = load_adapter(args.adapter)
    config = _compress_config(args)
    base_dir = _runtime_base(args)
    adapter_id = args.id or Path(args.adapter).resolve().name
    card: dict[str, object] = {"task": "", "adapter_folder": str(args.adapter)}
    compressed = compress_factors(
        adapter.factors, adapter.lora, config, adapter_id=adapter_id,
        base_fingerprint=base_dir_fingerprint(base_dir, list(adapter.factors)),
        input_stats=adapter.input_stats, card=card, progress=True,
    )
    if args.user:
        from lowra.sdk.training.data import load_user_dataset
        from lowra.sdk.adapters.lora import set_active_adapters, set_adapter_factors
        from lowra.sdk.training.train import evaluate_loss
        from lowra.sdk.workflow import apply_blob

        dataset = load_user_dataset(args.user)
        base = _load_base(args)
        losses = {"base": evaluate_loss(base.model, base.tokenizer, dataset.heldout)}
        set_adapter_factors(base.model, "fp", adapter.factors, adapter.lora.scaling)
        set_active_adapters(base.model, "fp")
        losses["fp_adapter"] = evaluate_loss(base.model, base.tokenizer, dataset.heldout)
        apply_blob(base.model, compressed.blob, "compressed")
        losses["compressed"] = evaluate_loss(base.model, base.tokenizer, dataset.heldout)
        gain = losses["base"] - losses["fp_adapter"]
        retained = (losses["base"] - losses["compressed"]) / gain if gain > 0 else float("nan")
        card.update(task=dataset.card.get("task", ""), heldout_loss=losses, retained_gain=retained,
                    data={"user": dataset.user_id, "n_train": len(dataset.train), "n_heldout": len(dataset.heldout)})
        compressed = compressed.with_card(card)
        print(
            f"held-out loss: base {losses['base']:.4f} | fp adapter {losses['fp_adapter']:.4f} | "
            f"compressed {losses['compressed']:.4f} | retained gain {100 * retained:.1f}%"
        )
    compressed.write(out, overwrite=args.force)
    r = compressed.report
    print(
        f"wrote {out}: {r['file_bytes']} bytes, {r['effective_bits']:.3f} effective bits/param "
        f"({r['code_bits']:.3f} code bits), widths {r['width_histogram']}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowra.device_runtime.formats import read_blob

    blob = read_blob(args.blob)
    report = blob.bits_report()
    meta = {k: v for k, v in blob.metadata.items() if k != "modules"}
    if args.json:
        out = {"metadata": meta, "bits": report, "n_modules": len(blob.modules)}
        if args.modules:
            out["modules"] = _module_rows(blob)
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.blob}: lowra adapter blob v{meta['format_version']} (checksum ok)")
    for key in ("adapter_id", "base_fingerprint", "created"):
        print(f"  {key:17s} {meta[key]}")
    print(f"  {'lora':17s} {json.dumps(meta['lora'])}")
    print(f"  {'scheme':17s} {json.dumps(meta['scheme'])}")
    print(f"  {'card':17s} {json.dumps(meta['card'])}")
    print(f"  modules           {len(blob.modules)}, adapter parameters {report['n_params']}")
    print(
        f"  size              {report['file_bytes']} bytes = {report['effective_bits']:.4f} effective bits/param "
        f"(code bits {report['code_bits']:.4f})"
    )
    print("  bytes             " + ", ".join(f"{k} {v}" for k, v in report["bytes"].items()))
    total = sum(report["width_histogram"].values())
    print("  channel widths    " + ", ".join(
        f"{w}-bit {n} ({100 * n / total:.0f}%)" for w, n in report["width_histogram"].items()))
    if args.modules:
        for row in _module_rows(blob):
            print(f"    {row['module']:45s} [{row['out']}x{row['in']}] r={row['rank']} down {row['down']} up {row['up']}")
    return 0


def _module_rows(blob) -> list[dict[str, object]]:
    rows = []
    for i, m in enumerate(blob.modules):
        first = int(blob.layout.module_offsets[i])
        w = blob.layout.widths[first : first + 2 * m.rank].tolist()
        rows.append({"module": m.name, "out": m.out_features, "in": m.in_features, "rank": m.rank,
                     "down": w[: m.rank], "up": w[m.rank :]})
    return rows


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from lowra.device_runtime import DeviceRuntime
    from lowra.device_runtime.formats.container import serialize
    from lowra.sdk.base_model import resolve_base

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    base_dir = resolve_base(args.base)
    runtime = DeviceRuntime(_runtime_base(args))
    info = runtime.load_user(args.blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in base_dir.iterdir():
            if item.is_file() and not item.name.startswith("model.safetensors"):
                shutil.copy2(item, tmp / item.name)
        (tmp / "model.safetensors").write_bytes(serialize(runtime.weights(), {"format": "pt"}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {info.adapter_id} ({len(info.modules)} modules) in {info.load_ms:.0f} ms; wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lowra.device_runtime import DeviceRuntime
    from lowra.sdk.base_model import load_base
    from lowra.sdk.workflow import generate_reply, load_weights_into

    base = load_base(args.base)
    if args.blob or args.quantized_base:
        # The reply comes from the weights the device runtime decodes (and merges), copied into a plain fp model.
        runtime = DeviceRuntime(_runtime_base(args))
        names = set(runtime.base.tensors) if args.quantized_base else set()
        if args.blob:
            info = runtime.load_user(args.blob)
            names |= {f"{m}.weight" for m in info.modules}
            print(f"[merged {info.adapter_id} on the device runtime in {info.load_ms:.0f} ms]", file=sys.stderr)
        params = dict(base.model.named_parameters())
        load_weights_into(base.model, {n: runtime.weight(n) for n in sorted(names) if n in params})
    print(generate_reply(base.model, base.tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_quantize_base(args: argparse.Namespace) -> int:
    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.base import QuantizeConfig, quantize_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    defaults = QuantizeConfig()
    config = QuantizeConfig(bits=args.bits, group_size=defaults.group_size if args.group_size is None else args.group_size)
    base = load_base(args.base)
    quantized = quantize_model(base.model, config, progress=True, source=str(base.path))
    quantized.write(out, overwrite=args.force)
    r, total = quantized.bits_report(), quantized.report["total"]
    rows = sum(r["width_histogram"].values())
    print(
        f"wrote {out}: {r['file_bytes']:,} bytes; {r['effective_bits']:.4f} effective bits/param over "
        f"{r['n_quantized_params']:,} quantized weights ({r['code_bits']:.4f} code bits), dense tensors "
        f"{r['bytes']['dense']:,} bytes (float16)"
    )
    print(f"error: MSE / weight variance {total['mse_over_var']:.4f}; fingerprint {quantized.fingerprint}")
    print("rows: " + ", ".join(f"{w}-bit {n} ({100 * n / rows:.1f}%)" for w, n in r["width_histogram"].items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowra.sdk.cli.demo import DemoConfig, run_demo

    sweep = tuple(float(b) for b in args.sweep.split(",") if b.strip()) if args.sweep else ()
    users = tuple(u.strip() for u in args.users.split(",")) if args.users else DemoConfig().users
    if args.base_bits < 0:
        from lowra.sdk.errors import ConfigError

        raise ConfigError(f"--base-bits must be >= 0 (0 = full-precision base), got {args.base_bits}")
    run_demo(DemoConfig(out=args.out, users=users, steps=args.steps, bits=args.bits, sweep=sweep, base=args.base,
                        base_bits=args.base_bits or None, weighted=not args.unweighted))
    return 0


COMMANDS = {
    "train": cmd_train,
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "merge": cmd_merge,
    "generate": cmd_generate,
    "demo": cmd_demo,
    "quantize-base": cmd_quantize_base,
}


def _quiet_third_party_logs() -> None:
    """torchao (imported by transformers) warns about CUDA libraries a CPU machine cannot load, and torch's
    pytree warns about torchao's enums: harmless, and confusing on every command. The CLI silences them."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    from lowra.device_runtime.errors import LowraError

    _quiet_third_party_logs()

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (LowraError, FileExistsError, FileNotFoundError) as exc:
        print(f"lowra {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

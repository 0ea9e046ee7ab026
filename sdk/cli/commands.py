"""What each ``lowra`` subcommand does once its arguments are parsed (``COMMANDS`` maps names to functions).

Each command imports what it needs inside its function: ``lowra inspect`` reads a blob with the numpy-only
device runtime, and importing this module (as ``lowra --help`` does through :mod:`lowra.sdk.cli.main`) must not
pull in torch. Commands return the process exit status; refusals are raised as ``LowraError`` and reported by
:func:`lowra.sdk.cli.main.main`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowra.sdk.cli.configs import compress_config, lora_config
from lowra.sdk.cli.fleet import cmd_fleet
from lowra.sdk.cli.inspect_blob import cmd_inspect
from lowra.sdk.cli.keys import (
    cmd_keys,
    cmd_sign,
    refuse_claims_without_key,
    signature_claims,
)


def _load_base(args: argparse.Namespace, before_quantized: Callable[[Any], None] | None = None):
    """The torch base of --base, turned into the --quantized-base file's low-bit base when one is given.

    ``before_quantized(base)`` sees the full-precision base before the low-bit layers replace its linears."""
    from lowra.sdk.base_model import load_base

    base = load_base(args.base)
    if before_quantized is not None:
        before_quantized(base)
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


def cmd_train(args: argparse.Namespace) -> int:
    from lowra.sdk.adapters.peft_io import save_adapter
    from lowra.sdk.training.config import TrainConfig
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.train import evaluate_loss, train_adapter

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already exists and is not empty; pass --force to replace it")
    dataset = load_user_dataset(args.user)
    lora = lora_config(args)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, max_len=args.max_len, seed=args.seed
    )
    if args.loftq and not args.quantized_base:
        from lowra.sdk.errors import ConfigError

        raise ConfigError("--loftq starts the adapter on a low-bit base's quantization residual; it needs "
                          "--quantized-base FILE (and the --base it was quantized from)")
    fp_weights: dict[str, Any] = {}

    def keep_fp_weights(fp_base: Any) -> None:
        from lowra.sdk.modules import linear_module_names

        fp_weights.update({n: fp_base.model.get_submodule(n).weight.detach().clone()
                           for n in linear_module_names(fp_base.model)})

    base = _load_base(args, keep_fp_weights if args.loftq else None)
    base_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, config.max_len)
    if args.loftq:
        import torch

        from lowra.sdk.adapters.loftq import residual_init
        from lowra.sdk.adapters.model import inject_lora

        torch.manual_seed(config.seed)
        inject_lora(base.model, lora, "default")
        norms = residual_init(base.model, fp_weights, lora, "default")
        before = sum(b for b, _ in norms.values()) / len(norms)
        after = sum(a for _, a in norms.values()) / len(norms)
        print(f"loftq init: relative residual of the base {before:.4f} -> {after:.4f} (mean over {len(norms)} layers)")
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
    from lowra.sdk.adapters.peft_io import load_adapter
    from lowra.sdk.workflow import base_dir_fingerprint, compress_factors

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    signer = _signer(args)  # a bad key or claim is refused before minutes of compression
    adapter = load_adapter(args.adapter)
    config = compress_config(args)
    base_dir = _runtime_base(args)
    adapter_id = args.id or Path(args.adapter).resolve().name
    card: dict[str, object] = {"task": "", "adapter_folder": str(args.adapter)}
    compressed = compress_factors(
        adapter.factors, adapter.lora, config, adapter_id=adapter_id,
        base_fingerprint=base_dir_fingerprint(base_dir, list(adapter.factors)),
        input_stats=adapter.input_stats, card=card, progress=True,
    )
    if args.user:
        from lowra.sdk.adapters.model import set_active_adapters, set_adapter_factors
        from lowra.sdk.cli.report import retained_gain
        from lowra.sdk.training.data import load_user_dataset
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
        retained = retained_gain(losses["base"], losses["fp_adapter"], losses["compressed"])
        card.update(task=dataset.card.get("task", ""), heldout_loss=losses, retained_gain=retained,
                    data={"user": dataset.user_id, "n_train": len(dataset.train), "n_heldout": len(dataset.heldout)})
        compressed = compressed.with_card(card)
        print(
            f"held-out loss: base {losses['base']:.4f} | fp adapter {losses['fp_adapter']:.4f} | "
            f"compressed {losses['compressed']:.4f} | retained gain {100 * retained:.1f}%"
        )
    r = compressed.report
    if signer is None:
        compressed.write(out, overwrite=args.force)
        print(
            f"wrote {out}: {r['file_bytes']} bytes, {r['effective_bits']:.3f} effective bits/param "
            f"({r['code_bits']:.3f} code bits), widths {r['width_histogram']}"
        )
        return 0
    from lowra.device_runtime._files import atomic_write_bytes
    from lowra.sdk.signing import adapter_base_content, sign_bytes

    key, claims = signer
    if args.quantized_base:  # the same claim `lowra sign --quantized-base` records
        claims["base_content"] = adapter_base_content(compressed.blob_bytes, args.quantized_base)
    data = sign_bytes(compressed.blob_bytes, key, **claims)
    atomic_write_bytes(out, data, overwrite=args.force)
    print(
        f"wrote {out}: {len(data)} bytes signed ({r['file_bytes']} of them the blob), "
        f"{8.0 * len(data) / r['n_params']:.3f} effective bits/param with the signature "
        f"({r['effective_bits']:.3f} without, {r['code_bits']:.3f} code bits), widths {r['width_histogram']}"
    )
    return 0


def _signer(args: argparse.Namespace) -> tuple[Any, dict[str, Any]] | None:
    """``(private key, claims)`` for ``compress --sign-key``, or None; claim flags without a key are refused."""
    if args.sign_key is None:
        refuse_claims_without_key(args)
        return None
    from lowra.sdk.errors import ConfigError
    from lowra.sdk.signing import load_private_key

    if not args.user_id:
        raise ConfigError("--sign-key needs --user-id: a signed adapter names the user it belongs to")
    return load_private_key(args.sign_key), signature_claims(args)


def _device(args: argparse.Namespace):
    """The device runtime for ``merge`` / ``generate`` under the command's trust flags, and its user loader."""
    from lowra.device_runtime import DeviceRuntime
    from lowra.sdk.signing import read_encryption_key, trusted_keys

    trust = trusted_keys(args.trust).policy() if args.trust else None
    key = read_encryption_key(args.decryption_key) if args.decryption_key else None
    runtime = DeviceRuntime(_runtime_base(args), trust=trust)
    return runtime, lambda blob: runtime.load_user(blob, user_id=args.user_id, decryption_key=key)


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil

    from lowra.device_runtime._files import atomic_dir
    from lowra.device_runtime.formats.container import serialize
    from lowra.sdk.base_model import resolve_base

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    base_dir = resolve_base(args.base)
    runtime, load = _device(args)
    info = load(args.blob)
    with atomic_dir(out, overwrite=args.force) as tmp:
        for item in base_dir.iterdir():
            if item.is_file() and not item.name.startswith("model.safetensors"):
                shutil.copy2(item, tmp / item.name)
        (tmp / "model.safetensors").write_bytes(serialize(runtime.weights(), {"format": "pt"}))
    print(f"merged {info.adapter_id} ({len(info.modules)} modules) in {info.load_ms:.0f} ms; wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lowra.sdk.base_model import load_base
    from lowra.sdk.workflow import generate_reply, load_weights_into

    base = load_base(args.base)
    if args.blob or args.quantized_base:
        # The reply comes from the weights the device runtime decodes (and merges), copied into a plain fp model.
        runtime, load = _device(args)
        names = set(runtime.base.tensors) if args.quantized_base else set()
        if args.blob:
            info = load(args.blob)
            names |= {f"{m}.weight" for m in info.modules}
            print(f"[merged {info.adapter_id} on the device runtime in {info.load_ms:.0f} ms]", file=sys.stderr)
        params = dict(base.model.named_parameters())
        load_weights_into(base.model, {n: runtime.weight(n) for n in sorted(names) if n in params})
    print(generate_reply(base.model, base.tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_quantize_base(args: argparse.Namespace) -> int:
    from lowra.device_runtime.formats.constants import CODEBOOK_FORMAT_TEXT
    from lowra.device_runtime.formats.quantized_base import file_version
    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    calibration = None if args.calibration == "none" else args.calibration
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, calibration=calibration,
                            sensitivity=args.sensitivity, error_feedback=args.error_feedback,
                            codebook_format=args.codebook_format)
    base = load_base(args.base)
    quantized = quantize_model(base.model, config, progress=True, source=str(base.path), tokenizer=base.tokenizer)
    quantized.write(out, overwrite=args.force)
    r, total = quantized.bits_report(), quantized.report["total"]
    rows = sum(r["width_histogram"].values())
    print(
        f"wrote {out}: {r['file_bytes']:,} bytes; {r['effective_bits']:.4f} effective bits/param over "
        f"{r['n_quantized_params']:,} quantized weights ({r['code_bits']:.4f} code bits), dense tensors "
        f"{r['bytes']['dense']:,} bytes (float16)"
    )
    fmt = quantized.codebook_format
    print(f"codebooks: {CODEBOOK_FORMAT_TEXT[fmt]}, format version {file_version(None, fmt)}, "
          f"{r['bytes']['codebooks']:,} bytes")
    print(f"error: MSE / weight variance {total['mse_over_var']:.4f}; fingerprint {quantized.fingerprint}")
    print("rows: " + ", ".join(f"{w}-bit {n} ({100 * n / rows:.1f}%)" for w, n in r["width_histogram"].items()))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    import copy

    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.base.config import RecoveryConfig
    from lowra.sdk.quant.base.recovery import recover_quantized_base
    from lowra.sdk.quant.lowbit_linear import load_quantized_base
    from lowra.sdk.training.eval import heldout_nll

    out, plain_path = Path(args.out), Path(args.quantized_base)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if not plain_path.is_file():
        raise FileNotFoundError(f"--quantized-base {plain_path} does not exist; write it with `lowra quantize-base`")
    config = RecoveryConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, learning_rate=args.lr,
                            batch_size=args.batch_size, length=args.length, sequences=args.sequences,
                            seed=args.seed, source=args.text, bits=args.recovery_bits)
    base = load_base(args.base)
    recovered = recover_quantized_base(base.model, base.tokenizer, plain_path, out, config, overwrite=args.force)
    r, rec = recovered.bits_report(), recovered.recovery
    training = rec.info["training"]
    print(f"wrote {out}: recovery adapter rank {rec.rank} on {len(rec.factors)} layers, {r['recovery_bytes']:,} "
          f"bytes ({r['recovery_bits']:.3f} bits per quantized weight: {r['effective_bits']:.3f} -> "
          f"{r['effective_bits_with_recovery']:.3f} effective bits with the adapter)")
    print(f"KL to the fp base on the distillation text {training['kl_first']:.4f} -> {training['kl_last']:.4f} "
          f"in {training['seconds']:.0f} s; fingerprint {recovered.fingerprint}")
    if args.no_eval:
        return 0
    rows = [("fp base", heldout_nll(base.model, base.tokenizer, args.user))]
    for label, path in (("plain low-bit base", plain_path), ("recovered base", out)):
        model = copy.deepcopy(base.model)
        load_quantized_base(model, path)
        rows.append((label, heldout_nll(model, base.tokenizer, args.user)))
        del model
    print("held-out NLL per answer token (" + ("the users'" if args.user else "the sample users'") + " held-out answers):")
    for label, result in rows:
        print(f"  {label:20s} {result['nll']:.3f}  ({result['nll'] - rows[0][1]['nll']:+.3f} vs fp, "
              f"{result['tokens']} tokens)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowra.sdk.cli.demo import run_demo
    from lowra.sdk.cli.demo_config import DemoConfig
    from lowra.sdk.errors import ConfigError

    sweep = tuple(float(b) for b in args.sweep.split(",") if b.strip()) if args.sweep else ()
    users = tuple(u.strip() for u in args.users.split(",")) if args.users else DemoConfig().users
    if args.base_bits < 0:
        raise ConfigError(f"--base-bits must be >= 0 (0 = full-precision base), got {args.base_bits}")
    run_demo(DemoConfig(out=args.out, users=users, steps=args.steps, bits=args.bits, sweep=sweep, base=args.base,
                        base_bits=args.base_bits or None, base_codebook_format=args.base_codebook_format,
                        weighted=not args.unweighted, force=args.force))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out NLL of what the device computes: the base (fp or --quantized-base) and, with --blob, the user."""
    from lowra.sdk.base_model import load_base
    from lowra.sdk.training.eval import heldout_nll
    from lowra.sdk.workflow import load_weights_into

    base = load_base(args.base)
    runtime, load = _device(args)
    params = dict(base.model.named_parameters())
    # The plain model computes with exactly the runtime's weights: the decoded low-bit base, then the merged user.
    names = set(runtime.base.tensors) if args.quantized_base else set()
    load_weights_into(base.model, {n: runtime.weight(n) for n in sorted(names) if n in params})
    users = args.user or None
    label = "base"
    if args.quantized_base:
        from lowra.device_runtime.formats.quantized_base import read_quantized_base

        label += " (quantized + recovery)" if read_quantized_base(args.quantized_base).recovery else " (quantized)"
    rows = [(label, heldout_nll(base.model, base.tokenizer, users,
                                                                                   max_len=args.max_len))]
    if args.blob:
        info = load(args.blob)
        merged = {f"{m}.weight" for m in info.modules}
        load_weights_into(base.model, {n: runtime.weight(n) for n in sorted(merged) if n in params})
        rows.append((f"base + {info.adapter_id}", heldout_nll(base.model, base.tokenizer, users, max_len=args.max_len)))
    if args.json:
        print(json.dumps({label: result for label, result in rows}, indent=2))
        return 0
    user_ids = list(rows[0][1]["users"])
    print(f"held-out NLL per answer token (nats), max_len {args.max_len}")
    print(f"{'':28s}" + "".join(f"{u[:14]:>15s}" for u in user_ids) + f"{'all':>10s}{'tokens':>9s}")
    for label, result in rows:
        cells = "".join(f"{result['users'][u]['nll']:15.3f}" for u in user_ids)
        print(f"{label[:28]:28s}{cells}{result['nll']:10.3f}{result['tokens']:9d}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "compress": cmd_compress,
    "inspect": cmd_inspect,
    "merge": cmd_merge,
    "generate": cmd_generate,
    "demo": cmd_demo,
    "quantize-base": cmd_quantize_base,
    "recover": cmd_recover,
    "eval": cmd_eval,
    "sign": cmd_sign,
    "keys": cmd_keys,
    "fleet": cmd_fleet,
}


def quiet_third_party_logs() -> None:
    """torchao (imported by transformers) warns about CUDA libraries a CPU machine cannot load, and torch's
    pytree warns about torchao's enums: harmless, and confusing on every command. The CLI silences them."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

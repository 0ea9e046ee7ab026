"""The main job (`lowra demo`): personalize the embedded SmolLM2 for each sample user, end to end.

Per user: train a short LoRA adapter on the frozen base, compress it to the bit budget (every byte counted),
write the blob, load it through the torch-free device runtime (verify, decode, merge at load), check the merged
weights against the sdk's own merge, and generate a reply to a held-out prompt with the device-merged weights.
Then one table on stdout and report.md / report.json / retained_gain.png under the output folder
(:mod:`lowra.sdk.cli.report`).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType

import numpy as np
import torch

from lowra.device_runtime import DeviceRuntime
from lowra.device_runtime._files import atomic_dir
from lowra.sdk.adapters.model import (
    delete_adapter,
    get_adapter_factors,
    lora_layers,
    set_active_adapters,
)
from lowra.sdk.adapters.peft_io import save_adapter
from lowra.sdk.base_model import load_base
from lowra.sdk.cli.demo_config import DemoConfig
from lowra.sdk.cli.report import jsonable, retained_gain, write_report
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.base.cache import cached_quantized_base
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.quant.lowbit_linear import load_quantized_base, lowbit_layers
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import UserDataset, load_user_dataset
from lowra.sdk.training.train import evaluate_loss, train_adapter
from lowra.sdk.workflow import (
    apply_blob,
    compress_factors,
    frozen_weight,
    generate_reply,
    load_weights_into,
    model_fingerprint,
    sdk_merged_weight,
)


class _Phase:
    """One line per long phase: what it does as it starts, its result and seconds as it ends.

    Without it the per-user budget sweep ran for minutes with nothing on the screen. A phase that draws its own
    tqdm bars (training, base quantization; bars go to stderr) prints its start on a line of its own, so a bar
    never overwrites it; the others finish on the line they started. Set ``result`` inside the ``with`` block;
    ``seconds`` is set when it ends.
    """

    def __init__(self, label: str, bars: bool = False) -> None:
        self.label, self.bars = label, bars
        self.result = ""
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> _Phase:
        print(f"   {self.label} ...", end="\n" if self.bars else "", flush=True)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._start
        if exc_type is not None:
            if not self.bars:
                print(flush=True)  # end the started line so the error starts on its own
            return
        lead = f"   {self.label}: " if self.bars else " "
        print(f"{lead}{self.result + ' ' if self.result else ''}({self.seconds:.1f} s)", flush=True)


def check_user_id(user_id: str, source: Path) -> None:
    """Refuse a user id that cannot safely name the user's output folder (``<out>/<id>/``).

    The id comes from a user.json the demo does not control; one like ``../x`` or ``/tmp/x`` would write outside
    ``--out``. Only plain, printable folder names pass.
    """
    if not user_id:
        why = "it is empty"
    elif not user_id.isprintable():
        why = "it contains non-printable characters"
    elif PurePosixPath(user_id).is_absolute() or PureWindowsPath(user_id).anchor:
        why = "it is an absolute path"
    elif "/" in user_id or "\\" in user_id:
        why = "it contains a path separator"
    elif user_id == "." or ".." in user_id:
        why = "it names the current or a parent folder"
    else:
        return
    raise ConfigError(
        f"user id {user_id!r} of {source} cannot name an output folder: {why}; set \"id\" in its user.json to a "
        "plain name such as 'terse_notes'"
    )


def _load_users(paths: tuple[str, ...]) -> list[UserDataset]:
    """Every user's dataset, with ids checked as folder names and unique, before the demo writes anything."""
    datasets: list[UserDataset] = []
    seen: dict[str, Path] = {}
    for path in paths:
        dataset = load_user_dataset(path)
        check_user_id(dataset.user_id, dataset.path)
        if dataset.user_id in seen:
            raise ConfigError(
                f"users {seen[dataset.user_id]} and {dataset.path} share the id {dataset.user_id!r}; each user's "
                "outputs go to <out>/<id>, so ids must be unique"
            )
        seen[dataset.user_id] = dataset.path
        datasets.append(dataset)
    return datasets


def run_demo(config: DemoConfig) -> dict[str, object]:
    datasets = _load_users(config.users)
    out = Path(config.out)
    # Everything is written into a fresh folder that replaces ``out`` at the end in one atomic step: a non-empty
    # ``out`` needs force=True (--force), and a kill at any point leaves the old output or the new one.
    with atomic_dir(out, overwrite=config.force) as work:
        report = _run(config, datasets, out, work)
    print(f"\nreport: {out / 'report.md'}  plot: {out / 'retained_gain.png'}  ({report['seconds']:.0f} s)")
    return report


def _run(config: DemoConfig, datasets: list, out: Path, work: Path) -> dict[str, object]:
    t_start = time.perf_counter()
    print(f"lowra demo: {len(datasets)} user{'s' if len(datasets) != 1 else ''}, base {config.base or 'SmolLM2-135M-Instruct (embedded)'}")
    with _Phase("loading the base (a training copy and a copy for the device-merged weights)"):
        base = load_base(config.base)
        gen = load_base(config.base)  # a second, plain copy that receives the device-merged weights
    train_config = TrainConfig(steps=config.steps)
    fp_base_loss: dict[str, float] = {}
    if config.base_bits is not None:
        # The low-bit base's cost, shown beside each user's base loss: gen is still the full-precision model here.
        with _Phase("held-out loss of the full-precision base (to compare the low-bit base with)") as phase:
            fp_base_loss = {d.user_id: evaluate_loss(gen.model, gen.tokenizer, d.heldout, train_config.max_len)
                            for d in datasets}
            phase.result = ", ".join(f"{u} {v:.3f}" for u, v in fp_base_loss.items())
    base_info = _prepare_base(base, config.base_bits, config.base_codebook_format)
    runtime = DeviceRuntime(base_info["runtime_base"])
    # gen computes with exactly what the device runtime decodes: the low-bit base's weights, then each user's merge
    params = dict(gen.model.named_parameters())
    load_weights_into(gen.model, {n: runtime.weight(n) for n in runtime.base.tensors if n in params})
    rows: list[dict[str, object]] = []
    touched_ever: set[str] = set()
    fingerprint = None
    for dataset in datasets:
        uid = dataset.user_id
        udir = work / uid
        print(f"\n== {uid}: {dataset.card.get('task', '')}")
        with _Phase("held-out loss of the base") as phase:
            base_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
            phase.result = f"{base_loss:.3f}"
            if uid in fp_base_loss:
                phase.result += (f" (full-precision base {fp_base_loss[uid]:.3f}, "
                                 f"{base_loss - fp_base_loss[uid]:+.3f} from {config.base_bits:g}-bit quantization)")
        with _Phase(f"training {train_config.steps} steps", bars=True) as phase:
            result = train_adapter(base.model, base.tokenizer, dataset, config.lora, train_config, adapter_name=uid)
            phase.result = f"last training loss {result.losses[-1]:.3f}" if result.losses else "done"
        with _Phase("held-out loss of the adapter") as phase:
            fp_loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
            phase.result = f"{fp_loss:.3f}"
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
            with _Phase(f"compressing to {bits:g} bits") as phase:
                compressed = compress_factors(
                    factors, config.lora, CompressConfig(bits=bits, weighted=config.weighted),
                    adapter_id=uid, base_fingerprint=fingerprint, input_stats=result.input_stats, card=card,
                )
                phase.result = (f"{compressed.report['effective_bits']:.3f} effective bits, "
                                f"{compressed.report['file_bytes']:,} bytes")
            seconds = phase.seconds
            with _Phase(f"held-out loss at {bits:g} bits") as phase:
                apply_blob(base.model, compressed.blob, "compressed")
                loss = evaluate_loss(base.model, base.tokenizer, dataset.heldout, train_config.max_len)
                delete_adapter(base.model, "compressed")
                retained = retained_gain(base_loss, fp_loss, loss)
                phase.result = f"{loss:.3f}, {100 * retained:.1f}% of the gain kept"
            sweep_rows.append({"bits": compressed.report["effective_bits"], "budget": bits, "loss": loss,
                               "retained": retained, "compress_s": seconds})
            if bits == config.bits:
                main = (compressed, loss, seconds)
        compressed, c_loss, c_seconds = main
        card["heldout_loss"] = {"base": base_loss, "fp_adapter": fp_loss, "compressed": c_loss}
        compressed = compressed.with_card(card)
        blob_path = compressed.write(udir / f"{uid}.lowra", overwrite=True)

        # The device side: verify + decode + merge at load, then check against the sdk's own merge.
        with _Phase("device runtime: verify, decode and merge the blob, compare with the sdk's merge") as phase:
            info = runtime.load_user(blob_path)
            layers = lora_layers(base.model)
            max_diff = max(
                float(np.abs(runtime.weight(f"{m}.weight") - sdk_merged_weight(frozen_weight(layers[m].base), compressed.blob, m).numpy()).max())
                for m in info.modules
            )
            phase.result = f"merged in {info.load_ms:.0f} ms, max |device - sdk| {max_diff:.1e}"
        with _Phase("generating replies (device-merged, then the base)"):
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
            "loss_base_fp": fp_base_loss.get(uid),
            "loss_fp": fp_loss,
            "loss_compressed": c_loss,
            "retained_gain": retained_gain(base_loss, fp_loss, c_loss),
            "peft_fp16_bytes": peft_bytes,
            "blob_bytes": compressed.report["file_bytes"],
            "size_ratio": peft_bytes / compressed.report["file_bytes"],
            "effective_bits": compressed.report["effective_bits"],
            "code_bits": compressed.report["code_bits"],
            "width_histogram": compressed.report["width_histogram"],
            "train_s": result.seconds,
            "compress_s": c_seconds,
            "load_ms": info.load_ms,
            "merge_ms": info.apply_ms,
            "max_abs_diff_device_vs_sdk": max_diff,
            "prompt": prompt,
            "expected": dataset.heldout[0].response,
            "reply_base": base_reply,
            "reply_personalized": reply,
            "sweep": sweep_rows,
            "blob": str(out / uid / blob_path.name),
        }
        rows.append(row)
        print(f"   loss base {base_loss:.3f} -> fp {fp_loss:.3f} -> {compressed.report['effective_bits']:.2f}-bit "
              f"{c_loss:.3f} ({100 * row['retained_gain']:.1f}% of the gain kept); blob {row['blob_bytes']} bytes; "
              f"merged in {info.load_ms:.0f} ms")
        print(f"   prompt: {prompt}\n   base:   {base_reply}\n   user:   {reply}")

    base_info["runtime_base"] = str(base_info["runtime_base"])
    report = {"config": jsonable(asdict(config)), "base": base_info, "users": rows,
              "seconds": time.perf_counter() - t_start}
    table = write_report(work, report)
    print("\n" + table)
    return report


def _prepare_base(base, bits: float | None, codebook_format: str) -> dict[str, object]:
    """Quantize the base in place to ``bits`` effective bits (cached file) and say what it costs."""
    linears = linear_module_names(base.model)
    fp32_bytes = sum(base.model.get_submodule(p).weight.nbytes for p in linears)
    info: dict[str, object] = {"bits": bits, "runtime_base": base.path, "source": str(base.path),
                               "linear_fp32_bytes": fp32_bytes,
                               "n_linears": len(linears)}
    if bits is None:
        print(f"   base: full precision, linears {fp32_bytes / 2**20:.1f} MiB (float32)")
        return info
    with _Phase(f"base at {bits:g} effective bits: quantizing, or reading the cached file", bars=True) as phase:
        config = QuantizeConfig(bits=bits, codebook_format=codebook_format)
        path = cached_quantized_base(base.model, base.path, config, tokenizer=base.tokenizer)
        qb = load_quantized_base(base.model, path)
        phase.result = "done"
    report = qb.bits_report()
    packed = sum(m.nbytes() for m in lowbit_layers(base.model).values())
    info.update(runtime_base=path, file_bytes=report["file_bytes"], effective_bits=report["effective_bits"],
                code_bits=report["code_bits"], width_histogram=report["width_histogram"],
                dense_bytes=report["bytes"]["dense"], linear_packed_bytes=packed,
                mse_over_var=qb.report.get("total", {}).get("mse_over_var"), seconds=phase.seconds)
    print(f"   base: quantized to {report['effective_bits']:.3f} effective bits/param ({path}, "
          f"{report['file_bytes']:,} bytes incl. {report['bytes']['dense']:,} of float16 embeddings/norms); "
          f"linears {packed / 2**20:.1f} MiB packed vs {fp32_bytes / 2**20:.1f} MiB float32 "
          f"({fp32_bytes / packed:.1f}x smaller), {info['seconds']:.0f} s")
    return info

"""ExecuTorch on SmolLM2-135M with its 1.5-bit LowRA base: accuracy, decode speed, user loads, file sizes.

    python bench/bench_executorch.py [--work DIR] [--threads 2] [--tokens 32] [--skip-aten] [--skip-xnnpack-off]

Steps (artifacts cached under --work, default $LOWRA_CACHE/bench_executorch, so a rerun only measures):
1. quantize the embedded SmolLM2 to 1.5 effective bits (sdk.quantize_base), put LowBitLinear layers in;
2. two synthetic users: random rank-8 LoRA factors on every linear (|delta W| ~ 2% of |W| per module),
   compressed to a lowra blob bound to the low-bit base (their quality is not the point: equality is);
3. export custom-op (side + merge programs) and core-ATen fallback (side) folders;
4. logits of each program vs the eager sdk model (base, user 1, user 2; side and merge), 32 greedy tokens;
5. decode tokens/s (one token per call on a filled cache) for each program, eager torch on the low-bit model
   and the fp32 model, all on ``--threads`` threads; user load time side vs merge; file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Give me three tips for writing clear Python code."


def _threads(n: int) -> None:
    os.environ["LOWRA_ET_THREADS"] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--bits", type=float, default=1.5)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--skip-aten", action="store_true")
    parser.add_argument("--only-export", action="store_true")
    parser.add_argument("--xnnpack", action="store_true", help="delegate to XNNPACK (lowering takes ~2.5x longer)")
    parser.add_argument("--embeddings", choices=("auto", "float32", "int8"), default="auto",
                        help="the programs' embedding/head: auto = float16 (the base file's values), float32 = the "
                             "previous layout, int8 = 8-bit rows (each exported to a folder of its own: "
                             "custom-f32emb, custom-int8emb)")
    parser.add_argument("--kernel-library", default=None,
                        help="run the custom-op programs with this kernel library instead of the folder's (e.g. a "
                             "rebuilt one: python -m lowra.export.executorch.kernels)")
    args = parser.parse_args()
    _threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from lowra.device_runtime import formats as fmt
    from lowra.device_runtime.engines.executorch import ExecutorchEngine
    from lowra.device_runtime.engines.generation import GenerationConfig
    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.export.executorch import ExecutorchExportConfig, export_executorch
    from lowra.device_runtime._files import cache_dir
    from lowra.sdk.base_model import load_base
    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.adapters.model import set_active_adapters
    from lowra.sdk.quant.lowbit_linear import load_quantized_base
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.workflow import apply_blob, compress_factors, model_fingerprint

    work = Path(args.work) if args.work else cache_dir() / "bench_executorch"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"threads": args.threads, "bits": args.bits}
    t = time.perf_counter()
    loaded = load_base()
    fp32_model = loaded.model
    base_file = work / f"smollm2-{args.bits}bit.safetensors"
    if not base_file.is_file():
        quantize_model(fp32_model, QuantizeConfig(bits=args.bits, calibration=None), progress=False).write(base_file, overwrite=True)
    qbase = read_quantized_base(base_file)
    report["quantized_base_file_bytes"] = base_file.stat().st_size
    model = load_base().model
    load_quantized_base(model, qbase)  # the base file's model: low-bit linears and its float16 dense tensors
    names = linear_module_names(model)
    print(f"base ready in {time.perf_counter() - t:.1f}s ({len(names)} low-bit linears)", flush=True)

    # ---- users
    fingerprint = model_fingerprint(model, names)
    lora = LoraConfig(rank=8, alpha=16.0)
    blobs = []
    for seed in (1, 2):
        path = work / f"user{seed}.lowra"
        if not path.is_file():
            g = torch.Generator().manual_seed(seed)
            factors = {}
            for name in names:
                weight = model.get_submodule(name).dequantize()
                a = torch.randn(lora.rank, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
                b = torch.randn(weight.shape[0], lora.rank, generator=g)
                # |scaling * B A| ~ 2% of |W|: a personalization-sized change that moves the logits visibly.
                b *= 0.02 * weight.norm() / (lora.scaling * (b @ a).norm())
                factors[name] = (a, b)
            adapter = compress_factors(factors, lora, CompressConfig(bits=1.5, weighted=False),
                                       adapter_id=f"user{seed}", base_fingerprint=fingerprint)
            adapter.write(path, overwrite=True)
        blobs.append(path)
    print(f"users: {[p.stat().st_size for p in blobs]} bytes", flush=True)

    # ---- exports
    suffix = ("-xnnpack" if args.xnnpack else "") + {"float32": "-f32emb", "int8": "-int8emb"}.get(args.embeddings, "")
    folders = {"custom": work / f"custom{suffix}", "aten": work / f"aten{suffix}"}
    variants = [("custom", ("side", "merge"))] + ([] if args.skip_aten else [("aten", ("side",))])
    for ops, modes in variants:
        folder = folders[ops]
        if not (folder / "manifest.json").is_file():
            t = time.perf_counter()
            config = ExecutorchExportConfig(ops=ops, modes=modes, max_seq_len=args.max_seq_len, xnnpack=args.xnnpack,
                                            embeddings=args.embeddings if ops == "custom" else "auto")
            export_executorch(model, folder, config,
                              tokenizer=loaded.path / "tokenizer.json", source="smollm2-135m-instruct")
            report[f"export_s_{ops}"] = round(time.perf_counter() - t, 1)
            print(f"export {ops}: {report[f'export_s_{ops}']}s", flush=True)
    if args.only_export:
        return 0

    # ---- sizes
    sizes = {}
    for ops, folder in folders.items():
        if not (folder / "manifest.json").is_file():
            continue
        manifest = json.loads((folder / "manifest.json").read_text())
        for mode, prog in manifest["programs"].items():
            sizes[f"{ops}/{mode}"] = {"pte": prog["program_bytes"], "ptd": prog["data_bytes"]}
        sizes["packed_base_bytes"] = manifest["packed_base_bytes"]
    report["sizes"] = sizes
    report["blob_bytes"] = [p.stat().st_size for p in blobs]

    def library(ops: str) -> str | None:
        return args.kernel_library if ops == "custom" else None

    # ---- accuracy: logits vs eager, greedy tokens
    tokenizer = loaded.tokenizer
    ids = np.asarray(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def eager_logits(m: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return m(torch.from_numpy(ids)[None]).logits[0].numpy()

    def eager_greedy(m: torch.nn.Module, n: int) -> list[int]:
        with torch.no_grad():
            out = m.generate(torch.from_numpy(ids)[None], max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=tokenizer.eos_token_id)
        return out[0, ids.size:].tolist()

    references = {"base": (eager_logits(model), eager_greedy(model, args.tokens))}
    for i, path in enumerate(blobs, 1):
        apply_blob(model, fmt.read_blob(path), f"user{i}")
        references[f"user{i}"] = (eager_logits(model), eager_greedy(model, args.tokens))
    set_active_adapters(model, None)
    accuracy = {}
    no_eos = GenerationConfig(max_new_tokens=args.tokens)
    for ops, modes in variants:
        for mode in modes:
            engine = ExecutorchEngine(folders[ops], mode=mode, kernel_library=library(ops))
            for who, (ref_logits, ref_tokens) in references.items():
                if who == "base":
                    engine.unload_user()
                else:
                    engine.load_user(blobs[int(who[-1]) - 1], mode=mode)
                diff = float(np.abs(engine.logits(ids) - ref_logits).max())
                tokens = engine.generate_ids(ids, no_eos)
                accuracy[f"{ops}/{mode}/{who}"] = {"max_abs_logit_diff": diff, "greedy_equal": tokens == ref_tokens,
                                                    "n_tokens": len(tokens)}
                print(f"{ops}/{mode}/{who}: max|dlogit|={diff:.2e} greedy {args.tokens} equal={tokens == ref_tokens}",
                      flush=True)
            engine.close()
    report["accuracy"] = accuracy

    # ---- decode speed (fill the cache with the prompt, then time one-token steps)
    def et_decode_rate(folder: Path, mode: str, ops: str, blob: Path | None = None) -> float:
        engine = ExecutorchEngine(folder, mode=mode, kernel_library=library(ops))
        if blob is not None:
            engine.load_user(blob, mode=mode)
        engine.logits(ids)
        pos, token, steps = ids.size, int(ids[-1]), args.tokens
        t0 = time.perf_counter()
        for k in range(steps):
            engine._run(np.array([token]), pos + k)
        rate = steps / (time.perf_counter() - t0)
        engine.close()
        return rate

    def eager_rate(m: torch.nn.Module) -> float:
        with torch.no_grad():
            m.generate(torch.from_numpy(ids)[None], max_new_tokens=2, do_sample=False, pad_token_id=0)
            t0 = time.perf_counter()
            m.generate(torch.from_numpy(ids)[None], max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                       do_sample=False, pad_token_id=0)
            return args.tokens / (time.perf_counter() - t0)  # includes one prefill: a slight underestimate

    speed = {}
    for ops, modes in variants:
        for mode in modes:
            speed[f"executorch {ops}/{mode}"] = et_decode_rate(folders[ops], mode, ops)
    # With a user's adapter vs without, side branch, alternating (the target: >= 0.9x).
    with_user = {"base": [], "user1": []}
    for _ in range(3):
        with_user["base"].append(et_decode_rate(folders["custom"], "side", "custom"))
        with_user["user1"].append(et_decode_rate(folders["custom"], "side", "custom", blobs[0]))
    report["decode_side_with_user"] = {k: float(np.median(v)) for k, v in with_user.items()}
    print(f"decode side, median of 3 alternating: base {report['decode_side_with_user']['base']:.2f} tok/s, with "
          f"user1 {report['decode_side_with_user']['user1']:.2f} "
          f"({report['decode_side_with_user']['user1'] / report['decode_side_with_user']['base']:.2f}x)", flush=True)
    speed["eager torch low-bit (lowra::lowbit_linear reference)"] = eager_rate(model)
    speed["eager torch fp32"] = eager_rate(fp32_model)
    report["decode_tokens_per_s"] = speed
    for k, v in speed.items():
        print(f"decode {k}: {v:.2f} tok/s", flush=True)

    # ---- user load time
    loads = {}
    engine = ExecutorchEngine(folders["custom"], mode="side", kernel_library=library("custom"))
    for mode in ("side", "merge"):
        times = []
        for rep in range(3):
            for path in blobs:
                times.append(engine.load_user(path, mode=mode).load_ms)
        loads[mode] = {"median_ms": float(np.median(times)), "compose_ms": engine.user.apply_ms}
        print(f"load user ({mode}): median {loads[mode]['median_ms']:.0f} ms", flush=True)
    # Merge at load against a plain copy of the weights it touches (the target: <= 1.5x).
    merge_info = json.loads((folders["custom"] / "manifest.json").read_text())["programs"]["merge"]
    template = np.memmap(folders["custom"] / merge_info["data"], dtype=np.uint8, mode="r")
    copies = []
    for _ in range(3):
        t0 = time.perf_counter()
        for entry in merge_info["tensors"].values():
            np.array(template[entry["offset"]: entry["offset"] + entry["nbytes"]])
        copies.append((time.perf_counter() - t0) * 1e3)
    loads["merge_copy_ms"] = float(np.median(copies))
    print(f"copy of the merged weights: {loads['merge_copy_ms']:.0f} ms; merge load / copy = "
          f"{loads['merge']['median_ms'] / loads['merge_copy_ms']:.2f}x", flush=True)
    engine.close()
    report["user_load"] = loads
    out = work / "report.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

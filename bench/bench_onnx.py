"""ONNX export of SmolLM2-135M with its LowRA 1.5-bit base, run by ONNX Runtime on 2 threads.

Measures, side by side in one run:
  correctness   max |logits ONNX - logits eager sdk LowBitLinear model| for the base and two users (adapter and
                merge modes), and whether 32 greedy tokens equal eager's (teacher-forced check)
  sizes         model.onnx + weights.bin against the packed payload (the lowra quantized base file)
  decode        tokens/s of single-token decode steps (KV cache) on `--threads` threads: the low-bit graph with
                its decode folded at session creation ("load") or run every step ("per_run"), the fp32 ONNX of
                the same (dequantized) model, and -- on a uniform 2/4-bit base with absmax-64 groups, where the
                codebooks are affine -- LowBitLinear local functions against com.microsoft::MatMulNBits
  users         switch time (load_user) and decode tokens/s for mode "side" (.onnx_adapter) and "merge"
  memory        peak RSS of a process that creates the session (and loads a user), per variant

Every engine measurement runs in a fresh subprocess (clean RSS). Users are random blobs (rank 8 on q/k/v/o of
every layer, levels ~N(0, 0.02)) bound to the quantized base: enough to check the arithmetic, not a trained user.
Usage: python bench/bench_onnx.py [--threads 2] [--out out/bench/onnx] [--skip nbits,fp32,per_run]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NEW_TOKENS = 32
PROMPT = "What is the capital of France? Answer in one sentence."


def rss_mib(field: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) MiB of this process. (ru_maxrss survives exec on Linux, so a
    worker would report its parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ worker
def worker(spec: dict) -> dict:
    """Runs in its own process: engine creation, optional user, timed decode steps."""
    from lowra.device_runtime.engines.generation import GenerationConfig, generate
    from lowra.device_runtime.engines.onnx import OnnxEngine

    t0 = time.perf_counter()
    engine = OnnxEngine(spec["dir"], threads=spec["threads"], lowbit_decode=spec.get("decode", "load"))
    out = {"session_s": time.perf_counter() - t0, "rss_after_session_mib": rss_mib(),
           "peak_rss_after_session_mib": rss_mib("VmHWM")}
    if spec.get("user"):
        switches = []
        for path in spec["user"]:  # alternate users: every load is a real switch
            switches.append(engine.load_user(path, mode=spec["mode"]).load_ms)
        out["switch_ms"] = switches
    ids = engine.tokenizer.encode(engine.tokenizer.chat_prompt(PROMPT))
    steps: list[float] = []
    decode = engine.decode

    def timed(token: int, position: int) -> np.ndarray:
        t = time.perf_counter()
        result = decode(token, position)
        steps.append(time.perf_counter() - t)
        return result

    t = time.perf_counter()
    engine.prefill(ids)
    out["prefill_s"] = time.perf_counter() - t
    # no end-of-sequence stop: every variant times the same number of steps
    tokens = generate(engine.prefill, timed, ids, GenerationConfig(max_new_tokens=NEW_TOKENS), frozenset(),
                      engine.max_positions)
    out["tokens"] = tokens
    out["decode_steps"] = len(steps)
    out["decode_tok_s"] = len(steps) / sum(steps) if steps else 0.0
    out["decode_ms_median"] = 1e3 * float(np.median(steps)) if steps else 0.0
    out["rss_end_mib"] = rss_mib()
    out["peak_rss_mib"] = rss_mib("VmHWM")
    return out


def interleaved(dirs: dict[str, dict], threads: int, rounds: int, steps: int) -> dict:
    """Decode ms/step of several engines measured round-robin in one process, so a machine whose load changes
    during the run (other jobs on the 2 cores) slows every variant alike: the ratios are the result."""
    from lowra.device_runtime.engines.onnx import OnnxEngine

    engines = {}
    for name, spec in dirs.items():
        engine = OnnxEngine(spec["dir"], threads=threads)
        if spec.get("user"):
            engine.load_user(spec["user"], mode=spec["mode"])
        engines[name] = engine
    ids = next(iter(engines.values())).tokenizer.encode(next(iter(engines.values())).tokenizer.chat_prompt(PROMPT))
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            engine.prefill(ids)
            token = 42
            for i in range(steps):
                t = time.perf_counter()
                engine.decode(token, ids.size + i)
                times[name].append(time.perf_counter() - t)
    return {name: {"decode_ms_median": 1e3 * float(np.median(t)), "decode_tok_s": 1.0 / float(np.median(t))}
            for name, t in times.items()}


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def random_blob(model, modules: list[str], seed: int, rank: int = 8) -> bytes:
    from lowra.device_runtime import formats as fmt
    from lowra.sdk.workflow import model_fingerprint

    rng = np.random.default_rng(seed)
    entries = [fmt.ModuleEntry(m, model.get_submodule(m).out_features, model.get_submodule(m).in_features, rank)
               for m in modules]
    widths, codes, levels = [], [], []
    for e in entries:
        for length in (e.in_features, e.out_features):
            for k in range(rank):
                w = (4, 2, 2, 1)[k % 4]
                widths.append(w)
                codes.append(rng.integers(0, 1 << w, length).astype(np.uint8))
                levels.append(np.sort(rng.standard_normal(1 << w) * 0.1).astype(np.float16))
    meta = {"adapter_id": f"bench-user-{seed}", "base_fingerprint": model_fingerprint(model, modules),
            "lora": {"rank": rank, "alpha": rank, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "scaling": 1.0},
            "scheme": {"method": "random (bench)"}, "created": "2026-01-01T00:00:00+00:00", "card": {}}
    return fmt.build_blob_bytes(entries, np.array(widths, np.uint8), codes, levels, meta)


def interleave_phase(out: Path, threads: int) -> dict:
    dirs = {"lowbit_fold_at_load": {"dir": str(out / "smollm2-lowbit")},
            "lowbit_side_user": {"dir": str(out / "smollm2-lowbit"), "user": str(out / "bench-user-1.lowra"),
                                    "mode": "side"},
            "lowbit_merge_user": {"dir": str(out / "smollm2-lowbit"), "user": str(out / "bench-user-1.lowra"),
                                  "mode": "merge"}}
    for name in ("smollm2-fp32", "smollm2-uniform4-function", "smollm2-uniform4-matmulnbits",
                 "smollm2-uniform4-matmulnbits_int8"):
        if (out / name).is_dir():
            dirs[name.removeprefix("smollm2-")] = {"dir": str(out / name)}
    result = interleaved(dirs, threads, rounds=4, steps=8)
    result["load_average"] = list(os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench/onnx")
    parser.add_argument("--skip", default="", help="comma list of: nbits, fp32, per_run, users")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--interleave-only", action="store_true",
                        help="only the round-robin decode comparison, on the model dirs a full run left in --out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    if args.interleave_only:
        print(json.dumps(interleave_phase(out, args.threads), indent=1))
        return

    import torch

    torch.set_num_threads(args.threads)
    from lowra.device_runtime import formats as fmt
    from lowra.device_runtime.engines.generation import GenerationConfig
    from lowra.device_runtime.engines.onnx import OnnxEngine
    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.export.onnx import OnnxExportConfig, export_onnx, size_report
    from lowra.sdk.base_model import load_base
    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.lowbit_linear import replace_linears
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.baselines import uniform_quantize
    from lowra.sdk.workflow import apply_blob

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads, "load_average_at_start": os.getloadavg()}
    base = load_base()
    qpath = out / "base-1.5bit.lowra-base"
    if not qpath.is_file():
        t = time.perf_counter()
        quantize_model(base.model, QuantizeConfig(bits=1.5, calibration=None), progress=False).write(qpath)
        results["quantize_s"] = time.perf_counter() - t
    qbase = read_quantized_base(qpath)
    layers = dict(qbase.layers)

    t = time.perf_counter()
    lowbit_dir = out / "smollm2-lowbit"
    export_onnx(base.model, layers, base.tokenizer, lowbit_dir, overwrite=True)
    results["export_s"] = time.perf_counter() - t
    results["sizes"] = size_report(lowbit_dir, qbase.file_bytes)
    results["quantized_base_bits"] = {k: qbase.bits_report()[k] for k in ("effective_bits", "file_bytes")}

    # eager reference: the sdk LowBitLinear model with dense tensors rounded to float16 as exported
    ref = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.endswith("_proj.weight"):
                p.copy_(p.half().float())
    replace_linears(ref, layers)
    ids = base.tokenizer(base.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                            add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ids = np.array(ids, dtype=np.int64)

    def eager(model, seq):
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]).logits[0].numpy()

    attn = [m for m in linear_module_names(ref) if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    users = []
    for seed in (1, 2):
        path = out / f"bench-user-{seed}.lowra"
        path.write_bytes(random_blob(ref, attn, seed))
        adapted = copy.deepcopy(ref)
        apply_blob(adapted, fmt.read_blob(path), "user")
        users.append((path, adapted))

    engine = OnnxEngine(lowbit_dir, threads=args.threads)
    base_logits = eager(ref, ids)
    correctness = {"base": float(np.abs(engine.logits(ids) - base_logits).max())}
    got = engine.generate_ids(ids, GenerationConfig(max_new_tokens=NEW_TOKENS))
    teacher = np.argmax(eager(ref, np.concatenate([ids, np.array(got, dtype=np.int64)]))[ids.size - 1:], -1)
    correctness["greedy_tokens"] = len(got)
    correctness["greedy_equal_eager"] = teacher[: len(got)].tolist() == got
    correctness["greedy_text"] = base.tokenizer.decode(got)
    for i, (path, adapted) in enumerate(users, 1):
        expected = eager(adapted, ids)
        correctness[f"user{i}_vs_base"] = float(np.abs(expected - base_logits).max())
        for mode in ("side", "merge"):
            engine.load_user(path, mode=mode)
            correctness[f"user{i}_{mode}"] = float(np.abs(engine.logits(ids) - expected).max())
            if i == 2:
                got = engine.generate_ids(ids, GenerationConfig(max_new_tokens=NEW_TOKENS))
                teacher = np.argmax(eager(adapted, np.concatenate([ids, np.array(got, dtype=np.int64)]))[ids.size - 1:], -1)
                correctness[f"user2_{mode}_greedy_equal_eager"] = teacher[: len(got)].tolist() == got
        engine.unload_user()
    engine.close()
    del engine
    results["correctness"] = correctness
    print(json.dumps(correctness, indent=1), flush=True)
    del ref, users

    runs: dict = {}
    spec = {"dir": str(lowbit_dir), "threads": args.threads}
    runs["lowbit_function_fold_at_load"] = run_worker({**spec, "decode": "load"})
    print("lowbit load", runs["lowbit_function_fold_at_load"]["decode_tok_s"], flush=True)
    if "per_run" not in skip:
        runs["lowbit_function_decode_per_run"] = run_worker({**spec, "decode": "per_run"})
    if "users" not in skip:
        paths = [str(out / "bench-user-1.lowra"), str(out / "bench-user-2.lowra")] * 2
        for mode in ("side", "merge"):
            runs[f"user_{mode}"] = run_worker({**spec, "decode": "load", "user": paths, "mode": mode})
    if "fp32" not in skip:
        dense = copy.deepcopy(base.model)
        with torch.no_grad():
            for name, qw in layers.items():
                dense.get_submodule(name).weight.copy_(torch.from_numpy(qw.dequantize()))
        fp32_dir = out / "smollm2-fp32"
        export_onnx(dense, {}, base.tokenizer, fp32_dir, OnnxExportConfig(dense_dtype="float32"), overwrite=True)
        results["sizes_fp32"] = size_report(fp32_dir)
        del dense
        runs["fp32_onnx"] = run_worker({"dir": str(fp32_dir), "threads": args.threads})
    if "nbits" not in skip:
        for bits in (4, 2):
            uniform = {n: uniform_quantize(base.model.get_submodule(n).weight, bits, 64) for n in layers}
            for kind in ("function", "matmulnbits", "matmulnbits_int8"):
                d = out / f"smollm2-uniform{bits}-{kind}"
                config = OnnxExportConfig(matmulnbits="never" if kind == "function" else "affine",
                                          matmulnbits_accuracy_level=4 if kind.endswith("int8") else 0)
                manifest = export_onnx(base.model, uniform, base.tokenizer, d, config, overwrite=True)
                results[f"sizes_uniform{bits}_{kind}"] = {**size_report(d), **manifest["counts"]}
                for decode in ("load",):  # per-run decode is measured on the LowRA base above
                    runs[f"uniform{bits}_{kind}_{decode}"] = run_worker({"dir": str(d), "threads": args.threads, "decode": decode})
                    print(bits, kind, decode, runs[f"uniform{bits}_{kind}_{decode}"]["decode_tok_s"], flush=True)
            # the two must agree: exact decode vs (code - zero) * scale
            a = OnnxEngine(out / f"smollm2-uniform{bits}-function", threads=args.threads).logits(ids)
            for kind in ("matmulnbits", "matmulnbits_int8"):
                b = OnnxEngine(out / f"smollm2-uniform{bits}-{kind}", threads=args.threads).logits(ids)
                results[f"uniform{bits}_{kind}_vs_function_max_abs_logit_diff"] = float(np.abs(a - b).max())
    for r in runs.values():
        r.pop("tokens", None)
    results["runs"] = runs
    results["interleaved"] = interleave_phase(out, args.threads)
    results["load_average_at_end"] = os.getloadavg()
    if "keep" not in skip:
        for d in out.glob("smollm2-*"):  # the comparison models are 0.1-0.5 GB each; keep the LowRA one
            if d.name != "smollm2-lowbit":
                shutil.rmtree(d)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

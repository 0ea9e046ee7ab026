"""Frozen-base memory and LoRA step time on SmolLM2: fp32 linears vs LowBitLinear (packed, decoded per call).

Three processes, because peak RSS only grows within a process:
1. ``quantize``: ``quantize_model`` (LowRA, ``--bits`` effective bits) once, written as a quantized-base file
   (cached under ``--cache``), so the measured low-bit process never runs the quantizer.
2. ``fp`` and 3. ``lowbit``: load SmolLM2 (the low-bit one then swaps its linears for the file's layers), copy
   every remaining tensor into private memory (the fp32 checkpoint is memory-mapped and would otherwise enter RSS
   only when first touched), hand freed memory back to the OS, then train LoRA for ``--steps`` timed steps
   (plus one warm-up) on fixed random batches. RSS is sampled every 2 ms during training.

    python bench/bench_lowbit_training.py                     # all three, then the side-by-side summary
    python bench/bench_lowbit_training.py --threads 1         # steadier when other jobs share the 2 cores
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def quantize(cache: Path, bits: float) -> dict:
    import torch

    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.base.apply import quantize_model

    torch.set_num_threads(2)
    if cache.is_file():
        return {"variant": "quantize", "cached": str(cache)}
    model = load_base().model
    t0 = time.perf_counter()
    qb = quantize_model(model, QuantizeConfig(bits=bits, calibration=None), progress=False)
    seconds = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    qb.write(cache)
    report = qb.bits_report()
    return {"variant": "quantize", "seconds": round(seconds, 1), "effective_bits": round(report["effective_bits"], 4),
            "width_histogram": report["width_histogram"]}


def train(variant: str, cache: Path, steps: int, rank: int, batch: int, seq: int, threads: int) -> dict:
    import psutil
    import torch

    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.base_model import load_base
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.adapters.model import adapter_parameters, inject_lora
    from lowra.sdk.quant.lowbit_linear import lowbit_layers, replace_linears

    torch.set_num_threads(threads)
    proc = psutil.Process()
    model = load_base().model
    paths = linear_module_names(model)
    result: dict = {"variant": variant, "linears": len(paths), "threads": threads}
    result["linear_fp32_bytes"] = sum(model.get_submodule(p).weight.nbytes for p in paths)
    if variant == "lowbit":
        layers = read_quantized_base(cache).layers
        replace_linears(model, {p: layers[p] for p in paths})
        del layers
        lowbit = lowbit_layers(model)
        result["linear_packed_bytes_in_ram"] = sum(m.nbytes() for m in lowbit.values())
        result["linear_offset_bytes_in_ram"] = sum(
            m.row_code_offsets.nbytes + m.row_level_offsets.nbytes for m in lowbit.values()
        )
        result["mean_code_bits"] = round(
            sum(float(m.widths.double().sum()) * m.in_features for m in lowbit.values())
            / sum(m.in_features * m.out_features for m in lowbit.values()), 4,
        )  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for layer in lowbit.values():
                layer.dequantize()
        result["dequantize_all_linears_s"] = round(time.perf_counter() - t0, 3)
        result["dequantize_all_linears_cpu_s"] = round(time.process_time() - c0, 3)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()  # private memory: the mmapped checkpoint pages count from here on
    result["model_tensor_bytes"] = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    inject_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank))
    params = adapter_parameters(model, "default")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen) for _ in range(steps + 1)]
    model.train()
    _trim()
    result["rss_before_training_mb"] = round(proc.memory_info().rss / 2**20, 1)

    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, cpu_times, losses = [], [], []
    for ids in batches:  # the first step is a warm-up and not counted
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(round(float(loss), 3))
    stop.set()
    sampler.join()
    result["step_s"] = [round(t, 2) for t in times[1:]]
    result["mean_step_s"] = round(sum(times[1:]) / steps, 2)
    # CPU seconds of the whole process (all threads): less sensitive than wall time to other jobs on the box.
    result["mean_step_cpu_s"] = round(sum(cpu_times[1:]) / steps, 2)
    result["losses"] = losses
    result["peak_rss_training_mb"] = round(peak[0] / 2**20, 1)
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["quantize", "fp", "lowbit"])
    parser.add_argument("--bits", type=float, default=1.5, help="effective bits per parameter of the low-bit base")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lowra_bench"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    cache_file = args.cache / f"smollm2_base_{args.bits:g}bit.safetensors"
    if args.variant == "quantize":
        result = quantize(cache_file, args.bits)
    elif args.variant:
        result = train(args.variant, cache_file, args.steps, args.rank, args.batch, args.seq, args.threads)
    if args.variant:
        print("RESULT " + json.dumps(result))
        return
    rows = {}
    for variant in ("quantize", "fp", "lowbit"):
        cmd = [sys.executable, __file__, "--variant", variant, "--bits", str(args.bits), "--cache", str(args.cache),
               "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(rows[variant]))
    fp, lb = rows["fp"], rows["lowbit"]
    mib = 2**20
    print(
        f"\nSmolLM2 base linears ({fp['linears']}, {args.bits:g} effective bits, mean code bits "
        f"{lb['mean_code_bits']}): fp32 {fp['linear_fp32_bytes'] / mib:.1f} MiB -> packed in RAM "
        f"{lb['linear_packed_bytes_in_ram'] / mib:.1f} MiB "
        f"({fp['linear_fp32_bytes'] / lb['linear_packed_bytes_in_ram']:.1f}x smaller)"
    )
    print(f"whole model tensors {fp['model_tensor_bytes'] / mib:.1f} -> {lb['model_tensor_bytes'] / mib:.1f} MiB")
    print(
        f"LoRA r={args.rank} all-linear, batch {args.batch}x{args.seq}, {args.threads} thread(s): "
        f"{fp['mean_step_s']} s/step (fp) vs {lb['mean_step_s']} s/step (low-bit), "
        f"x{lb['mean_step_s'] / fp['mean_step_s']:.2f}; CPU {fp['mean_step_cpu_s']} vs {lb['mean_step_cpu_s']} s/step"
    )
    print(
        f"RSS before training {fp['rss_before_training_mb']} vs {lb['rss_before_training_mb']} MiB; "
        f"peak during training {fp['peak_rss_training_mb']} vs {lb['peak_rss_training_mb']} MiB "
        f"(load average {fp['load_avg_1m']} / {lb['load_avg_1m']})"
    )

if __name__ == "__main__":
    main()

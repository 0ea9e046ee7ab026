"""Batched multi-user training vs one user at a time: step time and users/hour, side by side in one run.

For each K: K users trained one after another with ``train_adapter`` (what ``lowra train`` does today) vs the same
K users in one ``train_users`` call (one frozen base, grouped LoRA matmuls). Users are the sample users repeated
(``json_reply-0``, ``python_help-1``, ...), each with its own seed. One untimed warm-up run of each kind comes
first. Wall time only: on a shared machine the numbers move with the other jobs, so the load average is printed
with them; compare the ratio, which is measured within one run.

    python bench/bench_fleet_batched.py --model tiny                     # the tests' 2-layer model, seconds
    python bench/bench_fleet_batched.py --model smollm2 --ks 4 8         # SmolLM2-135M, rank 16 all-linear
    python bench/bench_fleet_batched.py --threads 1                      # steadier beside other busy processes
    python bench/bench_fleet_batched.py --model smollm2 --quantized-base FILE --ks 4 8
        # on a low-bit base (`lowra quantize-base`): its decode is paid once per step, so once per K users batched
    python bench/bench_fleet_batched.py --model smollm2 --config-only DIR --device cuda --ks 4 8 16
        # GPU device script: SmolLM2's shape and tokenizer from DIR (config.json + tokenizer files, no weights:
        # random init, so step times are real but losses are not; 3.5 MB travels instead of 538 MB)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.conftest's tiny model


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=0,
                        help="tokens per example (0 = 160, or 256 for the tiny model, whose small vocabulary "
                             "spells the samples in more tokens)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--quantized-base", default=None, metavar="FILE",
                        help="with --model smollm2: train on this low-bit base (as `lowra train --quantized-base`)")
    parser.add_argument("--config-only", default=None, metavar="DIR",
                        help="with --model smollm2: build the model from DIR's config.json with random weights")
    args = parser.parse_args()

    import torch

    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.adapters.model import delete_adapter
    from lowra.sdk.fleet.train import train_users
    from lowra.sdk.training.config import TrainConfig
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.train import train_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from tests.conftest import _build_tokenizer, build_tiny_model

        model, tokenizer = build_tiny_model(), _build_tokenizer()
    else:
        from lowra.sdk.base_model import load_base

        if args.config_only:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_only))
            model.eval().requires_grad_(False)
            tokenizer = AutoTokenizer.from_pretrained(args.config_only, local_files_only=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            base = load_base()
            model, tokenizer = base.model, base.tokenizer
        if args.quantized_base:
            from lowra.sdk.quant.lowbit_linear import load_quantized_base

            load_quantized_base(model, args.quantized_base)
    model.to(args.device)
    samples = [load_user_dataset(p) for p in sorted((ROOT / "samples" / "users").iterdir()) if p.is_dir()]
    lora = LoraConfig(rank=args.rank)
    max_len = args.max_len or (256 if args.model == "tiny" else 160)

    def users(k: int) -> list:
        return [replace(samples[i % len(samples)], user_id=f"{samples[i % len(samples)].user_id}-{i}")
                for i in range(k)]

    def configs(datasets: list, steps: int) -> dict:
        return {d.user_id: TrainConfig(steps=steps, batch_size=args.batch, max_len=max_len, seed=i)
                for i, d in enumerate(datasets)}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def sequential(datasets: list, steps: int) -> float:
        cfg = configs(datasets, steps)
        sync()
        start = time.perf_counter()
        for d in datasets:
            train_adapter(model, tokenizer, d, lora, cfg[d.user_id], adapter_name=d.user_id, progress=False)
        sync()
        seconds = time.perf_counter() - start
        for d in datasets:
            delete_adapter(model, d.user_id)
        return seconds

    def batched(datasets: list, steps: int) -> float:
        sync()
        start = time.perf_counter()
        train_users(model, tokenizer, datasets, lora, configs(datasets, steps), progress=False)
        sync()
        seconds = time.perf_counter() - start
        for d in datasets:
            delete_adapter(model, d.user_id)
        return seconds

    kind = " (random weights)" if args.config_only else f" on {args.quantized_base}" if args.quantized_base else ""
    print(f"model {args.model}{kind} on {args.device}, rank {args.rank} all-linear, {args.steps} steps, batch {args.batch}/user, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load before: {_load()}")
    sequential(users(1), 1)
    batched(users(2), 1)
    print(f"{'K':>3} {'sequential s':>13} {'batched s':>10} {'seq s/step/user':>16} {'bat s/step':>11} "
          f"{'seq users/h':>12} {'bat users/h':>12} {'ratio':>6}  load")
    for k in args.ks:
        datasets = users(k)
        seq = sequential(datasets, args.steps)
        bat = batched(datasets, args.steps)
        print(f"{k:>3} {seq:>13.2f} {bat:>10.2f} {seq / (k * args.steps):>16.3f} {bat / args.steps:>11.3f} "
              f"{3600 * k / seq:>12.0f} {3600 * k / bat:>12.0f} {seq / bat:>5.2f}x  {_load()}")


if __name__ == "__main__":
    main()

"""Fleet throughput and thread contention, side by side in one run (issue 13, "Measure").

Default mode: N synthetic users derived deterministically from samples/ (:func:`synthetic_users`, 60 examples each:
48 train, 12 held-out), trained four ways on one base with the same settings and seed:

- sequential: ``train_adapter`` one user after another in one process (``lowra train`` without its process start
  and model load, which would only make sequential slower),
- batched: ``train_users`` with K users per step, K in --ks,
- Ray: ``lowra fleet train``'s ``run_fleet`` with --ray-workers workers, end to end (Ray start, one base load per
  worker, train, compress, three held-out evaluations, gate, blob, registry), K = --ray-k users per worker batch.
  Before it the driver drops its own model and returns the memory to the system: the workers' memory plan
  (lowra.sdk.fleet.memory) counts on what is free. A K whose batch cannot fit in memory is reported as refused.

It prints users/hour of each (training only for the in-process modes; end to end for Ray, so the Ray column is a
lower bound of its training throughput) and the held-out gain over the base, (base - fp) / base, as min / median /
max per mode plus the largest per-user difference from sequential: batching must not change what a user learns.

--contention: one demo-sized training step (SmolLM2-135M, all-linear rank 16, batch 4, max_len 160) timed in a fresh
process per setting (OpenMP reads its environment once), idle and beside 2 busy Python loops, with 2 threads and the
count sized by lowra.sdk.threads, each with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE. The
issue's target: beside 2 busy processes a step costs <= 3x its idle time.

    python bench/bench_fleet.py                          # 32 users, SmolLM2, 60 steps (the lead's full run)
    python bench/bench_fleet.py --users 8 --steps 4      # reduced
    python bench/bench_fleet.py --model tiny --users 8   # the tests' 2-layer model, seconds
    python bench/bench_fleet.py --contention --steps 3
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest's tiny model, and the tiny base the Ray workers import
N_TRAIN, N_HELDOUT = 48, 12
BUSY_LOOP = "while True:\n    pass\n"


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"


def synthetic_users(out: Path, n_users: int, seed: int = 0) -> list[Path]:
    """``n_users`` user folders under ``out``, each 60 examples drawn without replacement from one sample user's
    train + held-out set (user i from sample i mod 3, its own seeded permutation): deterministic, so every mode and
    every rerun trains the same users."""
    import random

    samples = sorted(p for p in (ROOT / "samples" / "users").iterdir() if p.is_dir())
    folders = []
    for i in range(n_users):
        sample = samples[i % len(samples)]
        lines = [line for name in ("train.jsonl", "heldout.jsonl")
                 for line in (sample / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = random.Random(seed * 100_003 + i).sample(lines, N_TRAIN + N_HELDOUT)
        folder = out / f"synth{i:03d}-{sample.name}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("\n".join(picked[:N_TRAIN]) + "\n", encoding="utf-8")
        (folder / "heldout.jsonl").write_text("\n".join(picked[N_TRAIN:]) + "\n", encoding="utf-8")
        card = json.loads((sample / "user.json").read_text(encoding="utf-8"))
        card.update(id=folder.name, n_train=N_TRAIN, n_heldout=N_HELDOUT,
                    source=f"bench/bench_fleet.py synthetic_users from samples/users/{sample.name}")
        (folder / "user.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
        folders.append(folder)
    return folders


def _base(model: str):
    if model == "tiny":
        from tests.sdk.fleet.test_runner import tiny_base

        return tiny_base
    from lowra.sdk.fleet.runner import CliBase

    return CliBase()


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise), so free memory means free."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _spread(values: list[float]) -> str:
    return f"{min(values):+.3f} / {statistics.median(values):+.3f} / {max(values):+.3f}"


def throughput(args: argparse.Namespace) -> None:
    import torch

    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.adapters.model import adapter_names, delete_adapter, set_active_adapters
    from lowra.sdk.fleet.gate import GateConfig
    from lowra.sdk.errors import ConfigError
    from lowra.sdk.fleet.registry import Registry
    from lowra.sdk.fleet.runner import FleetSettings, run_fleet
    from lowra.sdk.fleet.train import train_users
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.threads import available_cores
    from lowra.sdk.training.config import TrainConfig
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.train import evaluate_loss, train_adapter

    torch.set_num_threads(available_cores(args.threads))
    work = Path(tempfile.mkdtemp(prefix="lowra-bench-fleet-"))
    folders = synthetic_users(work / "users", args.users)
    datasets = [load_user_dataset(f) for f in folders]
    model, tokenizer = _base(args.model)()
    lora = LoraConfig(rank=args.rank)
    config = TrainConfig(steps=args.steps, max_len=args.max_len)

    def loss(dataset, adapter=None) -> float:
        set_active_adapters(model, adapter)
        return evaluate_loss(model, tokenizer, dataset.heldout, config.max_len, config.eval_batch_size)

    print(f"model {args.model}, {args.users} users x {N_TRAIN} train / {N_HELDOUT} held-out, rank {args.rank}, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}, cores {available_cores()}, load {_load()}")
    base = {d.user_id: loss(d) for d in datasets}
    train_adapter(model, tokenizer, datasets[0], lora, replace(config, steps=1), adapter_name="warmup", progress=False)
    delete_adapter(model, "warmup")  # untimed: the first step allocates and starts the thread pool
    rows: dict[str, tuple[float, dict[str, float]]] = {}

    def gains_of(fp: dict[str, float]) -> dict[str, float]:
        return {u: (base[u] - fp[u]) / base[u] for u in fp}

    def show(mode: str, seconds: float, fp: dict[str, float]) -> None:
        """Each mode's row as soon as it is measured (a reduced run can be read while the rest still runs)."""
        rows[mode] = (seconds, gains_of(fp))
        if len(rows) == 1:
            print(f"\n{'mode':<34} {'seconds':>8} {'users/h':>9} {'vs seq':>7}   gain over base min / median / max"
                  f"   max |diff| vs seq   load")
        gains, reference = rows[mode][1], rows["sequential"][1]
        diff = max(abs(gains[u] - reference[u]) for u in gains)
        print(f"{mode:<34} {seconds:>8.1f} {3600 * len(gains) / seconds:>9.0f} "
              f"{rows['sequential'][0] / seconds:>6.2f}x   {_spread(list(gains.values()))}   {diff:.2e}   {_load()}",
              flush=True)

    start = time.perf_counter()
    fp = {}
    for d in datasets:
        train_adapter(model, tokenizer, d, lora, config, adapter_name="bench", progress=False)
        fp[d.user_id] = loss(d, "bench")
        delete_adapter(model, "bench")
    show("sequential", time.perf_counter() - start, fp)
    for k in args.ks:
        start, fp = time.perf_counter(), {}
        for i in range(0, len(datasets), k):
            group = [replace(d, user_id=f"slot{j}") for j, d in enumerate(datasets[i:i + k])]
            try:
                train_users(model, tokenizer, group, lora, config, progress=False)
            except ConfigError as exc:  # the memory guard: this K does not fit on this machine
                print(f"batched K={k}: refused: {exc}", flush=True)
                break
            for slot, d in zip(group, datasets[i:i + k]):
                fp[d.user_id] = loss(d, slot.user_id)
            for name in adapter_names(model):
                delete_adapter(model, name)
        if len(fp) == len(datasets):
            show(f"batched K={k}", time.perf_counter() - start, fp)
        for name in adapter_names(model):
            delete_adapter(model, name)
    if args.ray_workers:
        model = tokenizer = None  # the workers load their own; give this process's memory back first
        gc.collect()
        _trim_heap()
        settings = FleetSettings(
            registry=str(work / "fleet.db"), out=str(work / "out"), base=_base(args.model), lora=lora, train=config,
            compress=CompressConfig(bits=8.0 if args.model == "tiny" else 1.0),
            gate=GateConfig(0.0, 0.0), batch_users=args.ray_k)
        run = run_fleet(work / "users", settings, workers=args.ray_workers, progress=False)
        with Registry(settings.registry) as registry:
            fp = {u: registry.history(u)[-1].card["heldout_loss"]["fp_adapter"] for u in base}
        show(f"Ray {run.plan.workers}x{run.plan.threads}t K={args.ray_k} (end to end)", run.seconds, fp)
    print(f"load after: {_load()}; work folder {work}")


def _step_worker(args: argparse.Namespace) -> None:
    """One setting of --contention, in its own process: median seconds of a demo-sized training step."""
    import torch

    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.training.config import TrainConfig
    from lowra.sdk.training.data import load_user_dataset
    from lowra.sdk.training.train import train_adapter

    torch.set_num_threads(args.threads)
    model, tokenizer = _base(args.model)()
    dataset = load_user_dataset(ROOT / "samples" / "users" / "terse_notes")
    lora, times = LoraConfig(), []
    for i in range(args.steps + 1):  # the first step warms up (allocations, OpenMP pool start)
        name = f"a{i}"
        result = train_adapter(model, tokenizer, dataset, lora, TrainConfig(steps=1, max_len=args.max_len, seed=i),
                               adapter_name=name, progress=False)
        times.append(result.seconds)
    print(json.dumps({"step_s": statistics.median(times[1:])}))


def contention(args: argparse.Namespace) -> None:
    from lowra.sdk.threads import available_cores, thread_env

    sized = available_cores(args.threads)
    settings = [(threads, policy) for threads in sorted({2, sized}) for policy in ("default", "PASSIVE")]
    print(f"model {args.model}, demo-sized step (batch 4, max_len {args.max_len}, rank 16 all-linear), median of "
          f"{args.steps} steps after a warm-up; sized threads = {sized}; load before {_load()}")

    def step_seconds(threads: int, policy: str) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
        env.update(thread_env(threads) if policy == "PASSIVE" else {"OMP_NUM_THREADS": str(threads)})
        out = subprocess.run([sys.executable, __file__, "--step-worker", "--model", args.model, "--threads",
                              str(threads), "--steps", str(args.steps), "--max-len", str(args.max_len)],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]

    idle = {s: step_seconds(*s) for s in settings}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(2)]
    try:
        time.sleep(1.0)
        loaded_at = _load()
        loaded = {s: step_seconds(*s) for s in settings}
    finally:
        for process in busy:
            process.kill()
            process.wait()
    print(f"{'threads':>7} {'wait policy':>11} {'idle s':>8} {'2 busy s':>9} {'ratio':>6}  (target <= 3x)")
    for threads, policy in settings:
        ratio = loaded[(threads, policy)] / idle[(threads, policy)]
        print(f"{threads:>7} {policy:>11} {idle[(threads, policy)]:>8.3f} {loaded[(threads, policy)]:>9.3f} "
              f"{ratio:>5.2f}x")
    print(f"load during the busy runs: {loaded_at}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=0,
                        help="tokens per example (0 = 160, or 256 for the tiny model, whose small vocabulary "
                             "spells the samples in more tokens)")
    parser.add_argument("--threads", type=int, default=None, help="override the sized thread count")
    parser.add_argument("--ray-workers", type=int, default=2, help="0 skips the Ray mode")
    parser.add_argument("--ray-k", type=int, default=4, help="users per batch in each Ray worker")
    parser.add_argument("--contention", action="store_true", help="step time idle vs beside 2 busy processes")
    parser.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_len = args.max_len or (256 if args.model == "tiny" else 160)
    if args.step_worker:
        _step_worker(args)
    elif args.contention:
        contention(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()

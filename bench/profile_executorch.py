"""Where an ExecuTorch decode step goes: operator time per op kind from ETDump, for one model folder.

    python bench/profile_executorch.py FOLDER [--mode side] [--prompt-tokens 40] [--steps 16] [--threads 2]

Runs a prefill of ``--prompt-tokens`` ids and ``--steps`` one-token decode steps through ExecuTorch's Python
binding with ETDump on (the kernel library of the folder registered first), then sums the operator events of the
decode steps per operator name with ``executorch.devtools.Inspector``. Prints ms per decode step per operator and the
number of calls per step. A profile, not a speed benchmark: ETDump adds its own time per operator call.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=("side", "merge"), default="side")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel-library", type=Path, default=None,
                        help="register this kernel library instead of the folder's (e.g. today's build for an older "
                             "folder: python -m lowra.export.executorch.kernels)")
    args = parser.parse_args()
    os.environ["LOWRA_ET_THREADS"] = str(args.threads)

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from lowra.device_runtime.executorch_native import register_kernel_library

    manifest = json.loads((args.folder / "manifest.json").read_text())
    if args.kernel_library or manifest.get("kernel_library"):
        register_kernel_library(args.kernel_library or args.folder / manifest["kernel_library"])
    program = manifest["programs"][args.mode]
    module = _load_for_executorch(str(args.folder / program["program"]), str(args.folder / program["data"]),
                                  enable_etdump=True, debug_buffer_size=0)
    ids = np.random.default_rng(0).integers(0, manifest["vocab_size"], args.prompt_tokens)
    module.forward((torch.from_numpy(ids)[None], torch.arange(args.prompt_tokens)))
    for k in range(args.steps):
        module.forward((torch.tensor([[int(ids[k % ids.size])]]), torch.tensor([args.prompt_tokens + k])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    blocks = [b for b in inspector.event_blocks if b.name.startswith("Execute")] or inspector.event_blocks
    totals: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    decode_runs = 0
    for block in blocks:
        for event in block.events:
            if not event.perf_data or event.name in ("Method::execute", "Program::load_method", "Method::init",
                                                     "OPERATOR_CALL"):  # OPERATOR_CALL: the sum of the others
                continue
            runs = event.perf_data.raw  # one duration (ms) per program call: the prefill first, then each step
            decode = runs[1:]
            decode_runs = max(decode_runs, len(decode))
            totals[event.name] += float(np.sum(decode))
            calls[event.name] += 1
    steps = max(decode_runs, 1)
    total = sum(totals.values()) / steps
    print(f"{args.folder.name} {args.mode}: {steps} decode steps, {total:.2f} ms per step in operators "
          f"({args.threads} threads, load average {os.getloadavg()[0]:.2f})")
    for name, value in sorted(totals.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {value / steps:8.3f} ms  {calls[name]:5d} calls  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ExecuTorch custom op lowra::lowbit_linear: lookup-table kernels vs the previous decode-and-dot kernel.

One program holds the seven linears of a SmolLM2-135M block (q 576x576, k/v 192x576, o 576x576, gate/up
1536x576, down 576x1536) as LowBitLinear layers with random rows at ~1.5 code bits (widths 1/2/4 drawn
0.55/0.35/0.10), exported with the custom op. Both kernels run in one process, call after call in alternation
(``LOWRA_ET_LOWBIT`` is read per call), for one token (decode) and for a 27-token prompt (prefill). Reports the median
ms per block and x30 blocks (all linears of one SmolLM2 token), the ratio, and the largest difference between the two
kernels' outputs relative to the largest output.

    python bench/bench_et_lowbit_op.py [--threads 1] [--rounds 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
BLOCKS = 30


def random_weight(out_f: int, in_f: int, rng: np.random.Generator):
    from lowra.device_runtime.formats import pack_codes
    from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

    widths = rng.choice(np.array([1, 2, 4], np.uint8), out_f, p=[0.55, 0.35, 0.10])
    codes = [pack_codes(rng.integers(0, 1 << w, (1, in_f)).astype(np.uint8), int(w))[0] for w in widths]
    books = [np.sort(rng.standard_normal(1 << w) * 0.05).astype(np.float16) for w in widths]
    qw = QuantizedWeight(out_f, in_f, 0, widths, np.concatenate(codes), np.concatenate(books),
                         np.zeros((out_f, 0), np.float16))
    qw.validate()
    return qw


def export(tokens: int, folder: Path) -> Path:
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from lowra.export.executorch import fix_empty_strides, load_kernel_library
    from lowra.sdk.quant.lowbit_linear import LowBitLinear

    rng = np.random.default_rng(0)
    layers = {name: LowBitLinear.from_quantized(random_weight(o, i, rng)) for name, (o, i) in SHAPES.items()}

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleDict(layers)

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(layer(h if name == "down_proj" else x) for name, layer in self.layers.items())

    module = Block()
    fix_empty_strides(module)
    load_kernel_library()
    example = (torch.randn(tokens, 576), torch.randn(tokens, 1536))
    program = to_edge_transform_and_lower(torch.export.export(module, example, strict=True)).to_executorch()
    path = folder / f"block-{tokens}.pte"
    path.write_bytes(program.buffer)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="LOWRA_ET_THREADS for both kernels")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    os.environ["LOWRA_ET_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import torch
    from executorch.runtime import Runtime

    torch.set_num_threads(args.threads)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"LOWRA_ET_THREADS={args.threads}, {args.rounds} rounds, cpus {os.cpu_count()}, load before {load}")
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (1, 27):
            method = Runtime.get().load_program(export(tokens, Path(tmp))).load_method("forward")
            rng = np.random.default_rng(tokens)
            inputs = [torch.from_numpy(rng.standard_normal((tokens, 576)).astype(np.float32)),
                      torch.from_numpy(rng.standard_normal((tokens, 1536)).astype(np.float32))]
            times: dict[str, list[float]] = {"decode": [], "lut": []}
            outputs: dict[str, list[np.ndarray]] = {}
            for _ in range(3):  # warm-up (the first lut call repacks the codes)
                for mode in times:
                    os.environ["LOWRA_ET_LOWBIT"] = mode
                    outputs[mode] = [t.numpy().copy() for t in method.execute(inputs)]
            for r in range(args.rounds):
                for mode in (("decode", "lut") if r % 2 == 0 else ("lut", "decode")):
                    os.environ["LOWRA_ET_LOWBIT"] = mode
                    t0 = time.perf_counter()
                    method.execute(inputs)
                    times[mode].append(time.perf_counter() - t0)
            scale = max(float(np.abs(o).max()) for o in outputs["decode"])
            diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["decode"], outputs["lut"])) / scale
            med = {m: 1e3 * statistics.median(v) for m, v in times.items()}
            label = "decode (1 token)" if tokens == 1 else f"prefill ({tokens} tokens)"
            print(f"{label:<20} decode-and-dot {med['decode']:7.3f} ms/block ({BLOCKS * med['decode']:7.1f} ms for "
                  f"{BLOCKS} blocks) | lookup tables {med['lut']:7.3f} ms/block ({BLOCKS * med['lut']:7.1f} ms) | "
                  f"{med['decode'] / med['lut']:.2f}x | max |diff| / max |y| {diff:.1e}")
    print(f"load after {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()

"""The native runtime an app embeds (``lowra_chat`` on liblowra + liblowra_program): decode and prefill speed,
resident memory, user switches, binary sizes; several model folders side by side in alternating rounds.

    python bench/bench_native.py [--folder DIR ...] [--threads 2] [--rounds 5] [--tokens 64] [--mode side]

Each round starts one ``lowra_chat FOLDER MODE`` process per folder (rotated order, one at a time, nothing else
running beside it) and drives it over stdin, as an app would call the C API:
- resident memory (VmRSS from /proc) once the folder is open, and after the generations (VmHWM: the peak);
- ``generate 1 PROMPT`` then ``generate 1+N PROMPT``: prefill tok/s = prompt tokens / the first call's time, decode
  tok/s = N / (the second call's time - the first's), both through the C API (no Python in the process);
- with blobs: the median ``load`` time when switching between them (the runtime's own ``load_ms``), then the same
  decode with a user loaded; in merge mode also the time to copy the weights a merge rewrites (numpy, warm), the
  yardstick of the merge-at-load target.
The table gives each folder's medians over the rounds, with the decode speed's range (rounds vary by up to 20% on
a shared 2-core machine; compare folders within one run).
Default folders: the ExecuTorch exports of bench/bench_executorch.py (``$LOWRA_CACHE/bench_executorch/custom*``).

llama.cpp (issue 14's comparison) needs ``llama-cpp-python`` built from source, which needs the package registry;
where it is not importable the bench says so and prints no llama.cpp figure. The CMake project is built (Release)
into ``$LOWRA_CACHE/bench_native/build`` on the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = ROOT / "device_runtime" / "native"
PROMPT = "Give me three tips for writing clear Python code."


def build(build_dir: Path) -> Path:
    """Configure and build the CMake project (Release) with the venv's ExecuTorch wheel; returns lowra_chat."""
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is not installed: the native runtime cannot be built here")
    subprocess.run(["cmake", "-S", str(NATIVE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython3_EXECUTABLE={sys.executable}"], check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "2"], check=True, capture_output=True, text=True)
    chat = next((p for p in build_dir.rglob("lowra_chat") if p.is_file()), None)
    if chat is None or next(build_dir.rglob("liblowra_program.so"), None) is None:
        raise SystemExit(f"{build_dir}: lowra_chat or liblowra_program.so was not built (is executorch installed?)")
    return chat


def stripped_size(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        subprocess.run(["strip", str(copy)], check=True, capture_output=True)
        return copy.stat().st_size


def proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Chat:
    """One lowra_chat process on a model folder, driven line by line."""

    def __init__(self, chat: Path, folder: Path, mode: str, threads: int) -> None:
        env = dict(os.environ, LOWRA_ET_THREADS=str(threads))
        self.proc = subprocess.Popen([str(chat), str(folder), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.t_open = time.perf_counter()
        self.first = self._line()
        self.open_s = time.perf_counter() - self.t_open
        if not self.first.startswith("ok model"):
            raise SystemExit(f"lowra_chat {folder} {mode}: {self.first}")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"lowra_chat exited ({self.proc.wait()})")
        return line.strip()

    def call(self, command: str, refused_ok: bool = False) -> tuple[str, float]:
        """Send one command; its "ok ..." reply and the seconds it took. ``refused_ok``: an "error ..." reply is
        returned too (a user blob for another base) instead of ending the bench."""
        t0 = time.perf_counter()
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self._line()
        elapsed = time.perf_counter() - t0
        if not reply.startswith("ok") and not (refused_ok and reply.startswith("error")):
            raise SystemExit(f"lowra_chat: {command.split()[0]}: {reply}")
        return reply, elapsed

    def rss_mib(self, key: str = "VmRSS") -> float:
        return proc_kib(self.proc.pid, key) / 1024

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)


def measure(chat: Path, folder: Path, mode: str, ids: list[int], tokens: int, threads: int,
            blobs: list[Path]) -> dict[str, float]:
    prompt = " ".join(str(i) for i in ids)
    session = Chat(chat, folder, mode, threads)
    out = {"open_s": session.open_s, "rss_open_mib": session.rss_mib()}
    _, first = session.call(f"generate 1 {prompt}")
    reply, full = session.call(f"generate {1 + tokens} {prompt}")
    out["prefill_tok_s"] = len(ids) / first
    out["decode_tok_s"] = tokens / (full - first)
    out["tokens"] = reply.split()[2:]
    out["rss_generated_mib"] = session.rss_mib()
    reply, _ = session.call(f"load {blobs[0]}", refused_ok=True) if blobs else ("", 0.0)
    if reply.startswith("error"):  # trained for another base (bench_executorch's users: its 1.5-bit base)
        print(f"  {folder.name}: user figures skipped, its base refuses {blobs[0].name}: {reply}", flush=True)
        blobs = []
    if blobs:
        loads = []
        for k in range(1, 7):
            reply, _ = session.call(f"load {blobs[k % len(blobs)]}")
            loads.append(float(reply.split("load_ms")[1].split()[0]))
        out["switch_ms"] = statistics.median(loads)
        _, first = session.call(f"generate 1 {prompt}")
        _, full = session.call(f"generate {1 + tokens} {prompt}")
        out["decode_with_user_tok_s"] = tokens / (full - first)
        out["rss_with_user_mib"] = session.rss_mib()
    out["rss_peak_mib"] = session.rss_mib("VmHWM")
    session.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--folder", action="append", type=Path, default=None,
                        help="ExecuTorch model folder (repeatable; default: bench_executorch's custom* exports)")
    parser.add_argument("--mode", choices=("side", "merge"), default="side")
    parser.add_argument("--blob", action="append", type=Path, default=None,
                        help="user blobs for the switch and with-user figures (default: bench_executorch's users)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()

    from lowra.device_runtime._files import cache_dir

    work = cache_dir() / "bench_executorch"
    folders = args.folder or sorted(p for p in work.glob("custom*") if (p / "manifest.json").is_file())
    if not folders:
        raise SystemExit(f"no model folder given and none under {work}: run bench/bench_executorch.py --only-export")
    blobs = args.blob if args.blob is not None else sorted(work.glob("user*.lowra"))
    build_dir = cache_dir() / "bench_native" / "build"
    chat = build(build_dir)
    library = next(build_dir.rglob("liblowra_program.so"))

    from tokenizers import Tokenizer

    from lowra.device_runtime.formats.executorch_manifest import Manifest

    # The prompt as an app sends it: the folder's chat template around the user's text (SmolLM2: 40 tokens).
    text = Manifest.read(folders[0]).prompt_template.format(prompt=PROMPT)
    ids = Tokenizer.from_file(str(folders[0] / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    load = os.getloadavg()[0]
    print(f"{len(folders)} folder(s), mode {args.mode}, {args.threads} threads, prompt {len(ids)} tokens, "
          f"{args.tokens} decode tokens, {args.rounds} rounds; load average {load:.2f}", flush=True)
    runs: dict[str, list[dict]] = {str(f): [] for f in folders}
    for r in range(args.rounds):
        order = folders[r % len(folders):] + folders[: r % len(folders)]
        for folder in order:
            result = measure(chat, folder, args.mode, ids, args.tokens, args.threads, blobs)
            runs[str(folder)].append(result)
            print(f"round {r + 1} {folder.name}: decode {result['decode_tok_s']:.2f} tok/s, prefill "
                  f"{result['prefill_tok_s']:.1f} tok/s, RSS {result['rss_open_mib']:.0f} -> "
                  f"{result['rss_generated_mib']:.0f} MiB", flush=True)
    report: dict[str, object] = {"threads": args.threads, "mode": args.mode, "rounds": args.rounds,
                                 "prompt_tokens": len(ids), "decode_tokens": args.tokens,
                                 "load_avg_start": load, "load_avg_end": os.getloadavg()[0], "folders": {}}
    print(f"\n{'folder':<28} {'embeddings':>10} {'base MiB':>8} {'decode':>8} {'(range)':>15} {'prefill':>8} {'RSS open':>8} "
          f"{'RSS gen':>8} {'peak':>6} {'w/ user':>8} {'switch ms':>9}")
    for folder in folders:
        rows = runs[str(folder)]
        manifest = json.loads((folder / "manifest.json").read_text())
        packed = sum(manifest["packed_base_bytes"].values()) / 2**20
        summary = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "tokens"}
        summary["tokens_equal_across_rounds"] = all(row["tokens"] == rows[0]["tokens"] for row in rows)
        summary["decode_tok_s_range"] = [min(row["decode_tok_s"] for row in rows), max(row["decode_tok_s"] for row in rows)]
        summary["embeddings"] = manifest.get("embeddings", "float32")
        summary["packed_linears_mib"] = packed
        report["folders"][str(folder)] = summary
        low, high = summary["decode_tok_s_range"]
        print(f"{folder.name:<28} {summary['embeddings']:>10} {packed:8.1f} {summary['decode_tok_s']:8.2f} "
              f"{f'({low:.1f}-{high:.1f})':>15} "
              f"{summary['prefill_tok_s']:8.1f} {summary['rss_open_mib']:8.0f} {summary['rss_generated_mib']:8.0f} "
              f"{summary['rss_peak_mib']:6.0f} {summary.get('decode_with_user_tok_s', float('nan')):8.2f} "
              f"{summary.get('switch_ms', float('nan')):9.2f}")
    if args.mode == "merge":
        import numpy as np

        info = json.loads((folders[0] / "manifest.json").read_text())["programs"]["merge"]
        template = np.fromfile(folders[0] / info["data"], dtype=np.uint8)
        target = np.empty_like(template)
        copies = []
        for _ in range(5):
            t0 = time.perf_counter()
            for entry in info["tensors"].values():
                lo, hi = entry["offset"], entry["offset"] + entry["nbytes"]
                target[lo:hi] = template[lo:hi]
            copies.append((time.perf_counter() - t0) * 1e3)
        copy_ms = statistics.median(copies)
        merge_ms = report["folders"][str(folders[0])].get("switch_ms")
        report["merge_copy_ms"] = copy_ms
        if merge_ms is None:
            print(f"merge at load: not measured (no blob for {folders[0].name}'s base; pass --blob)")
        else:
            print(f"merge at load {merge_ms:.1f} ms vs a copy of the {len(info['tensors'])} weights it rewrites "
                  f"{copy_ms:.1f} ms: {merge_ms / copy_ms:.2f}x")
    base = report["folders"][str(folders[0])]
    for folder in folders[1:]:
        other = report["folders"][str(folder)]
        print(f"{folder.name} / {folders[0].name}: decode {other['decode_tok_s'] / base['decode_tok_s']:.2f}x, "
              f"RSS after generation {other['rss_generated_mib'] / base['rss_generated_mib']:.2f}x")
    sizes = {"lowra_chat": chat, "liblowra_program.so": library}
    liblowra = next(build_dir.rglob("liblowra.so"), None)
    if liblowra is not None:
        sizes["liblowra.so"] = liblowra
    report["sizes"] = {name: {"bytes": path.stat().st_size, "stripped": stripped_size(path)}
                       for name, path in sizes.items()}
    print("sizes: " + ", ".join(f"{n} {v['bytes'] / 1024:.0f} KB ({v['stripped'] / 1024:.0f} KB stripped)"
                                for n, v in report["sizes"].items()))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: skipped (llama-cpp-python is not installed, and building it needs the package registry, "
              "which this machine cannot reach); no llama.cpp figure is measured in this run")
        report["llama_cpp"] = "skipped: llama-cpp-python not installed"
    else:
        print("llama.cpp: llama-cpp-python is importable, but this bench has no GGUF files of the same weights; "
              "not measured")
        report["llama_cpp"] = "not measured: no GGUF files"
    report["load_avg_end"] = os.getloadavg()[0]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

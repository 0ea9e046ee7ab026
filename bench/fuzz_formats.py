"""The long fuzz run of every reader (issue 12, "Done when"): >= 100,000 mutated blobs and >= 30,000 mutated base
files, each run through the device's reader and classified (tests/fuzz_mutations.py: the same seeds, mutators and
classifier as the CI test tests/device_runtime/test_fuzz.py, at scale).

Prints, per family, the count of each outcome per mutator; the slowest input; the peak memory of any input against
2x the largest valid file (tracemalloc, Python and numpy allocations); every bug with a recipe to reproduce it
(seed, mutator, rng seed); and the exact command line. Exits 1 when any bug was found.
Usage: python bench/fuzz_formats.py --blobs 100000 --bases 30000 --seed 0
"""
from __future__ import annotations

import argparse
import collections
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the seeds and mutators live in tests/

from tests.fuzz_mutations import OUTCOMES, FuzzContext, Mutation, Result, Seed

SHORT = {"refused": "refused", "accepted-same": "same", "valid-edit-accepted": "valid-edit",
         "accepted-changed": "CHANGED", "foreign-exception": "FOREIGN", "hang": "HANG", "memory-blowup": "MEMORY",
         "bad-message": "MESSAGE"}
EXAMPLES_PER_BUG = 3


def run_family(ctx: FuzzContext, family: str, n: int, rng: random.Random, stats: dict) -> None:
    cases = [(s, m) for s, m in ctx.cases() if s.family == family]
    step = max(n // 10, 1)
    start = time.perf_counter()
    for i in range(n):
        seed, mutation = cases[rng.randrange(len(cases))]
        rng_seed = rng.getrandbits(32)
        try:
            data, result = ctx.run(seed, mutation, rng_seed)
        except Exception as exc:  # a mutator that cannot apply is the harness's bug: report it, go on
            stats["mutator_errors"][f"{seed.name} / {mutation.name}"] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        record(stats, family, seed, mutation, rng_seed, len(data), result)
        if (i + 1) % step == 0:
            print(f"  {family}: {i + 1}/{n} inputs, {time.perf_counter() - start:.0f} s", flush=True)


def record(stats: dict, family: str, seed: Seed, mutation: Mutation, rng_seed: int, size: int, result: Result) -> None:
    stats["counts"][family][mutation.name][result.outcome] += 1
    slowest = stats["slowest"][family]
    if result.seconds > slowest[0]:
        stats["slowest"][family] = (result.seconds, f"{seed.name} / {mutation.name} / rng {rng_seed}")
    peak = stats["peak"][family]
    if result.peak_bytes > peak[0]:
        stats["peak"][family] = (result.peak_bytes, size, f"{seed.name} / {mutation.name} / rng {rng_seed}")
    if result.is_bug:
        stats["bug_inputs"] += 1
        examples = stats["bugs"][(family, mutation.name, result.outcome)]
        if len(examples) < EXAMPLES_PER_BUG:
            examples.append(f"seed {seed.name}, rng {rng_seed}: {result.error[:200]} {result.trace[-300:]!r}")


def print_table(family: str, counts: dict[str, collections.Counter]) -> None:
    columns = [o for o in OUTCOMES if any(c[o] for c in counts.values())]
    width = max(len(name) for name in counts) + 2
    print(f"\n{family}: outcomes per mutator")
    print("mutator".ljust(width) + "".join(SHORT[o].rjust(12) for o in columns) + "total".rjust(10))
    totals: collections.Counter = collections.Counter()
    for name in sorted(counts):
        row = counts[name]
        totals.update(row)
        print(name.ljust(width) + "".join(str(row[o]).rjust(12) for o in columns) + str(sum(row.values())).rjust(10))
    print("TOTAL".ljust(width) + "".join(str(totals[o]).rjust(12) for o in columns) + str(sum(totals.values())).rjust(10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=100_000, help="mutated adapter blobs (signed ones included)")
    parser.add_argument("--bases", type=int, default=30_000, help="mutated quantized base files (signed included)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of seeds, mutators and their rng")
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the tiny base and each base input are written (default /dev/shm: no disk I/O)")
    args = parser.parse_args()
    command = "python " + shlex.join(["bench/fuzz_formats.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        ctx = FuzzContext(Path(workdir))
        stats: dict = {
            "counts": {f: collections.defaultdict(collections.Counter) for f in ("blob", "base")},
            "slowest": {f: (0.0, "") for f in ("blob", "base")},
            "peak": {f: (0, 0, "") for f in ("blob", "base")},
            "bugs": collections.defaultdict(list),
            "mutator_errors": {},
            "bug_inputs": 0,
        }
        rng = random.Random(args.seed)
        start = time.perf_counter()
        for family, n in (("blob", args.blobs), ("base", args.bases)):
            run_family(ctx, family, n, rng, stats)
        elapsed = time.perf_counter() - start
        for family in ("blob", "base"):
            print_table(family, stats["counts"][family])
        print("\nper family: slowest input; peak memory of any input (tracemalloc) vs 2x the largest valid file")
        for family in ("blob", "base"):
            seconds, where = stats["slowest"][family]
            peak, size, peak_where = stats["peak"][family]
            largest = ctx.largest_valid[family]
            print(f"  {family}: slowest {seconds * 1e3:.1f} ms ({where}); peak {peak} B for a {size} B input "
                  f"({peak_where}); 2x the largest valid file = {2 * largest} B; a valid seed's own load peaks at "
                  f"{ctx.valid_peak[family]} B")
        print(f"\n{args.blobs + args.bases} inputs in {elapsed:.0f} s")
        bugs = stats["bugs"]
        print(f"bugs: {stats['bug_inputs']} inputs in {len(bugs)} (family, mutator, outcome) groups")
        for (family, name, outcome), examples in sorted(bugs.items()):
            print(f"  {family} / {name} / {outcome}:")
            for example in examples:
                print(f"    {example}")
        for where, error in stats["mutator_errors"].items():
            print(f"  mutator error (harness): {where}: {error}")
        print(f"\ncommand: {command}")
    return 1 if stats["bugs"] or stats["mutator_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

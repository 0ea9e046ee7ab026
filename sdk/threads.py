"""How many threads this process may really run at once, and how a fleet splits them between workers.

Torch sizes its intra-op pool from the machine's core count, which in a container or under ``taskset`` is not what
the process may use: a pool of 64 threads on a 2-CPU cgroup quota spends its time throttled. Worse, torch's CPU pool
is OpenMP, whose threads spin at every barrier; beside other busy processes a spinning thread burns the slice a
descheduled peer needs to reach the barrier, and a step that takes 2.65 s on idle cores took 37-60 s beside two busy
processes (issue 13). So a fleet worker gets ``threads`` from what the cores allow (affinity, cgroup quota, an
explicit override), workers x threads never exceeds the cores, and ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads
sleep instead of spin (``bench/bench_fleet.py --contention`` measures both).

Torch-free on purpose: the CLI parser and the Ray driver size workers without importing torch; the environment from
:func:`thread_env` must be in place before a worker imports torch (OpenMP reads it once, at start-up).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lowra.sdk.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# Threads per fleet worker when neither --workers nor --threads is given: batched training multiplies every matmul
# by K users, which 2 threads share well, and fewer workers hold fewer copies of the base in memory.
DEFAULT_THREADS_PER_WORKER = 2


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_limit(folder: Path) -> float | None:
    """``cpu.max`` is ``"QUOTA PERIOD"`` or ``"max PERIOD"`` (no limit)."""
    text = _read(folder / "cpu.max")
    parts = text.split() if text else []
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 when unlimited."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup folder and every parent up to the hierarchy's root: a limit anywhere above binds too."""
    parts = [p for p in cgroup_path.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), the tightest along its path; None if unlimited.

    Reads cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under the ``cpu``
    controller), whichever the machine mounts."""
    limits: list[float] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            # A hybrid machine mounts v2 beside v1, under "unified".
            mount = cgroup_root / "unified" if (cgroup_root / "unified").is_dir() else cgroup_root
            folders, limit = _ancestors(mount, path), _v2_limit
        elif "cpu" in controllers.split(","):
            mount = next((cgroup_root / name for name in (controllers, "cpu", "cpu,cpuacct")
                          if (cgroup_root / name).is_dir()), None)
            if mount is None:
                continue
            folders, limit = _ancestors(mount, path), _v1_limit
        else:
            continue
        limits += [value for value in map(limit, folders) if value is not None]
    return min(limits) if limits else None


def available_cores(override: int | None = None, *, cgroup_root: Path = CGROUP_ROOT,
                    proc_cgroup: Path = PROC_CGROUP) -> int:
    """Cores this process may use: the CPUs it is pinned to (``sched_getaffinity``), capped by its cgroup quota
    (rounded up: 1.5 cores of quota run 2 threads half the time each), or ``override`` when given."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise ConfigError(f"the thread count must be an integer >= 1, got {override!r}")
        return override
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


@dataclass(frozen=True)
class ThreadPlan:
    """``workers`` processes of ``threads`` intra-op threads each, on ``cores`` cores (workers x threads <= cores)."""

    cores: int
    workers: int
    threads: int


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def plan_threads(cores: int, workers: int | None = None, threads: int | None = None) -> ThreadPlan:
    """Split ``cores`` between workers without oversubscribing: what is not given is derived from what is.

    Neither given: workers of :data:`DEFAULT_THREADS_PER_WORKER` threads (one worker on fewer cores). Refuses
    ``workers x threads > cores``: oversubscribed OpenMP pools wait on each other at every barrier."""
    _positive("cores", cores)
    _positive("--workers", workers)
    _positive("--threads", threads)
    if workers is not None and workers > cores:
        raise ConfigError(f"--workers {workers} is more workers than the {cores} cores available; use at most {cores}")
    if workers is None and threads is None:
        threads = min(cores, DEFAULT_THREADS_PER_WORKER)
    if workers is None:
        workers = max(1, cores // threads)
    if threads is None:
        threads = max(1, cores // workers)
    if workers * threads > cores:
        raise ConfigError(
            f"{workers} workers x {threads} threads = {workers * threads} threads on {cores} cores would "
            f"oversubscribe them; use at most {cores} in total (e.g. --workers {max(1, cores // threads)} "
            f"--threads {threads})"
        )
    return ThreadPlan(cores=cores, workers=workers, threads=threads)


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a process that will import torch and run ``threads`` intra-op threads: the pool's size for
    OpenMP and MKL, and OpenMP threads that sleep at barriers instead of spinning (see the module docstring)."""
    _positive("threads", threads)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def size_this_process(threads: int | None = None) -> int:
    """Size this process's intra-op pool to the cores it may use (``lowra train``, ``quantize-base``, ``eval``...).

    ``threads`` (``--threads``) wins; else an ``OMP_NUM_THREADS`` the user exported is kept; else the count is
    :func:`available_cores`, not the machine's core count torch would take. Call it before torch is imported: OpenMP
    reads the variables once; if torch is already imported its pool is resized too. Returns the thread count."""
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        count = int(os.environ["OMP_NUM_THREADS"])
    else:
        count = available_cores(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
    return count

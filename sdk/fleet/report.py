"""The report of a fleet run: what each user of the job has now, read back from the registry (the job's state, so
a resumed run reports every user, not only those trained since the restart), and how fast this run went.

Writes ``report.json`` (every user's row), ``report.md`` (statuses, users/hour, the held-out gain distribution,
bits, bytes, and every failure or gated-out user with its reason) and ``report.png`` (gain, bits, bytes histograms).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowra.device_runtime._files import atomic_file, atomic_write_bytes
from lowra.sdk.fleet.registry import STATUSES, Registry
from lowra.sdk.threads import ThreadPlan


@dataclass(frozen=True)
class WorkerStats:
    """What one worker did before it left."""

    worker_id: str
    completed: int = 0
    failed: int = 0
    dropped: int = 0  # results refused as stale (the worker's lease had run out and the user was reclaimed)
    seconds: float = 0.0


@dataclass(frozen=True)
class FleetRun:
    """One run of ``lowra fleet train``: the users of its inputs, what the run itself did, and how fast."""

    users: tuple[str, ...]
    plan: ThreadPlan
    device: str
    seconds: float
    finished_this_run: int  # versions that left queued/training during this run
    workers: tuple[WorkerStats, ...]
    restarts: int
    input_failures: dict[str, str]

    @property
    def users_per_hour(self) -> float:
        return 3600.0 * self.finished_this_run / self.seconds if self.seconds > 0 else 0.0


SHIPPED = ("active",)
EVALUATED = ("active", "gated_out", "trained", "retired")
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def user_rows(registry: Registry, users: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per user of ``users``: its newest version's status, reason, held-out losses, gate numbers, bits and
    bytes."""
    wanted = set(users)
    rows = []
    for newest in registry.newest():
        if newest.user_id not in wanted:
            continue
        user_id = newest.user_id
        losses = newest.card.get("heldout_loss", {})
        gate = newest.card.get("gate", {})
        rows.append({
            "user": user_id, "version": newest.version, "status": newest.status, "reason": newest.reason,
            "loss_base": losses.get("base"), "loss_fp": losses.get("fp_adapter"),
            "loss_compressed": losses.get("compressed"), "gain_over_base": gate.get("gain_over_base"),
            "gain_kept": gate.get("gain_kept"), "effective_bits": newest.bits, "blob_bytes": newest.bytes,
            "train_seconds_per_user": newest.card.get("seconds", {}).get("train_per_user"),
            "compress_eval_seconds": newest.card.get("seconds", {}).get("compress_eval"),
        })
    return rows


def quantiles(values: list[float]) -> list[float]:
    """min, p10, median, p90, max (linear interpolation), or nan for each when there are no values."""
    ordered = sorted(v for v in values if v is not None and math.isfinite(v))
    if not ordered:
        return [math.nan] * len(QUANTILES)
    out = []
    for q in QUANTILES:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        out.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return out


def _column(rows: list[dict[str, Any]], key: str, statuses: tuple[str, ...]) -> list[float]:
    return [r[key] for r in rows if r["status"] in statuses and r[key] is not None]


def _table(head: tuple[str, ...], lines: list[tuple[Any, ...]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


def _markdown(run: FleetRun, rows: list[dict[str, Any]], counts: dict[str, int]) -> str:
    def dist(label: str, values: list[float], fmt: str) -> tuple[Any, ...]:
        return (label, len(values), *(fmt.format(v) if math.isfinite(v) else "-" for v in quantiles(values)))

    gain = [100 * v for v in _column(rows, "gain_over_base", EVALUATED)]
    kept = [100 * v for v in _column(rows, "gain_kept", EVALUATED)]
    distributions = [
        dist("held-out gain over base, % (compressed)", gain, "{:.1f}"),
        dist("share of the fp adapter's gain kept, %", kept, "{:.1f}"),
        dist("effective bits per parameter", _column(rows, "effective_bits", EVALUATED), "{:.3f}"),
        dist("blob bytes", _column(rows, "blob_bytes", EVALUATED), "{:,.0f}"),
        dist("training seconds per user (batch share)", _column(rows, "train_seconds_per_user", EVALUATED),
             "{:.2f}"),
    ]
    shipped_bytes = sum(_column(rows, "blob_bytes", SHIPPED))
    problems = [(r["user"], r["version"], r["status"], r["reason"].replace("|", "/"))
                for r in rows if r["status"] in ("failed", "gated_out")]
    workers = ", ".join(f"{w.worker_id}: {w.completed} done, {w.failed} failed, {w.dropped} dropped"
                        for w in run.workers) or "none"
    return "\n\n".join([
        "# lowra fleet report",
        f"{len(rows)} users; this run finished {run.finished_this_run} of them in {run.seconds:.1f} s: "
        f"**{run.users_per_hour:,.0f} users/hour** on {run.plan.workers} worker(s) x {run.plan.threads} thread(s) "
        f"({run.device}, {run.plan.cores} cores; {run.restarts} worker(s) replaced). Shipped (active): "
        f"{counts['active']} users, {shipped_bytes:,} blob bytes.",
        "## Status (newest version of each user)\n\n" + _table(("status", "users"), list(counts.items())),
        "## Distributions (users with an evaluated adapter)\n\n"
        + _table(("measure", "users", "min", "p10", "median", "p90", "max"), distributions),
        "## Failed and gated-out users\n\n" + (_table(("user", "version", "status", "reason"), problems)
                                               if problems else "none"),
        f"Workers: {workers}.",
    ]) + "\n"


def _plot(rows: list[dict[str, Any]], run: FleetRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out gain over base (%)", [100 * v for v in _column(rows, "gain_over_base", EVALUATED)]),
              ("effective bits per parameter", _column(rows, "effective_bits", EVALUATED)),
              ("blob bytes", _column(rows, "blob_bytes", EVALUATED))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (label, values) in zip(axes, panels):
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4c72b0")
        ax.set_xlabel(label)
        ax.set_ylabel("users")
        ax.grid(alpha=0.3)
    fig.suptitle(f"lowra fleet: {len(rows)} users, {run.users_per_hour:,.0f} users/hour this run")
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_fleet_report(out: Path, registry: Registry, run: FleetRun) -> Path:
    """Write report.json, report.md and report.png under ``out`` (atomically); returns report.md's path."""
    rows = user_rows(registry, run.users)
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row["status"]] += 1
    summary = {"run": {**asdict(run), "users_per_hour": run.users_per_hour}, "counts": counts, "users": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", json.dumps(summary, indent=2, default=str).encode(), overwrite=True)
    _plot(rows, run, out / "report.png")
    return atomic_write_bytes(out / "report.md", _markdown(run, rows, counts).encode(), overwrite=True)

"""``lowra fleet train`` on Ray: a driver that queues a fleet's users and watches, workers that train them in batches.

The registry (:mod:`lowra.sdk.fleet.registry`) is the job's only state; Ray only runs the workers. One Ray actor per
worker (a CPU budget of ``threads`` cores each, or one GPU each when the cluster has GPUs) loads the base once and
loops: claim up to K users (each claim a lease, renewed by a heartbeat while the batch runs) -> train them together
(:func:`~lowra.sdk.fleet.train.train_users`) -> per user: compress (the demo's settings) -> evaluate the held-out
loss of base, fp adapter and compressed blob -> gate -> write the blob atomically under the attempt's own name ->
``complete`` in the registry. A worker leaves when nothing is queued or training anywhere in the registry.

What survives what (docs/FLEET.md): a worker killed with kill -9 leaves its users ``training`` under a lease; once the
lease runs out any worker reclaims them, and the driver replaces the dead actor. A driver killed takes its actors
with it (Ray ties them to their owner); the same command again finds every finished user registered, reclaims the
interrupted ones when their leases run out and trains the rest. A late ``complete`` from an attempt presumed dead is
refused by the registry (exactly once), and its blob, written under that attempt's name, is removed.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from lowra.device_runtime._files import atomic_write_bytes
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.errors import ConfigError, DatasetError, LowraError
from lowra.sdk.fleet.gate import GateConfig
from lowra.sdk.fleet.memory import ModelShape, fit_workers, training_bytes_per_user, worker_bytes
from lowra.sdk.fleet.registry import (
    IN_FLIGHT,
    AdapterResult,
    Claim,
    Registry,
    StaleAttemptError,
    registry_url,
)
from lowra.sdk.fleet.report import FleetRun, WorkerStats
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.threads import available_cores, plan_threads, thread_env
from lowra.sdk.training.config import TrainConfig

BLOB_FOLDER = "blobs"
DEFAULT_LEASE_SECONDS = 600.0  # a batch renews its leases every third of this; a dead worker's users wait this long
IDLE_POLL_SECONDS = 1.0  # how often an idle worker looks for reclaimable users, and the driver refreshes its bar
RESTARTS_PER_WORKER = 3  # dead actors replaced before the driver gives up (a base that cannot load kills every one)


class FleetError(LowraError):
    """The fleet job cannot go on (every worker keeps dying, or no Ray cluster to run on)."""


# A base source is a picklable zero-argument callable returning ``(model, tokenizer)``: each worker calls it once.
# A source with a ``shape()`` method (returning a ModelShape) lets the driver size workers by memory before starting
# them; without one the workers start unplanned.
BaseSource = Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class CliBase:
    """The CLI's base: ``--base`` (a Hugging Face folder, default the embedded SmolLM2) and, with
    ``--quantized-base``, its low-bit linears, exactly as ``lowra train`` loads them."""

    base: str | None = None
    quantized_base: str | None = None

    def __call__(self) -> tuple[Any, Any]:
        from lowra.sdk.base_model import load_base

        loaded = load_base(self.base)
        if self.quantized_base:
            from lowra.sdk.quant.lowbit_linear import load_quantized_base

            load_quantized_base(loaded.model, self.quantized_base)
        return loaded.model, loaded.tokenizer

    def shape(self) -> ModelShape:
        """The base's sizes from its config.json, without loading weights (the driver's memory plan)."""
        from lowra.sdk.base_model import resolve_base

        return ModelShape.from_folder(resolve_base(self.base))


@dataclass(frozen=True)
class FleetSettings:
    """What every worker needs to know (sent to each actor; nothing here is a torch object)."""

    registry: str
    out: str
    base: BaseSource = field(default_factory=CliBase)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)  # the demo's: 1 bit, input-weighted
    gate: GateConfig = field(default_factory=GateConfig)
    batch_users: int = 4
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    sign_key: str | None = None  # sign each blob for its user (the dataset's id), sequence = registry version

    def __post_init__(self) -> None:
        if isinstance(self.batch_users, bool) or not isinstance(self.batch_users, int) or self.batch_users < 1:
            raise ConfigError(f"--batch-users must be an integer >= 1, got {self.batch_users!r}")
        if self.lora.dropout > 0:
            raise ConfigError(f"fleet training batches users, which needs LoRA dropout 0 (got {self.lora.dropout})")
        if not (isinstance(self.lease_seconds, (int, float)) and self.lease_seconds > 0):
            raise ConfigError(f"lease_seconds must be > 0, got {self.lease_seconds!r}")
        if self.sign_key is not None and not Path(self.sign_key).is_file():
            raise FileNotFoundError(f"--sign-key {self.sign_key} does not exist; make one with `lowra keys new`")




# ------------------------------------------------------------------------------------------------ worker
class _Heartbeat:
    """Renews the leases of the batch in hand every third of a lease, so only a dead worker's users expire."""

    def __init__(self, registry: Registry, lease_seconds: float) -> None:
        self._registry, self._lease = registry, lease_seconds
        self._claims: list[Claim] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lowra-lease-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, claims: list[Claim]) -> None:
        with self._lock:
            self._claims = list(claims)

    def _loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            with self._lock:
                claims = list(self._claims)
            for claim in claims:
                try:
                    self._registry.renew(claim.attempt_id, self._lease)
                except StaleAttemptError:
                    pass  # finished meanwhile, or reclaimed: complete() will say so

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FleetWorker:
    """One worker: the base loaded once, then batches of claimed users until the registry has nothing in flight.

    A plain class (tests run it in-process); :func:`run_fleet` makes it a Ray actor."""

    def __init__(self, settings: FleetSettings, threads: int, device: str = "cpu") -> None:
        import torch

        torch.set_num_threads(threads)
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.model, self.tokenizer = settings.base()
        self.model.to(device)
        self.registry = Registry(settings.registry)
        self.blobs = Path(settings.out) / BLOB_FOLDER
        self._fingerprints: dict[tuple[str, ...], str] = {}
        self._signing_key = None
        if settings.sign_key is not None:
            from lowra.sdk.signing import load_private_key

            self._signing_key = load_private_key(settings.sign_key)

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> WorkerStats:
        start = time.perf_counter()
        counts = {"completed": 0, "failed": 0, "dropped": 0}
        heartbeat = _Heartbeat(self.registry, self.settings.lease_seconds)
        try:
            while True:
                claims = self._claim_batch()
                if not claims:
                    latest = self.registry.status().latest
                    if not any(latest[state] for state in IN_FLIGHT):
                        break
                    time.sleep(IDLE_POLL_SECONDS)  # another worker's users, or a dead one's lease to run out
                    continue
                heartbeat.hold(claims)
                for outcome in self._run_batch(claims):
                    counts[outcome] += 1
                heartbeat.hold([])
        finally:
            heartbeat.stop()
        return WorkerStats(self.worker_id, seconds=time.perf_counter() - start, **counts)

    def _claim_batch(self) -> list[Claim]:
        claims: list[Claim] = []
        while len(claims) < self.settings.batch_users:
            claim = self.registry.claim_next(self.worker_id, self.settings.lease_seconds)
            if claim is None:
                break
            claims.append(claim)
        return claims

    def _fail(self, claim: Claim, reason: str) -> str:
        try:
            self.registry.fail(claim.attempt_id, reason)
        except StaleAttemptError:
            return "dropped"
        return "failed"

    def _run_batch(self, claims: list[Claim]) -> list[str]:
        """Train the claimed users together; every claim ends completed, failed or dropped (never left hanging)."""
        from lowra.sdk.adapters.model import adapter_names, delete_adapter
        from lowra.sdk.fleet.train import train_users

        outcomes: list[str] = []
        ready = []
        for claim in claims:
            try:
                ready.append((claim, self._load(claim, slot=len(ready))))
            except DatasetError as exc:
                outcomes.append(self._fail(claim, str(exc)))
        if not ready:
            return outcomes
        try:
            try:
                results = train_users(self.model, self.tokenizer, [dataset for _, dataset in ready],
                                      self.settings.lora, self.settings.train, progress=False)
            except Exception as exc:  # e.g. out of memory: these users fail with the reason, the worker goes on
                reason = f"training the batch of {len(ready)} users failed: {type(exc).__name__}: {exc}"
                return outcomes + [self._fail(claim, reason) for claim, _ in ready]
            for claim, dataset in ready:
                try:
                    outcomes.append(self._finish_user(claim, dataset, results[dataset.user_id], len(ready)))
                except StaleAttemptError:
                    outcomes.append("dropped")
                except Exception as exc:  # one user's broken blob must not stop the fleet; its reason is kept
                    outcomes.append(self._fail(claim, f"{type(exc).__name__}: {exc}"))
            return outcomes
        finally:
            for name in adapter_names(self.model):
                delete_adapter(self.model, name)

    def _load(self, claim: Claim, slot: int) -> Any:
        """The claim's dataset, checked as training will use it; named by its slot in the batch (user ids may hold
        '.', which adapter names cannot)."""
        from lowra.sdk.training.data import encode_example, load_user_dataset

        dataset = load_user_dataset(claim.dataset_path)
        if dataset.user_id != claim.user_id:
            raise DatasetError(f"{claim.dataset_path} now names user {dataset.user_id!r}, registered as "
                               f"{claim.user_id!r}; register the inputs again")
        if not dataset.heldout:
            raise DatasetError(f"{claim.dataset_path} has no held-out examples; the gate needs them to decide")
        for example in dataset.train + dataset.heldout:
            encode_example(self.tokenizer, example, self.settings.train.max_len)
        return replace(dataset, user_id=f"slot{slot}")

    def _fingerprint(self, modules: list[str]) -> str:
        from lowra.sdk.workflow import model_fingerprint

        key = tuple(modules)
        if key not in self._fingerprints:
            self._fingerprints[key] = model_fingerprint(self.model, modules)
        return self._fingerprints[key]

    def _finish_user(self, claim: Claim, dataset: Any, result: Any, batch_size: int) -> str:
        from lowra.sdk.adapters.model import (
            delete_adapter,
            get_adapter_factors,
            set_active_adapters,
        )
        from lowra.sdk.cli.report import retained_gain
        from lowra.sdk.fleet.gate import gate_adapter
        from lowra.sdk.training.train import evaluate_loss
        from lowra.sdk.workflow import apply_blob, compress_factors

        settings, slot = self.settings, dataset.user_id
        started = time.perf_counter()

        def heldout_loss(adapter: str | None) -> float:
            set_active_adapters(self.model, adapter)
            return evaluate_loss(self.model, self.tokenizer, dataset.heldout, settings.train.max_len,
                                 settings.train.eval_batch_size)

        factors = get_adapter_factors(self.model, slot)
        card: dict[str, Any] = {"task": dataset.card.get("task", ""),
                                "data": {"user": claim.user_id, "n_train": len(dataset.train),
                                         "n_heldout": len(dataset.heldout)}}
        compressed = compress_factors(factors, settings.lora, settings.compress, adapter_id=claim.user_id,
                                      base_fingerprint=self._fingerprint(list(factors)),
                                      input_stats=result.input_stats, card=card)
        losses = {"base": heldout_loss(None), "fp_adapter": heldout_loss(slot)}
        apply_blob(self.model, compressed.blob, "compressed")
        losses["compressed"] = heldout_loss("compressed")
        delete_adapter(self.model, "compressed")
        retained = retained_gain(losses["base"], losses["fp_adapter"], losses["compressed"])
        card.update(heldout_loss=losses, retained_gain=retained if math.isfinite(retained) else None)
        compressed = compressed.with_card(card)
        decision = gate_adapter(losses["base"], losses["fp_adapter"], losses["compressed"], settings.gate)

        data = compressed.blob_bytes
        if self._signing_key is not None:
            from lowra.sdk.signing import sign_bytes

            data = sign_bytes(data, self._signing_key, user_id=claim.user_id, sequence=claim.version)
        path = atomic_write_bytes(self.blobs / claim.blob_name, data)
        report = compressed.report
        registry_card = {
            **card,
            "bits": {"effective": report["effective_bits"], "code": report["code_bits"],
                     "with_signature": 8.0 * len(data) / report["n_params"]},
            "train": {"steps": settings.train.steps, "final_loss": result.losses[-1], "batch_users": batch_size,
                      "seconds": result.seconds},
            "seconds": {"train_per_user": result.seconds / batch_size,
                        "compress_eval": time.perf_counter() - started},
            "signed": self._signing_key is not None,
            "worker": self.worker_id,
        }
        try:
            self.registry.complete(claim.attempt_id, AdapterResult(
                path, hashlib.sha256(data).hexdigest(), compressed.blob.base_fingerprint,
                float(report["effective_bits"]), registry_card), decision)
        except StaleAttemptError:
            path.unlink(missing_ok=True)  # this attempt's own file: nothing else ever points at it
            raise
        return "completed"


# ------------------------------------------------------------------------------------------------ driver
def _start_ray(address: str | None, cores: int) -> bool:
    """Connect to ``address``, or start a local Ray on ``cores`` CPUs; False when Ray was already running here."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    return True


def _node_memory() -> list[int]:
    """Ray's schedulable memory of every alive node, in bytes."""
    import ray

    return [int(node["Resources"].get("memory", 0)) for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("CPU", 0) + node["Resources"].get("GPU", 0) > 0]


def plan_memory(settings: FleetSettings, workers: int, node_memory: list[int]) -> tuple[int, int | None]:
    """``(workers that fit, bytes to reserve per worker)``: each worker is a Ray actor with a ``memory`` reservation,
    so Ray never places two where one fits, and the driver starts no more than the nodes hold. Base sources without
    ``shape()`` are not planned (``(workers, None)``)."""
    shape_of = getattr(settings.base, "shape", None)
    if shape_of is None:
        return workers, None
    shape = shape_of()
    per_user = training_bytes_per_user(shape, settings.train.batch_size, settings.train.max_len)
    need = worker_bytes(shape, settings.batch_users, settings.train.batch_size, settings.train.max_len)
    return fit_workers(workers, need, node_memory, batch_users=settings.batch_users, per_user=per_user), need


def _in_flight(registry: Registry) -> int:
    latest = registry.status().latest
    return sum(latest[state] for state in IN_FLIGHT)


def run_fleet(users: str | os.PathLike[str], settings: FleetSettings, *, address: str | None = None,
              workers: int | None = None, threads: int | None = None, progress: bool = True,
              on_started: Callable[[list[int]], None] | None = None) -> FleetRun:
    """Queue the users of a folder or JSONL manifest in the registry and train every queued one on Ray.

    Locally (no ``address``, no Ray running yet) Ray starts on the cores this process may use, split by
    :func:`~lowra.sdk.threads.plan_threads`; with ``address`` (or a Ray already initialised) the cluster's CPUs are
    split, or one worker per GPU when it has GPUs. ``on_started`` gets the workers' process ids (tests kill them).
    The report (``report.md``, ``report.json``, ``report.png``) goes to ``settings.out``.
    """
    import ray
    from lowra.sdk.fleet.report import write_fleet_report
    from ray.exceptions import RayActorError
    from tqdm.auto import tqdm

    start = time.perf_counter()
    # Workers may run elsewhere (another cwd, another machine on a shared file system): absolute paths only.
    settings = replace(settings, registry=registry_url(settings.registry), out=str(Path(settings.out).resolve()))
    registry = Registry(settings.registry)
    try:
        inputs = registry.register_inputs(Path(users).expanduser().resolve())
        job_users = tuple(sorted({*inputs.queued, *inputs.failed, *inputs.unchanged}))
        started_ray = _start_ray(address, available_cores())
        try:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            plan = plan_threads(int(resources.get("CPU", 1)), workers or (gpus or None), threads)
            fitting, need = plan_memory(settings, plan.workers, _node_memory())
            if fitting < plan.workers:
                print(f"lowra fleet: {plan.workers} workers x ~{need / 2**30:.1f} GiB (K={settings.batch_users} "
                      f"users each) do not fit in this cluster's memory; starting {fitting}", file=sys.stderr)
                plan = replace(plan, workers=fitting)
            device = "cuda" if gpus else "cpu"
            actor = ray.remote(FleetWorker).options(
                num_cpus=plan.threads, num_gpus=1 if gpus else 0, runtime_env={"env_vars": thread_env(plan.threads)},
                **({"memory": need} if need else {}))

            def spawn() -> Any:
                return actor.remote(settings, plan.threads, device)

            pending_total = _in_flight(registry)
            bar = tqdm(total=pending_total, desc="fleet users", unit="user", disable=not progress)
            handles = [spawn() for _ in range(plan.workers)]
            if on_started is not None:
                on_started(ray.get([h.pid.remote() for h in handles]))
            running = {h.run.remote(): h for h in handles}
            stats: list[WorkerStats] = []
            restarts = 0
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=IDLE_POLL_SECONDS)
                for ref in done:
                    running.pop(ref)
                    try:
                        stats.append(ray.get(ref))
                    except RayActorError as exc:
                        restarts += 1
                        if restarts > RESTARTS_PER_WORKER * plan.workers:
                            raise FleetError(f"{restarts} fleet workers died (last: {exc}); the users they held are "
                                             "still leased in the registry: fix the cause and run again") from None
                        replacement = spawn()
                        running[replacement.run.remote()] = replacement
                remaining = _in_flight(registry)
                bar.update(max(0, pending_total - remaining - bar.n))
            bar.close()
        finally:
            if started_ray:
                ray.shutdown()
        run = FleetRun(users=job_users, plan=plan, device=device, seconds=time.perf_counter() - start,
                       finished_this_run=pending_total - _in_flight(registry), workers=tuple(stats),
                       restarts=restarts, input_failures=dict(inputs.failed))
        write_fleet_report(Path(settings.out), registry, run)
        return run
    finally:
        registry.close()

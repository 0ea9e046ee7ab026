"""The adapter registry: schema, inputs, claims with leases, exactly-once completion, gating, base retirement, and
resuming after a worker is killed (kill -9) at every step, with two processes claiming from one SQLite file.

The tests of the registry's behaviour run on PostgreSQL too when ``LOWRA_TEST_POSTGRES_URL`` names an empty database
(e.g. ``postgresql+psycopg://user@/db?host=/tmp``) its tables may be dropped in; otherwise those cases are skipped."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from lowra.device_runtime._files import atomic_write_bytes, file_sha256
from lowra.sdk.errors import ConfigError, DatasetError
from lowra.sdk.fleet.gate import gate_adapter
from lowra.sdk.fleet.registry import (SCHEMA_VERSION, AdapterResult, BlobMismatchError, Claim, Registry,
                                      RegistryError, RegistrySchemaError, StaleAttemptError, _Model)

LEASE = 60.0


class Clock:
    """A registry clock the test moves forward, so leases run out without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_user(root: Path, name: str, *, card_id: str | None = None, n_train: int = 8, n_heldout: int = 2,
              train_lines: list[str] | None = None, prompt: str = "hello") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    line = lambda i: json.dumps({"prompt": f"{prompt} {i}", "response": f"reply {i} of {name}"})  # noqa: E731
    lines = train_lines if train_lines is not None else [line(i) for i in range(n_train)]
    (folder / "train.jsonl").write_text("".join(x + "\n" for x in lines))
    (folder / "heldout.jsonl").write_text("".join(line(100 + i) + "\n" for i in range(n_heldout)))
    if card_id is not None:
        (folder / "user.json").write_text(json.dumps({"id": card_id, "task": "test"}))
    return folder


def write_blob(folder: Path, claim: Claim, content: bytes = b"blob") -> AdapterResult:
    path = atomic_write_bytes(folder / claim.blob_name, content + claim.blob_name.encode())
    return AdapterResult(path, file_sha256(path), "base-1", 1.0, {"heldout_loss": {"base": 4.0}})


@pytest.fixture
def clock() -> Clock:
    return Clock()


POSTGRES_ENV = "LOWRA_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh registry database: a SQLite file, or the PostgreSQL database of $LOWRA_TEST_POSTGRES_URL emptied."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} to a PostgreSQL database URL to run the registry tests on PostgreSQL too")
    engine = create_engine(url)
    _Model.metadata.drop_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def registry(database: str, clock: Clock):
    with Registry(database, clock=clock) as reg:
        yield reg


@pytest.fixture
def users(tmp_path: Path) -> Path:
    root = tmp_path / "users"
    for name in ("alice", "bob", "carol"):
        make_user(root, name)
    return root


# ------------------------------------------------------------------------------------------------ schema
def test_a_new_registry_is_a_wal_sqlite_file_with_foreign_keys(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "fleet.db")
    with sqlite3.connect(tmp_path / "fleet.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT version FROM lowra_schema").fetchall() == [(SCHEMA_VERSION,)]
    with registry._engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        with pytest.raises(IntegrityError):
            conn.execute(text("INSERT INTO lowra_attempts (version_id, worker_id, started, lease_expires, reason) "
                              "VALUES (999, 'w', '2026-01-01', '2026-01-01', '')"))
    registry.close()


def test_reopening_keeps_the_data(tmp_path: Path, users: Path, clock: Clock) -> None:
    with Registry(tmp_path / "fleet.db", clock=clock) as reg:
        reg.register_inputs(users)
    with Registry(f"sqlite:///{tmp_path / 'fleet.db'}", clock=clock) as reg:
        assert reg.status().latest["queued"] == 3


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path / "fleet.db").close()
    with sqlite3.connect(tmp_path / "fleet.db") as db:
        db.execute("UPDATE lowra_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(RegistrySchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer .* upgrade lowra"):
        Registry(tmp_path / "fleet.db")


def test_lowra_tables_without_a_schema_version_are_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE lowra_users (id TEXT)")
    with pytest.raises(RegistrySchemaError, match="no lowra_schema table"):
        Registry(tmp_path / "other.db")


def test_an_unusable_url_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="expected a file path or a database URL"):
        Registry("nosuchdialect://host/db")


# ------------------------------------------------------------------------------------------------ inputs
def test_bad_inputs_fail_their_user_with_a_reason_and_the_rest_are_queued(
        tmp_path: Path, registry: Registry, tiny_tokenizer) -> None:
    root = tmp_path / "users"
    make_user(root, "alice")
    make_user(root, "bob")
    make_user(root, "empty", train_lines=[])
    make_user(root, "broken", train_lines=['{"prompt": "a", "response": "b"}', "{not json"])
    make_user(root, "verbose", prompt="a very long prompt " * 40)
    make_user(root, "twin_a", card_id="twin")
    make_user(root, "twin_b", card_id="twin")
    make_user(root, "slashed", card_id="../escape")

    report = registry.register_inputs(root, tokenizer=tiny_tokenizer, max_len=64)

    assert report.queued == ("alice", "bob")
    assert set(report.failed) == {"empty", "broken", "verbose", "twin", "../escape"}
    assert "has 0 examples; at least 8" in report.failed["empty"]
    assert "train.jsonl:2: invalid JSON" in report.failed["broken"]
    assert "leaving no room for the response within max_len=64" in report.failed["verbose"]
    assert "is given by 2 datasets" in report.failed["twin"] and "twin_a" in report.failed["twin"]
    assert "is not a valid id" in report.failed["../escape"]
    with pytest.raises(RegistryError, match="cannot be trained"):
        registry.retry("../escape")
    for user_id, reason in report.failed.items():
        (version,) = registry.history(user_id)
        assert (version.version, version.status, version.reason) == (1, "failed", reason)
    status = registry.status()
    assert status.users == 7
    assert status.latest == {"queued": 2, "training": 0, "trained": 0, "gated_out": 0, "active": 0, "retired": 0,
                             "failed": 5}
    assert registry.history("alice")[0].card["data"] == {"user": "alice", "n_train": 8, "n_heldout": 2}

    again = registry.register_inputs(root, tokenizer=tiny_tokenizer, max_len=64)  # the rerun of the same command
    assert again.queued == () and again.failed == {}
    assert sorted(again.unchanged) == sorted(["alice", "bob", *report.failed])
    assert all(len(registry.history(u)) == 1 for u in ["alice", "bob", *report.failed])


def test_a_jsonl_manifest_names_the_user_folders(tmp_path: Path, users: Path, registry: Registry) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "users/alice"}\n\n' + json.dumps({"path": str(users / "bob")}) + "\n")
    report = registry.register_inputs(manifest)
    assert report.queued == ("alice", "bob")
    assert registry.history("alice")[0].dataset_path == str(users / "alice")


def test_a_broken_manifest_registers_nothing(tmp_path: Path, registry: Registry) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"path": "users/alice"}\n{"folder": "users/bob"}\n')
    with pytest.raises(DatasetError, match=r"manifest.jsonl:2: expected \{\"path\": FOLDER\}"):
        registry.register_inputs(manifest)
    assert registry.status().users == 0
    with pytest.raises(DatasetError, match="does not exist"):
        registry.register_inputs(tmp_path / "missing.jsonl")


def test_new_data_queues_a_new_version(tmp_path: Path, users: Path, registry: Registry) -> None:
    registry.register_inputs(users)
    while (claim := registry.claim_next("w", LEASE)) is not None:
        registry.complete(claim.attempt_id, write_blob(tmp_path / "blobs", claim))
    with (users / "alice" / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({"prompt": "new", "response": "data"}) + "\n")
    report = registry.register_inputs(users)
    assert report.queued == ("alice",) and report.unchanged == ("bob", "carol")
    assert [(v.version, v.status) for v in registry.history("alice")] == [(1, "trained"), (2, "queued")]


# ------------------------------------------------------------------------------------------------ claims
def test_claims_take_each_user_once_in_order(registry: Registry, users: Path) -> None:
    registry.register_inputs(users)
    claims = [registry.claim_next(f"w{i}", LEASE) for i in range(4)]
    assert [c.user_id for c in claims[:3]] == ["alice", "bob", "carol"] and claims[3] is None
    assert claims[0].dataset_path == users / "alice"
    assert claims[0].blob_name == f"alice/v1-attempt{claims[0].attempt_id}.lowra"
    assert registry.status().latest["training"] == 3


def test_a_killed_workers_user_is_reclaimed_after_its_lease_and_its_result_refused(
        tmp_path: Path, registry: Registry, users: Path, clock: Clock) -> None:
    registry.register_inputs(users)
    dead = registry.claim_next("dead", LEASE)
    clock.advance(LEASE / 2)
    assert registry.claim_next("w2", LEASE).user_id == "bob"  # alice's lease still runs
    clock.advance(LEASE / 2)
    taken = registry.claim_next("w3", LEASE)
    assert (taken.user_id, taken.version) == ("alice", 1) and taken.attempt_id != dead.attempt_id

    late = write_blob(tmp_path / "blobs", dead)
    with pytest.raises(StaleAttemptError, match="already ended \\(expired"):
        registry.complete(dead.attempt_id, late)
    with pytest.raises(StaleAttemptError):
        registry.renew(dead.attempt_id, LEASE)
    with pytest.raises(StaleAttemptError):
        registry.fail(dead.attempt_id, "too late")
    info = registry.complete(taken.attempt_id, write_blob(tmp_path / "blobs", taken))
    assert (info.status, info.attempts, info.blob_path) == ("trained", 2, str(tmp_path / "blobs" / taken.blob_name))
    with pytest.raises(StaleAttemptError, match="completed"):
        registry.complete(taken.attempt_id, write_blob(tmp_path / "again", taken))
    assert len(registry.history("alice")) == 1


def test_a_renewed_lease_is_not_reclaimed(registry: Registry, users: Path, clock: Clock) -> None:
    registry.register_inputs(users)
    claim = registry.claim_next("w1", LEASE)
    clock.advance(LEASE - 1)
    registry.renew(claim.attempt_id, LEASE)
    clock.advance(LEASE - 1)
    assert registry.claim_next("w2", LEASE).user_id == "bob"


def test_a_late_but_unchallenged_completion_is_accepted(tmp_path: Path, registry: Registry, users: Path,
                                                         clock: Clock) -> None:
    registry.register_inputs(users)
    claim = registry.claim_next("slow", LEASE)
    clock.advance(10 * LEASE)  # nobody reclaimed it: it is still the current attempt, and registers once
    assert registry.complete(claim.attempt_id, write_blob(tmp_path, claim)).status == "trained"


def test_a_user_that_keeps_killing_its_worker_fails_after_max_attempts(database: str, users: Path,
                                                                      clock: Clock) -> None:
    with Registry(database, clock=clock, max_attempts=2) as registry:
        registry.register_inputs(users)
        for _ in range(2):
            assert registry.claim_next("w", LEASE).user_id == "alice"
            clock.advance(LEASE)
        assert registry.claim_next("w", LEASE).user_id == "bob"  # alice's second lease ran out: she failed
        (version,) = registry.history("alice")
        assert version.status == "failed" and "2 attempts ran past their lease" in version.reason
        assert registry.retry("alice") == 2


def test_claim_arguments_are_checked(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="worker_id"):
        registry.claim_next("", LEASE)
    with pytest.raises(ConfigError, match="lease_seconds"):
        registry.claim_next("w", 0)


# ------------------------------------------------------------------------------------------------ completion
def test_only_a_fully_written_blob_with_the_reported_sha256_is_registered(
        tmp_path: Path, registry: Registry, users: Path) -> None:
    registry.register_inputs(users)
    claim = registry.claim_next("w", LEASE)
    result = write_blob(tmp_path, claim)
    (tmp_path / claim.blob_name).write_bytes(b"half")  # e.g. a writer that did not write atomically
    with pytest.raises(BlobMismatchError, match="not fully written"):
        registry.complete(claim.attempt_id, result)
    missing = AdapterResult(tmp_path / "nowhere.lowra", result.blob_sha256, "base-1", 1.0)
    with pytest.raises(BlobMismatchError, match="does not exist"):
        registry.complete(claim.attempt_id, missing)
    assert registry.history("alice")[0].status == "training"  # nothing registered; the attempt can still finish
    info = registry.complete(claim.attempt_id, write_blob(tmp_path / "ok", claim))
    assert info.bytes == (tmp_path / "ok" / claim.blob_name).stat().st_size
    assert (info.base_fingerprint, info.bits, info.card["heldout_loss"]) == ("base-1", 1.0, {"base": 4.0})
    assert info.card["data"]["user"] == "alice"


@pytest.mark.parametrize("kwargs,match", [({"blob_sha256": "abc"}, "64 lowercase hex"),
                                          ({"base_fingerprint": ""}, "base_fingerprint"),
                                          ({"bits": float("nan")}, "bits")])
def test_results_are_validated(kwargs: dict[str, object], match: str) -> None:
    fields = {"blob_path": Path("b"), "blob_sha256": "0" * 64, "base_fingerprint": "base-1", "bits": 1.0}
    with pytest.raises(ConfigError, match=match):
        AdapterResult(**{**fields, **kwargs})  # type: ignore[arg-type]


def test_a_failed_user_is_retried_under_a_new_version(registry: Registry, users: Path) -> None:
    registry.register_inputs(users)
    claim = registry.claim_next("w", LEASE)
    registry.fail(claim.attempt_id, "training diverged (loss nan at step 3)")
    (v1,) = registry.history("alice")
    assert (v1.status, v1.reason) == ("failed", "training diverged (loss nan at step 3)")
    assert registry.retry("alice") == 2
    assert registry.retry("alice") == 2  # already queued: nothing added
    assert [v.status for v in registry.history("alice")] == ["failed", "queued"]
    assert registry.history("alice")[1].card["data"]["user"] == "alice"
    with pytest.raises(RegistryError, match="no user 'nobody'"):
        registry.retry("nobody")
    with pytest.raises(ConfigError, match="reason"):
        registry.fail(registry.claim_next("w", LEASE).attempt_id, " ")


# ------------------------------------------------------------------------------------------------ gate
def test_the_gate_decides_active_or_gated_out_and_a_new_active_retires_the_old(
        tmp_path: Path, registry: Registry, users: Path) -> None:
    registry.register_inputs(users)
    alice, bob, carol = (registry.claim_next("w", LEASE) for _ in range(3))
    shipped = registry.complete(alice.attempt_id, write_blob(tmp_path, alice), gate_adapter(4.0, 1.0, 1.1))
    assert shipped.status == "active" and shipped.reason.startswith("ships:")
    assert shipped.card["gate"]["ships"] is True
    rejected = registry.complete(bob.attempt_id, write_blob(tmp_path, bob), gate_adapter(4.0, 1.0, 2.0))
    assert rejected.status == "gated_out" and "keeps 66.7% of the fp adapter's gain" in rejected.reason
    registry.complete(carol.attempt_id, write_blob(tmp_path, carol))
    assert registry.apply_gate("carol", 1, gate_adapter(4.0, 1.0, 1.0)).status == "active"
    with pytest.raises(RegistryError, match="is active; only a trained version"):
        registry.apply_gate("carol", 1, gate_adapter(4.0, 1.0, 1.0))

    with pytest.raises(RegistryError, match="is active; retry queues failed"):
        registry.retry("alice")
    (users / "alice" / "user.json").write_text(json.dumps({"task": "new data"}))
    registry.register_inputs(users)
    second = registry.claim_next("w", LEASE)
    registry.complete(second.attempt_id, write_blob(tmp_path, second), gate_adapter(4.0, 1.0, 1.0))
    assert [(v.version, v.status, v.reason) for v in registry.history("alice")] == [
        (1, "retired", "superseded by version 2"), (2, "active", registry.history("alice")[1].reason)]
    status = registry.status()
    assert (status.serving, status.latest["active"], status.latest["gated_out"]) == (2, 2, 1)


# ------------------------------------------------------------------------------------------------ bases
def test_retiring_a_base_retires_its_adapters_and_queues_their_users(
        tmp_path: Path, registry: Registry, clock: Clock) -> None:
    root = tmp_path / "users"
    for name in ("ann", "ben", "cat", "dan"):
        make_user(root, name)
    registry.register_inputs(root)
    ann, ben, cat, dan = (registry.claim_next("w", LEASE) for _ in range(4))
    registry.complete(ann.attempt_id, write_blob(tmp_path, ann), gate_adapter(4.0, 1.0, 1.0))
    registry.complete(ben.attempt_id, write_blob(tmp_path, ben), gate_adapter(4.0, 1.0, 3.9))
    on_new_base = write_blob(tmp_path, cat)
    registry.complete(cat.attempt_id, AdapterResult(on_new_base.blob_path, on_new_base.blob_sha256, "base-2", 1.0))
    clock.advance(1)

    assert registry.retire_base("base-1") == ["ann", "ben"]
    for user in ("ann", "ben"):
        old, new = registry.history(user)
        assert (old.status, old.reason) == ("retired", "base base-1 retired")
        assert (new.version, new.status, new.dataset_path) == (2, "queued", old.dataset_path)
    assert [v.status for v in registry.history("cat")] == ["trained"]
    assert registry.retire_base("base-1") == []  # again: nothing more to do

    # dan was training on the old base when it was retired: it registers as retired and is queued again
    late = registry.complete(dan.attempt_id, write_blob(tmp_path, dan))
    assert late.status == "retired" and "retired at" in late.reason
    assert [v.status for v in registry.history("dan")] == ["retired", "queued"]
    assert registry.status().latest == {"queued": 3, "training": 0, "trained": 1, "gated_out": 0, "active": 0,
                                        "retired": 0, "failed": 0}
    assert registry.status().serving == 0


# ------------------------------------------------------------------------------------------------ processes
WORKER = r'''
import os, signal, sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from lowra.device_runtime._files import atomic_file, atomic_write_bytes, file_sha256
from lowra.sdk.fleet.registry import AdapterResult, Registry

url, blobs, kill_user, kill_step, offset = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
clock = lambda: datetime.now(timezone.utc) + timedelta(seconds=offset)

def step(name, user):
    if (user, name) == (kill_user, kill_step):
        os.kill(os.getpid(), signal.SIGKILL)

with Registry(url, clock=clock) as registry:
    while (claim := registry.claim_next(f"worker-{os.getpid()}", lease_seconds=60)) is not None:
        step("claim", claim.user_id)
        blob = f"adapter of {claim.user_id} ".encode() * 4096  # "training"
        step("train", claim.user_id)
        path = blobs / claim.blob_name
        if (claim.user_id, "write") == (kill_user, kill_step):
            with atomic_file(path) as tmp:
                tmp.write_bytes(blob[: len(blob) // 2])
                step("write", claim.user_id)
        atomic_write_bytes(path, blob)
        step("written", claim.user_id)
        registry.complete(claim.attempt_id, AdapterResult(path, file_sha256(path), "base-1", 1.0))
        step("registered", claim.user_id)
'''


def run_worker(tmp_path: Path, database: str, kill_user: str = "", kill_step: str = "", offset: float = 0.0) -> int:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [sys.executable, str(script), database, str(tmp_path / "blobs"), kill_user, kill_step, str(offset)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


@pytest.mark.parametrize("kill_step", ["claim", "train", "write", "written", "registered"])
def test_a_worker_killed_at_any_step_is_resumed_and_every_user_trains_exactly_once(
        tmp_path: Path, database: str, users: Path, kill_step: str) -> None:
    with Registry(database) as registry:
        registry.register_inputs(users)
    assert run_worker(tmp_path, database, kill_user="bob", kill_step=kill_step) == -signal.SIGKILL
    # The same command again, once the killed worker's lease (60 s) ran out: the driver re-registers the same
    # inputs (nothing new) and a worker takes over.
    with Registry(database) as registry:
        assert registry.register_inputs(users).queued == ()
    assert run_worker(tmp_path, database, offset=120) == 0

    with Registry(database) as registry:
        assert registry.status().latest["trained"] == 3 and registry.status().users == 3
        for user in ("alice", "bob", "carol"):
            (version,) = registry.history(user)  # one version each: none lost, none duplicated
            assert version.status == "trained"
            blob = Path(version.blob_path)
            assert file_sha256(blob) == version.blob_sha256 and blob.stat().st_size == version.bytes
            assert blob.read_bytes() == f"adapter of {user} ".encode() * 4096  # the whole blob, never half
            expected_attempts = 2 if user == "bob" and kill_step != "registered" else 1
            assert version.attempts == expected_attempts
        registered = Path(registry.history("bob")[0].blob_path).name
    bob_blobs = sorted(p.name for p in (tmp_path / "blobs" / "bob").iterdir())
    if kill_step == "write":  # the half-written temporary file is there, never under a final name, never registered
        assert any(name.startswith(".v1-attempt") and ".tmp-" in name for name in bob_blobs)
    final_names = [name for name in bob_blobs if not name.startswith(".")]
    assert registered in final_names
    assert len(final_names) == (2 if kill_step == "written" else 1)  # an unregistered complete blob may remain


CLAIMER = r'''
import json, sys, time
from lowra.sdk.fleet.registry import Registry

with Registry(sys.argv[1]) as registry:
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start claiming together
    claimed = []
    while (claim := registry.claim_next(sys.argv[2], lease_seconds=600)) is not None:
        claimed.append(claim.user_id)
        time.sleep(0.002)
    print(json.dumps(claimed), flush=True)
'''


def test_two_processes_claiming_at_once_never_get_the_same_user(tmp_path: Path, database: str) -> None:
    root = tmp_path / "users"
    names = [f"user{i:02d}" for i in range(40)]
    for name in names:
        make_user(root, name)
    with Registry(database) as registry:
        assert len(registry.register_inputs(root).queued) == 40
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)
    procs = [subprocess.Popen([sys.executable, str(script), database, f"w{i}"], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    claimed = [json.loads(out) for out, _ in outputs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == names
    assert claimed[0] and claimed[1]  # both really claimed, concurrently
    with Registry(database) as registry:
        assert registry.status().latest["training"] == 40
        assert all(registry.history(name)[0].attempts == 1 for name in names)

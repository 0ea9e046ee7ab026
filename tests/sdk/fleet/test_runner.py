"""``lowra fleet`` on a local Ray cluster of 2 workers with the tiny model: every user ends trained exactly once, with
a complete blob, after a worker is killed (kill -9) mid-run and after the driver is killed mid-run and the same
command is run again; bad users fail with their reason while the job goes on; the report and the CLI's status,
retry and retire read the registry.

One Ray session serves the module (starting Ray costs seconds); the killed driver and its rerun join it by address.
Leases are a few seconds so a killed worker's users are reclaimed quickly."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import ray

from lowra.device_runtime._files import file_sha256
from lowra.device_runtime.formats.adapter import parse_blob
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.cli.main import main
from lowra.sdk.errors import ConfigError
from lowra.sdk.fleet.gate import GateConfig
from lowra.sdk.fleet.memory import ModelShape
from lowra.sdk.fleet.registry import Registry
from lowra.sdk.fleet.runner import BLOB_FOLDER, FleetSettings, run_fleet
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.training.config import TrainConfig

from tests.conftest import _build_tokenizer, build_tiny_model, run_with_blocked_imports, write_user_dir

REPO = Path(__file__).resolve().parents[3]
LEASE = 3.0
GOOD_USERS = [f"user{i}" for i in range(6)]


def tiny_base() -> tuple:
    """The workers' base (imported by reference in each Ray worker: the repository root is on their path)."""
    return build_tiny_model(), _build_tokenizer()


@dataclass(frozen=True)
class ShapedTinyBase:
    """tiny_base with a ``shape()``, so the driver plans memory and reserves it per Ray actor (as for CliBase);
    ``layers`` overrides the layer count the plan sees (a huge one makes a worker that cannot fit)."""

    layers: int | None = None

    def __call__(self) -> tuple:
        return tiny_base()

    def shape(self) -> ModelShape:
        shape = ModelShape.from_config(build_tiny_model().config.to_dict())
        return shape if self.layers is None else replace(shape, layers=self.layers)


def fleet_settings(root: Path, base=ShapedTinyBase()) -> FleetSettings:
    # bits=8: the tiny model's adapters are so small that a blob's header alone is ~3.6 bits/param.
    return FleetSettings(
        registry=str(root / "fleet.db"), out=str(root / "out"), base=base, lora=LoraConfig(rank=4),
        train=TrainConfig(steps=4, batch_size=4, learning_rate=1e-2, warmup_steps=1, max_len=48),
        compress=CompressConfig(bits=8.0), gate=GateConfig(min_gain_over_base=0.0, min_gain_kept=0.0),
        batch_users=2, lease_seconds=LEASE,
    )


def write_users(root: Path, bad: bool = False) -> Path:
    users = root / "users"
    for name in GOOD_USERS:
        write_user_dir(users / name, n_train=8, n_heldout=2, card=False)
    if bad:
        broken = write_user_dir(users / "broken", card=False)
        (broken / "train.jsonl").write_text('{"prompt": "hi", "response": "there"}\n{not json\n')
        too_long = write_user_dir(users / "too_long", n_train=8, n_heldout=2, card=False)
        with (too_long / "train.jsonl").open("a") as fh:  # one prompt too long to leave room for its response
            fh.write(json.dumps({"prompt": "pizza " * 200, "response": "ok"}) + "\n")
    return users


def run_driver(root: str, address: str) -> None:
    """The driver the test kills and reruns, in its own process (called by ``python -c``)."""
    run_fleet(Path(root) / "users", fleet_settings(Path(root)), address=address, workers=2, progress=False)


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def attempts(db: Path) -> list[tuple[str, int, str | None, str]]:
    """(user, version, outcome, worker) of every attempt, read straight from the SQLite file (none while the
    driver has not created its tables yet)."""
    with sqlite3.connect(db) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'lowra_attempts'").fetchone():
            return []
        return con.execute("SELECT v.user_id, v.version, a.outcome, a.worker_id FROM lowra_attempts a "
                           "JOIN lowra_adapter_versions v ON v.id = a.version_id").fetchall()


def wait_for(predicate, timeout: float = 300.0) -> None:  # generous: a loaded CI machine is slow, a pass is not
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet never reached the state the test waits for")
        time.sleep(0.1)


def assert_each_user_trained_exactly_once(root: Path) -> None:
    db = root / "fleet.db"
    completed = [(user, version) for user, version, outcome, _ in attempts(db) if outcome == "completed"]
    assert sorted(completed) == [(u, 1) for u in GOOD_USERS]  # one completion per user, no second version
    with Registry(db) as registry:
        for user in GOOD_USERS:
            (newest,) = registry.history(user)
            assert newest.status == "active", newest.reason
            blob = Path(newest.blob_path)
            assert blob.parent.parent == root / "out" / BLOB_FOLDER and file_sha256(blob) == newest.blob_sha256
            assert parse_blob(blob.read_bytes(), "test").adapter_id == user
            assert newest.card["heldout_loss"]["compressed"] < newest.card["heldout_loss"]["base"]
    # No blob half-written under a final name: every file that looks like a blob is a complete one.
    for path in (root / "out" / BLOB_FOLDER).rglob("*.lowra"):
        parse_blob(path.read_bytes(), str(path))


def test_a_killed_worker_is_replaced_and_its_users_are_reclaimed(ray_address: str, tmp_path: Path) -> None:
    users = write_users(tmp_path, bad=True)
    db = tmp_path / "fleet.db"
    killed: list[int] = []

    def kill_one_mid_batch(pids: list[int]) -> None:
        def killer() -> None:
            # Once the first worker holds a lease (it is training its batch), kill -9 it.
            wait_for(lambda: any(f":{pids[0]}:" in worker and outcome is None
                                 for _, _, outcome, worker in attempts(db)))
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        threading.Thread(target=killer, daemon=True).start()

    run = run_fleet(users, fleet_settings(tmp_path), workers=2, progress=False, on_started=kill_one_mid_batch)

    assert killed and run.restarts == 1 and run.plan.workers == 2 and run.plan.threads == 1
    outcomes = [outcome for _, _, outcome, worker in attempts(db) if f":{killed[0]}:" in worker]
    assert outcomes and "completed" not in outcomes  # the killed worker's claims ran out and went to others
    assert_each_user_trained_exactly_once(tmp_path)
    with Registry(db) as registry:
        (broken,) = registry.history("broken")
        assert broken.status == "failed" and "invalid JSON" in broken.reason
        (too_long,) = registry.history("too_long")
        assert too_long.status == "failed" and "max_len" in too_long.reason
    report = (tmp_path / "out" / "report.md").read_text()
    assert "users/hour" in report and "| active | 6 |" in report and "too_long" in report
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "out" / "report.json").read_text())["users"]) == 8


def test_a_killed_driver_resumes_with_the_same_command(ray_address: str, tmp_path: Path) -> None:
    write_users(tmp_path)
    command = [sys.executable, "-c", "import sys; from tests.sdk.fleet.test_runner import run_driver; "
               "run_driver(sys.argv[1], sys.argv[2])", str(tmp_path), ray_address]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (tmp_path / "fleet.db").exists()
                 and any(outcome == "completed" for *_, outcome, _ in attempts(tmp_path / "fleet.db")))
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done_before = sum(outcome == "completed" for *_, outcome, _ in attempts(tmp_path / "fleet.db"))
    assert done_before < len(GOOD_USERS)  # killed mid-run

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_each_user_trained_exactly_once(tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["users"]) == len(GOOD_USERS) and report["counts"]["active"] == len(GOOD_USERS)


def test_status_retry_and_retire_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    users = write_users(tmp_path, bad=True)
    db = tmp_path / "fleet.db"
    with Registry(db) as registry:
        registry.register_inputs(users)
        claim = registry.claim_next("w", LEASE)
        registry.fail(claim.attempt_id, "out of memory")
    assert main(["fleet", "status", "--registry", str(db)]) == 0
    out = capsys.readouterr().out
    assert "8 users" in out and "queued 6" in out and "failed 2" in out
    assert f"{claim.user_id} v1: out of memory" in out and "broken v1:" in out

    assert main(["fleet", "retry", "--registry", str(db), claim.user_id]) == 0
    assert f"{claim.user_id}: version 2 queued" in capsys.readouterr().out
    assert main(["fleet", "retry", "--registry", str(db)]) == 0  # every failed user
    assert "broken: version 2 queued" in capsys.readouterr().out
    assert main(["fleet", "retry", "--registry", str(db), "nobody"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err

    assert main(["fleet", "retire", "--registry", str(db), "--base", "old-base"]) == 0
    assert "0 users queued" in capsys.readouterr().out


def test_fleet_status_and_the_parser_stay_torch_and_ray_free(tmp_path: Path) -> None:
    Registry(tmp_path / "fleet.db").close()
    result = run_with_blocked_imports(
        "import sys\nfrom lowra.sdk.cli.main import main\nassert main(sys.argv[1:]) == 0\n",
        blocked=("torch", "ray", "transformers"), args=("fleet", "status", "--registry", str(tmp_path / "fleet.db")))
    assert result.returncode == 0, result.stderr
    assert "0 users" in result.stdout


def test_a_worker_that_cannot_fit_in_memory_is_refused_before_any_starts(ray_address: str, tmp_path: Path) -> None:
    users = write_users(tmp_path)
    huge = ShapedTinyBase(layers=10**9)  # the plan's activations per user exceed any node
    with pytest.raises(ConfigError, match=r"one fleet worker training 2 users at once needs .*lower the training"):
        run_fleet(users, fleet_settings(tmp_path, huge), workers=2, progress=False)
    assert attempts(tmp_path / "fleet.db") == []  # nothing claimed: the users wait, queued, for a run that fits
    with Registry(tmp_path / "fleet.db") as registry:
        assert registry.status().latest["queued"] == len(GOOD_USERS)

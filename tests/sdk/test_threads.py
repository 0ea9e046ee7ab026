"""Thread sizing: cgroup v1/v2 quotas (tightest along the path), affinity, the override, and plans that never
oversubscribe; and the module stays torch-free (the CLI parser and the Ray driver import it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowra.sdk.errors import ConfigError
from lowra.sdk.threads import available_cores, cgroup_cpu_limit, plan_threads, thread_env

from tests.conftest import run_with_blocked_imports


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_quota_along_the_path(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "0::/job/task\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "job" / "cpu.max", "150000 100000\n")
    write(root / "job" / "task" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    write(root / "job" / "task" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root, proc) is None
    write(root / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(3.0)


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "garbage\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") is None


def test_available_cores_is_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    write(tmp_path / "proc", "0::/\n")
    assert available_cores(cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc") == affinity
    write(tmp_path / "cg" / "cpu.max", "50000 100000\n")  # half a core still runs one thread
    assert available_cores(cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc") == 1
    write(tmp_path / "cg" / "cpu.max", f"{100000 * affinity + 1} 100000\n")
    assert available_cores(cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc") == affinity
    assert available_cores(7) == 7
    with pytest.raises(ConfigError, match="integer >= 1"):
        available_cores(0)


@pytest.mark.parametrize(("cores", "workers", "threads", "expected"), [
    (2, None, None, (1, 2)),
    (1, None, None, (1, 1)),
    (16, None, None, (8, 2)),
    (2, 2, None, (2, 1)),
    (8, None, 3, (2, 3)),
    (8, 3, None, (3, 2)),
    (4, 2, 2, (2, 2)),
])
def test_plans_never_oversubscribe(cores: int, workers: int | None, threads: int | None,
                                   expected: tuple[int, int]) -> None:
    plan = plan_threads(cores, workers, threads)
    assert (plan.workers, plan.threads) == expected
    assert plan.workers * plan.threads <= cores


def test_an_oversubscribed_plan_is_refused_with_a_fix() -> None:
    with pytest.raises(ConfigError, match=r"2 workers x 2 threads = 4 threads on 2 cores.*--workers 1 --threads 2"):
        plan_threads(2, 2, 2)
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        plan_threads(2, 0)
    with pytest.raises(ConfigError, match="more workers than the 3 cores"):
        plan_threads(3, 4)


def test_thread_env_makes_openmp_sleep_at_barriers() -> None:
    assert thread_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_module_never_imports_torch() -> None:
    result = run_with_blocked_imports("from lowra.sdk.threads import available_cores, plan_threads\n"
                                      "print(plan_threads(available_cores()))")
    assert result.returncode == 0, result.stderr
    assert "ThreadPlan" in result.stdout


def test_a_single_process_is_sized_by_threads_then_the_exported_variable_then_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lowra.sdk.threads import size_this_process

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert size_this_process(None) == 1  # the user's export is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert size_this_process(None) == available_cores()
        assert size_this_process(3) == 3 and torch.get_num_threads() == 3  # torch already imported: resized
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"
        with pytest.raises(ConfigError, match=">= 1"):
            size_this_process(0)
    finally:
        torch.set_num_threads(before)


def test_lowra_commands_size_threads_before_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    cli_main = importlib.import_module("lowra.sdk.cli.main")  # the package re-exports main(), hiding the module
    seen: dict[str, str] = {}
    monkeypatch.setitem(cli_main.COMMANDS, "train", lambda args: seen.update(omp=os.environ["OMP_NUM_THREADS"]) or 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    import torch

    before = torch.get_num_threads()
    try:
        assert cli_main.main(["train", "--user", "u", "--out", "o", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == {"omp": "1"}
    assert cli_main.main(["train", "--user", "u", "--out", "o", "--threads", "0"]) == 2  # refused, with a message

"""Atomic writes: a kill at any point leaves the old or the new output, leftovers are cleaned, modes follow umask."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lowra.device_runtime._files import atomic_dir, atomic_write_bytes, cache_dir, clean_leftovers, private_file
from lowra.device_runtime.errors import OutputExistsError


def test_file_write_replaces_only_with_overwrite_and_gets_umask_mode(tmp_path):
    target = tmp_path / "out" / "a.bin"
    atomic_write_bytes(target, b"one")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        atomic_write_bytes(target, b"two")
    atomic_write_bytes(target, b"two", overwrite=True)
    assert target.read_bytes() == b"two"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_private_file_is_owner_only(tmp_path):
    with private_file(tmp_path / "k.pem") as tmp:
        tmp.write_bytes(b"secret")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600


def test_folder_swap_keeps_old_on_error_and_replaces_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(OutputExistsError, match="not empty"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("writer failed")
    assert (out / "v").read_text() == "1"
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_a_dead_writer_are_cleaned_and_a_moved_aside_folder_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".a.bin.tmp-{pid}-0123abcd").write_bytes(b"x" * 100)
    (tmp_path / f".a.bin.tmp-{os.getpid()}-0123abcd").write_bytes(b"mine, still being written")
    (tmp_path / f".model.old-{pid}-89abcdef").mkdir()
    (tmp_path / f".model.old-{pid}-89abcdef" / "v").write_text("old")
    clean_leftovers(tmp_path / "a.bin")
    clean_leftovers(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".a.bin.tmp-{os.getpid()}-0123abcd", "model"]
    assert (tmp_path / "model" / "v").read_text() == "old"


def test_kill_during_folder_replacement_never_loses_the_output(tmp_path):
    """kill -9 a writer at random moments of a replace loop: the folder is always a complete old or new one."""
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("0")
        (tmp / "b").write_text("0")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from lowra.device_runtime._files import atomic_dir
        i = 0
        while True:
            i += 1
            with atomic_dir(Path({str(out)!r}), overwrite=True) as tmp:
                (tmp / "a").write_text(str(i))
                (tmp / "b").write_text(str(i))
    """)
    for delay in (0.15, 0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        clean_leftovers(out)
        assert (out / "a").read_text() == (out / "b").read_text()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path))
    assert cache_dir("quantized") == tmp_path / "quantized"
    monkeypatch.delenv("LOWRA_CACHE")
    assert cache_dir() == __import__("pathlib").Path.home() / ".cache" / "lowra"


def test_scratch_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import tempfile

    from lowra.device_runtime._files import scratch_dir

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f"lowra-onnx-{dead}-0123abcd"
    stale.mkdir()
    (stale / "user.onnx_adapter").write_bytes(b"x" * 1000)
    mine = scratch_dir("onnx")
    assert not stale.exists() and mine.is_dir() and mine.name.startswith(f"lowra-onnx-{os.getpid()}-")
    assert mine.stat().st_mode & 0o777 == 0o700

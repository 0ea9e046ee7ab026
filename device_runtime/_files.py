"""File infrastructure, one helper each: atomic writes (file and folder), the cache root, file digests, UTC time.

Every artifact lowra writes goes through :func:`atomic_write_bytes`, :func:`atomic_file` or :func:`atomic_dir`:
the final path only ever holds a complete old or a complete new output, never a half-written one, even after a
``kill -9`` at any point:

- the new output is written under a temporary name carrying the writer's pid, fsynced, then renamed over the final
  path; the folder is fsynced after the rename so the rename itself survives a power cut;
- a folder replaces an existing one by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``); where that is not
  available, by two renames, and the next writer restores the old folder if a crash fell between them;
- temporary files and folders left by a killed writer (its pid no longer runs) are removed by the next write to the
  same path;
- outputs get the mode the umask allows (0644 under the usual 022); :func:`private_file` keeps secrets 0600.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from lowra.device_runtime.errors import OutputExistsError

CACHE_ENV = "LOWRA_CACHE"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def cache_dir(*parts: str) -> Path:
    """``$LOWRA_CACHE/<parts>`` (default ``~/.cache/lowra/<parts>``): converted models, quantized bases, kernels."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "lowra"
    return root.joinpath(*parts)


def build_cached(library: Path, command: Callable[[Path], list[str]], what: str, force: bool = False) -> Path:
    """Run ``command(output)`` (a compiler line writing ``output``) unless ``library`` exists already; the output
    goes to a temporary name renamed into place, so a concurrent or interrupted build never leaves half a library.
    ``library`` should live in a :func:`cache_dir` folder named by a hash of the sources and the command."""
    from lowra.device_runtime.errors import KernelLibraryError

    if library.is_file() and not force:
        return library
    compiler = command(Path("OUT"))[0]
    if shutil.which(compiler) is None:
        raise KernelLibraryError(f"no C++ compiler {compiler!r} on PATH; {what} needs g++ (set CXX to another one)")
    with atomic_file(library, overwrite=True) as tmp:
        done = subprocess.run(command(tmp), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KernelLibraryError(f"building {what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return library


def utc_now() -> str:
    """ISO-8601 UTC time to the second, as every format's ``created`` field stores it."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open folders (Windows) has no folder fsync either
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic there
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: str | os.PathLike[str]) -> None:
    """Remove what killed writers of ``path`` left beside it; put back an old folder a crash left moved aside."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = _TEMP.match(entry.name)
        if not match or match["name"] != path.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not path.exists():
            os.replace(entry, path)  # the crash fell between moving the old output aside and the new one in
        else:
            _remove(entry)


_WORKDIR = re.compile(r"^lowra-(?P<kind>[a-z]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def scratch_dir(kind: str) -> Path:
    """A private scratch folder ``$TMPDIR/lowra-<kind>-<pid>-<random>`` for an engine's per-process files.

    Engines remove theirs on close; folders of processes that no longer run (killed with -9) are removed here,
    so crashes never accumulate scratch files.
    """
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"scratch kind {kind!r} must be lowercase letters")
    root = Path(tempfile.gettempdir())
    for entry in root.iterdir():
        match = _WORKDIR.match(entry.name)
        if match and match["kind"] == kind and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
    folder = root / f"lowra-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    return folder


def _check_file_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path")


@contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is fsynced and renamed."""
    path = Path(path)
    _check_file_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def private_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_file`, for secrets: the file is created 0600 and keeps that mode."""
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # a file system or kernel without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a))


@contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``.

    An existing output is exchanged with the new one in one atomic step where the kernel allows it, otherwise moved
    aside first (a crash between the two renames is repaired by the next writer), and removed only once the new one
    is in place. So ``path`` is always the complete old folder or the complete new one. A non-empty ``path`` needs
    ``overwrite``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and is not empty; pass overwrite=True (CLI: --force) to replace it"
        )
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()  # mode 0777 & ~umask, like any folder the user makes
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            _fsync_dir(path.parent)
            return  # tmp now holds the old output; the finally block removes it
        old = _temp_name(path, "old")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
        _remove(old)
    finally:
        _remove(tmp)

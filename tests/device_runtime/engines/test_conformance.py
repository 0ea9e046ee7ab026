"""Every engine through the same cases (device_runtime/engines/base.py): the numpy DeviceRuntime, OnnxEngine and
ExecutorchEngine, in each user mode they run.

The bases are the tiny ones the engine tests already build (the numpy base of tests/device_runtime/conftest.py, the
ONNX export of tests/export/onnx/test_onnx.py, the cached ExecuTorch folder of test_executorch_artifacts.py). Users
are random blobs bound to each base's own digests, so one helper makes them for every engine. The observable
output is the weights for the runtime (it only merges; an inference engine runs them) and the logits for the
engines that run the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytest

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.engines.base import Engine, GeneratingEngine, UserInfo
from lowra.device_runtime.engines.generation import GenerationConfig
from lowra.device_runtime.errors import BaseMismatchError, ChecksumMismatchError, ConfigError

from tests.export.executorch.test_executorch_artifacts import requires_executorch

IDS = np.array([5, 17, 42, 7, 99, 123, 64, 250, 11], dtype=np.int64)
RANK = 4
WIDTHS = (4, 2, 1, 0)  # component k of every module gets WIDTHS[k] (the last one dropped)


def random_blob(digests: Mapping[str, str], shapes: Mapping[str, Sequence[int]], seed: int, adapter_id: str,
                fingerprint: str | None = None) -> bytes:
    """A valid blob over every module of ``shapes`` (random codes and levels), bound to the base whose per-module
    digests are ``digests`` unless ``fingerprint`` says otherwise."""
    rng = np.random.default_rng(seed)
    modules = sorted(shapes)
    entries = [fmt.ModuleEntry(m, int(shapes[m][0]), int(shapes[m][1]), RANK) for m in modules]
    widths, codes, levels = [], [], []
    for e in entries:
        for length in (e.in_features, e.out_features):
            for k in range(RANK):
                w = WIDTHS[k]
                widths.append(w)
                codes.append(rng.integers(0, 1 << w, length).astype(np.uint8) if w else np.zeros(0, np.uint8))
                levels.append(np.sort(rng.standard_normal(1 << w) * 0.3).astype(np.float16) if w
                              else np.zeros(0, np.float16))
    bound = fingerprint or fmt.base_fingerprint({m: digests[m] for m in modules},
                                                {m: tuple(shapes[m]) for m in modules})
    meta = {"adapter_id": adapter_id, "base_fingerprint": bound,
            "lora": {"rank": RANK, "alpha": RANK, "targets": [], "scaling": 1.0}, "scheme": {"method": "test"},
            "created": "2026-01-01T00:00:00+00:00", "card": {}}
    return fmt.build_blob_bytes(entries, np.array(widths, np.uint8), codes, levels, meta)


@dataclass
class Subject:
    """One engine in one mode, its users' blobs, and how to read its output."""

    kind: str
    engine: Any
    mode: str
    user_a: Path
    user_b: Path
    foreign: Path  # same modules and shapes, bound to another base
    output: Callable[[], Any]

    def snapshot(self) -> dict[str, bytes]:
        out = self.output()
        return {k: np.asarray(v).tobytes() for k, v in out.items()} if isinstance(out, dict) else {"": out.tobytes()}


def _write_users(root: Path, digests: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> tuple[Path, ...]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name, fingerprint in ((1, "user-a", None), (2, "user-b", None), (3, "stranger", "sha256:" + "0" * 64)):
        path = root / f"{name}.lowra"
        path.write_bytes(random_blob(digests, shapes, seed, name, fingerprint))
        paths.append(path)
    return tuple(paths)


@functools.cache
def _runtime(root: Path) -> tuple[Any, tuple[Path, ...]]:
    from lowra.device_runtime.runtime import DeviceRuntime
    from tests.device_runtime.conftest import TINY_MODULES, write_base

    runtime = DeviceRuntime(write_base(root / "base"))
    digests = {m: runtime.base.digest(f"{m}.weight") for m in TINY_MODULES}
    return runtime, _write_users(root / "users", digests, TINY_MODULES)


@functools.cache
def _onnx(root: Path) -> tuple[Any, tuple[Path, ...]]:
    from lowra.device_runtime.engines.onnx import OnnxEngine
    from lowra.export.onnx import export_onnx
    from tests.conftest import _build_tokenizer, build_tiny_model
    from tests.export.onnx.test_onnx import quantize

    manifest = export_onnx(build_tiny_model(), quantize(), _build_tokenizer(), root / "model")
    base = manifest["base"]
    return OnnxEngine(root / "model", threads=1), _write_users(root / "users", base["digests"], base["shapes"])


@functools.cache
def _executorch(root: Path) -> tuple[Any, tuple[Path, ...]]:
    from lowra.device_runtime.engines.executorch import ExecutorchEngine
    from tests.export.executorch.test_executorch_artifacts import exported

    engine = ExecutorchEngine(exported())
    return engine, _write_users(root / "users", engine.manifest.digests, engine.manifest.shapes)


BUILDERS = {"runtime": _runtime, "onnx": _onnx, "executorch": _executorch}
CASES = [
    pytest.param(("runtime", "merge"), id="runtime-merge"),
    pytest.param(("onnx", "side"), id="onnx-side"),
    pytest.param(("onnx", "merge"), id="onnx-merge"),
    pytest.param(("executorch", "side"), id="executorch-side", marks=requires_executorch),
    pytest.param(("executorch", "merge"), id="executorch-merge", marks=requires_executorch),
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return {kind: tmp_path_factory.mktemp(f"conformance-{kind}") for kind in BUILDERS}


@pytest.fixture(params=CASES)
def subject(request, roots) -> Subject:
    kind, mode = request.param
    engine, (user_a, user_b, foreign) = BUILDERS[kind](roots[kind])
    output = engine.weights if kind == "runtime" else functools.partial(engine.logits, IDS)
    # Start on the base of this mode: ExecuTorch's side (packed) and merge (dense) programs compute the base up to
    # float rounding, and unload_user returns to the base of the program in use.
    engine.load_user(user_a, mode=mode)
    engine.unload_user()
    yield Subject(kind, engine, mode, user_a, user_b, foreign, output)
    engine.unload_user()


# ------------------------------------------------------------------------------------------------ the cases
def test_engine_implements_the_protocol(subject):
    assert isinstance(subject.engine, Engine)
    # the numpy runtime merges weights for an inference engine and has no forward pass of its own
    assert isinstance(subject.engine, GeneratingEngine) == (subject.kind != "runtime")


def test_load_user_returns_user_info_and_user_equals_it(subject):
    assert subject.engine.user is None
    info = subject.engine.load_user(subject.user_a, mode=subject.mode)
    assert isinstance(info, UserInfo) and subject.engine.user == info
    blob = fmt.read_blob(subject.user_a)
    assert info.adapter_id == "user-a" and info.mode == subject.mode
    assert set(info.modules) == {m.name for m in blob.modules}
    assert info.file_bytes == subject.user_a.stat().st_size
    assert info.effective_bits == pytest.approx(blob.bits_report()["effective_bits"])
    assert 0.0 <= info.apply_ms <= info.load_ms


def test_unload_restores_the_base_bit_exactly(subject):
    base = subject.snapshot()
    subject.engine.load_user(subject.user_a, mode=subject.mode)
    assert subject.snapshot() != base  # the user really changes the output
    subject.engine.unload_user()
    assert subject.engine.user is None
    assert subject.snapshot() == base


def test_swapping_a_b_a_equals_loading_a_fresh(subject):
    subject.engine.load_user(subject.user_a, mode=subject.mode)
    fresh_a = subject.snapshot()
    subject.engine.load_user(subject.user_b, mode=subject.mode)
    assert subject.snapshot() != fresh_a
    subject.engine.load_user(subject.user_a, mode=subject.mode)
    assert subject.snapshot() == fresh_a


def test_blob_for_another_base_is_refused_and_changes_nothing(subject):
    info = subject.engine.load_user(subject.user_a, mode=subject.mode)
    before = subject.snapshot()
    with pytest.raises(BaseMismatchError, match="trained against base sha256:.*retrain"):
        subject.engine.load_user(subject.foreign, mode=subject.mode)
    assert subject.engine.user == info
    assert subject.snapshot() == before


@pytest.mark.parametrize("mode", ["adapter", "bogus"])
def test_unknown_mode_is_a_config_error(subject, mode):
    with pytest.raises(ConfigError, match=f"mode='{mode}'"):
        subject.engine.load_user(subject.user_a, mode=mode)
    assert subject.engine.user is None


def test_corrupted_blob_is_refused(subject, tmp_path):
    data = bytearray(subject.user_a.read_bytes())
    data[-3] ^= 0x10
    path = tmp_path / "corrupt.lowra"
    path.write_bytes(bytes(data))
    for blob in (path, bytes(data)):
        with pytest.raises(ChecksumMismatchError):
            subject.engine.load_user(blob, mode=subject.mode)
    assert subject.engine.user is None


def test_blob_given_as_bytes_works(subject):
    from_path = subject.engine.load_user(subject.user_a, mode=subject.mode)
    expected = subject.snapshot()
    subject.engine.unload_user()
    from_bytes = subject.engine.load_user(subject.user_a.read_bytes(), mode=subject.mode)
    assert (from_bytes.adapter_id, from_bytes.modules, from_bytes.file_bytes) == (
        from_path.adapter_id, from_path.modules, from_path.file_bytes)
    assert subject.snapshot() == expected


# The numpy DeviceRuntime merges weights for a torch model and has no forward pass: it is an Engine, not a
# GeneratingEngine, so only the engines that run the model take this case.
@pytest.mark.parametrize("subject", [c for c in CASES if c.values[0][0] != "runtime"], indirect=True)
def test_generate_is_a_deterministic_str_for_greedy(subject):
    assert isinstance(subject.engine, GeneratingEngine)
    subject.engine.load_user(subject.user_a, mode=subject.mode)
    config = GenerationConfig(max_new_tokens=4)
    for chat in (False, True):
        first = subject.engine.generate("Tell me about pizza.", config, chat=chat)
        assert isinstance(first, str)
        assert subject.engine.generate("Tell me about pizza.", config, chat=chat) == first


def test_concurrent_swaps_and_generation_are_serialized(subject):
    """A UI thread reading while a loader swaps users: every output is exactly the base's, A's or B's."""
    import threading

    expected = {}
    for name, blob in (("base", None), ("a", subject.user_a), ("b", subject.user_b)):
        if blob is None:
            subject.engine.unload_user()
        else:
            subject.engine.load_user(blob, mode=subject.mode)
        expected[name] = subject.snapshot()
    wrong: list[str] = []

    def loader() -> None:
        for i in range(12):
            subject.engine.load_user(subject.user_a if i % 2 else subject.user_b, mode=subject.mode)

    def reader() -> None:
        for _ in range(12):
            got = subject.snapshot()
            if not any(got == want for want in expected.values()):
                wrong.append("an output matches no user")

    threads = [threading.Thread(target=loader), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []

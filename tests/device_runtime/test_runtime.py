"""Load, verify, merge at load time, swap without drift, and refuse bad input without touching state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lowra.device_runtime import DeviceRuntime
from lowra.device_runtime import formats as fmt
from lowra.device_runtime.errors import (
    BaseMismatchError,
    BaseNotFoundError,
    BlobContentError,
    ChecksumMismatchError,
)
from lowra.device_runtime.formats.container import memmap_tensors

from tests.conftest import run_with_blocked_imports
from tests.device_runtime.conftest import TINY_MODULES, make_blob_bytes, write_base


def pristine(base_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in memmap_tensors(base_dir / "model.safetensors")[1].items()}


def test_merge_equals_base_plus_delta(tiny_base):
    data = make_blob_bytes(tiny_base)
    blob = fmt.parse_blob(data)
    rt = DeviceRuntime(tiny_base)
    info = rt.load_user(data)
    assert info.adapter_id == "user-a" and set(info.modules) == set(TINY_MODULES)
    base = pristine(tiny_base)
    for name in TINY_MODULES:
        up, down = blob.factors(name)
        expected = base[f"{name}.weight"].astype(np.float64) + up.astype(np.float64) @ down.astype(np.float64)
        np.testing.assert_allclose(rt.weight(f"{name}.weight"), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(rt.weight("model.norm.weight"), base["model.norm.weight"])


def test_thousand_swaps_restore_base_bit_exactly(tiny_base):
    a = make_blob_bytes(tiny_base, seed=1, adapter_id="a")
    b = make_blob_bytes(tiny_base, seed=2, adapter_id="b", modules=dict(list(TINY_MODULES.items())[:2]))
    rt = DeviceRuntime(tiny_base)
    rt.load_user(a)
    merged_a = {k: v.copy() for k, v in rt.weights().items()}
    for i in range(1000):
        rt.load_user(b if i % 2 == 0 else a)
    # i = 999 loaded a: identical bits to the first load of a
    for k, v in rt.weights().items():
        assert v.tobytes() == merged_a[k].tobytes(), k
    rt.unload_user()
    for k, v in pristine(tiny_base).items():
        assert rt.weight(k).tobytes() == v.tobytes(), k
    assert rt.user is None


def test_user_touching_fewer_modules_restores_the_rest(tiny_base):
    a = make_blob_bytes(tiny_base, seed=1)
    only_first = dict(list(TINY_MODULES.items())[:1])
    b = make_blob_bytes(tiny_base, seed=2, modules=only_first)
    rt = DeviceRuntime(tiny_base)
    rt.load_user(a)
    rt.load_user(b)
    base = pristine(tiny_base)
    for name in list(TINY_MODULES)[1:]:
        assert rt.weight(f"{name}.weight").tobytes() == base[f"{name}.weight"].tobytes()


def test_wrong_base_is_refused_and_state_kept(tiny_base, tmp_path):
    other = write_base(tmp_path / "other", seed=7)
    foreign = make_blob_bytes(other, adapter_id="foreign")
    rt = DeviceRuntime(tiny_base)
    rt.load_user(make_blob_bytes(tiny_base))
    before = {k: v.copy() for k, v in rt.weights().items()}
    with pytest.raises(BaseMismatchError, match="trained against base sha256:.*retrain"):
        rt.load_user(foreign)
    assert rt.user is not None and rt.user.adapter_id == "user-a"
    for k, v in rt.weights().items():
        assert v.tobytes() == before[k].tobytes()


def test_adapter_for_missing_modules_is_refused(tiny_base):
    blob = make_blob_bytes(tiny_base, modules={"model.layers.9.mlp.up_proj": (24, 16)})
    with pytest.raises(BaseMismatchError, match="does not have"):
        DeviceRuntime(tiny_base).load_user(blob)


def test_adapter_with_wrong_shapes_is_refused(tiny_base):
    blob = make_blob_bytes(tiny_base, modules={"model.layers.0.self_attn.q_proj": (16, 24)})
    with pytest.raises(BlobContentError, match=r"is \[16, 24\] but the base weight is \[24, 16\]"):
        DeviceRuntime(tiny_base).load_user(blob)


def test_corrupted_blob_file_is_refused(tiny_base, tmp_path):
    path = tmp_path / "u.safetensors"
    data = bytearray(make_blob_bytes(tiny_base))
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        DeviceRuntime(tiny_base).load_user(path)


def test_missing_base(tmp_path):
    with pytest.raises(BaseNotFoundError, match="does not exist"):
        DeviceRuntime(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseNotFoundError, match="no model.safetensors"):
        DeviceRuntime(tmp_path / "empty")


def test_missing_blob_file(tiny_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DeviceRuntime(tiny_base).load_user(tmp_path / "missing.safetensors")


def test_runtime_never_imports_torch(tiny_base, tmp_path):
    """Run the whole device flow in a fresh interpreter where importing torch raises."""
    blob = tmp_path / "user.safetensors"
    blob.write_bytes(make_blob_bytes(tiny_base))
    out = run_with_blocked_imports(
        f"""
        import lowra.device_runtime as dr
        from lowra.device_runtime import formats, runtime  # noqa: F401
        from lowra.device_runtime.engines import onnx as onnx_engine  # noqa: F401  (the ONNX engine is torch-free too)
        rt = dr.DeviceRuntime({str(tiny_base)!r})
        info = rt.load_user({str(blob)!r})
        rt.unload_user()
        print("ok", info.adapter_id)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok user-a"


def test_eight_threads_swapping_and_reading_never_see_a_torn_or_mixed_state(tiny_base):
    """8 threads x 1,000 swaps, each followed by reads: every read is exactly the base, user A or user B, and a
    snapshot's weights always belong to the user it names."""
    import threading

    blobs = {"user-a": make_blob_bytes(tiny_base, seed=1, adapter_id="user-a"),
             "user-b": make_blob_bytes(tiny_base, seed=2, adapter_id="user-b")}
    rt = DeviceRuntime(tiny_base)
    expected = {None: {k: np.array(v) for k, v in rt.weights().items()}}
    for user, blob in blobs.items():
        rt.load_user(blob)
        expected[user] = {k: np.array(v) for k, v in rt.weights().items()}
    rt.unload_user()
    assert not np.array_equal(expected["user-a"]["model.layers.0.mlp.down_proj.weight"],
                              expected["user-b"]["model.layers.0.mlp.down_proj.weight"])

    def matches(weights: dict, user) -> bool:
        return all(np.array_equal(weights[k], v) for k, v in expected[user].items())

    wrong: list[str] = []
    reads = [0]

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(1000):
            choice = rng.integers(3)
            if choice == 2:
                rt.unload_user()
            else:
                rt.load_user(blobs["user-a" if choice == 0 else "user-b"])
            snap = rt.snapshot()
            weights = {k: snap.merged.get(k, v) for k, v in rt.base.tensors.items()}
            user = snap.user.adapter_id if snap.user else None
            if not matches(weights, user):
                wrong.append(f"snapshot of {user} holds other weights")
            current = rt.weights()
            if not any(matches(current, u) for u in expected):
                wrong.append("weights() mixes users or holds a half-merged tensor")
            if any(v.flags.writeable for v in current.values()):
                wrong.append("a reader got a writable array")
            reads[0] += 2

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads[0] == 16000
    assert wrong == []
    rt.unload_user()
    assert matches(rt.weights(), None)

"""ExecutorchEngine on the tiny low-bit Llama: logits and greedy tokens vs the eager sdk model for the base and two
users (side branch and merge at load, custom op and core-ATen fallback), drift-free swaps, refusals, torch-free parts.

The exported folders are built once per process (tests/export/test_executorch_artifacts.py).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_with_blocked_imports
from tests.export.executorch.test_executorch_artifacts import (
    MAX_SEQ_LEN,
    RANK,
    copy_folder,
    exported,
    lowbit_tiny,
    requires_executorch,
    user_blobs,
)

pytestmark = requires_executorch
IDS = np.array([5, 17, 42, 7, 99, 123, 64, 250, 11], dtype=np.int64)
# Float32 sums in another order (native kernel / XNNPACK vs MKL): measured max 2e-7 on this model.
LOGIT_TOL = 1e-5


def _eager(user: int | None):
    """The eager sdk model (LowBitLinear + the user's LoRA factors as decoded from the blob)."""
    from lowra.device_runtime import read_blob
    from lowra.sdk.workflow import apply_blob

    model, _ = lowbit_tiny()
    if user is None:
        return model
    model = copy.deepcopy(model)
    apply_blob(model, read_blob(user_blobs()[user - 1]), f"user{user}")
    return model


def _eager_logits(user: int | None) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _eager(user)(torch.from_numpy(IDS)[None]).logits[0].numpy()


def _eager_greedy(user: int | None, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = _eager(user).generate(torch.from_numpy(IDS)[None], max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0)
    return out[0, IDS.size:].tolist()


@pytest.fixture(scope="module")
def engine():
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    eng = ExecutorchEngine(exported())  # custom op, side + merge
    yield eng
    eng.close()


@pytest.mark.parametrize("mode", ["side", "merge"])
def test_logits_match_eager_for_base_and_two_users(engine, mode):
    diffs = {}
    for user in (None, 1, 2):
        if user is None:
            engine.load_user(user_blobs()[0], mode=mode)  # switch the program, then back to the base
            engine.unload_user()
        else:
            info = engine.load_user(user_blobs()[user - 1], mode=mode)
            assert info.mode == mode and info.adapter_id == f"user{user}"
        got = engine.logits(IDS)
        assert got.shape == (IDS.size, 300)
        diffs[user] = float(np.abs(got - _eager_logits(user)).max())
    assert max(diffs.values()) < LOGIT_TOL, diffs
    # The users really change the output (the check above is not vacuous).
    assert np.abs(_eager_logits(1) - _eager_logits(None)).max() > 1e-2


def test_int8_embeddings_match_eager_with_the_rounded_table():
    """embeddings="int8": the program stores the tied embedding/head once as 8-bit rows and computes the eager model
    whose table is those rows decoded (lowra::q8_embedding, lowra::q8_linear), for the base and a user; the rounding
    moves the logits, but not far."""
    import torch

    from lowra.device_runtime.engines.executorch import ExecutorchEngine
    from lowra.device_runtime.formats.int8_rows import dequantize_q8, quantize_q8

    folder = exported("custom", ("side",), False, "int8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["embeddings"] == "int8"
    assert {"lowra::q8_embedding.out", "lowra::q8_linear.out"} <= set(manifest["kernel_ops"])
    assert "lowra::f16_linear.out" not in manifest["kernel_ops"]
    model, _ = lowbit_tiny()
    pte = (folder / "side.pte").read_bytes()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        assert quantize_q8(module.weight.detach().numpy())[0].tobytes() in pte
    eng = ExecutorchEngine(folder)
    try:
        for user in (None, 2):
            eager = copy.deepcopy(_eager(user))
            with torch.no_grad():
                for module in (eager.get_input_embeddings(), eager.get_output_embeddings()):
                    module.weight.copy_(torch.from_numpy(dequantize_q8(*quantize_q8(module.weight.numpy()))))
                want = eager(torch.from_numpy(IDS)[None]).logits[0].numpy()
            if user is not None:
                eng.load_user(user_blobs()[user - 1])
            got = eng.logits(IDS)
            assert np.abs(got - want).max() < LOGIT_TOL, user
            assert 0 < np.abs(got - _eager_logits(user)).max() < 0.1  # the rounding shows, a little
    finally:
        eng.close()


def test_greedy_tokens_match_eager(engine):
    from lowra.device_runtime.engines.generation import GenerationConfig

    n = MAX_SEQ_LEN - IDS.size - 1
    for user in (None, 2):
        if user is None:
            engine.unload_user()
        else:
            engine.load_user(user_blobs()[user - 1], mode="side")
        assert engine.generate_ids(IDS, GenerationConfig(max_new_tokens=n)) == _eager_greedy(user, n)


def test_swaps_restore_the_base_bit_exactly(engine):
    bases = {}
    for mode in ("side", "merge", "side", "merge"):
        engine.load_user(user_blobs()[0], mode=mode)
        engine.unload_user()
        bases.setdefault(mode, engine.logits(IDS))
        for blob in user_blobs():
            engine.load_user(blob, mode=mode)
        engine.unload_user()
        assert np.array_equal(engine.logits(IDS), bases[mode])


def test_generate_text_greedy_and_seeded_sampling(engine):
    from lowra.device_runtime.engines.generation import GenerationConfig

    engine.unload_user()
    text = engine.generate("Tell me about pizza.", GenerationConfig(max_new_tokens=6), chat=True)
    assert isinstance(text, str)
    sampled = [engine.generate("hello", GenerationConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3))
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_aten_fallback_matches_eager():
    """The core-ATen program (no custom op, no kernel library) computes the same model."""
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    folder = exported("aten", ("side",), False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kernel_library"] is None and not list(folder.glob("*.so"))
    eng = ExecutorchEngine(folder)
    try:
        assert np.abs(eng.logits(IDS) - _eager_logits(None)).max() < LOGIT_TOL
        eng.load_user(user_blobs()[1])
        assert np.abs(eng.logits(IDS) - _eager_logits(2)).max() < LOGIT_TOL
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------------ refusals
def other_base_blob(folder: Path) -> Path:
    """A valid blob for a tiny low-bit model of the same architecture with other weights (another base)."""
    import torch

    from lowra.sdk.modules import linear_module_names
    from lowra.sdk.quant.config import CompressConfig
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.workflow import compress_factors, model_fingerprint
    from lowra.sdk.quant.lowbit_linear import replace_linears
    from lowra.sdk.quant.base.fit import quantize_weight
    from tests.export.executorch.test_executorch_artifacts import GROUP_SIZE, mixed_widths, tiny_llama

    other = tiny_llama(seed=1)  # same architecture and quantization, other weights
    names = linear_module_names(other)
    replace_linears(other, {n: quantize_weight(other.get_submodule(n).weight.detach(),
                                               mixed_widths(other.get_submodule(n).out_features, i), GROUP_SIZE)
                            for i, n in enumerate(names)})
    factors = {n: (torch.randn(RANK, other.get_submodule(n).in_features),
                   torch.randn(other.get_submodule(n).out_features, RANK)) for n in names}
    adapter = compress_factors(factors, LoraConfig(rank=RANK, alpha=8.0), CompressConfig(bits=8.0, weighted=False),
                               adapter_id="stranger", base_fingerprint=model_fingerprint(other, names))
    return adapter.write(folder / "stranger.lowra")


def test_blob_for_another_base_is_refused(engine, tmp_path):
    from lowra.device_runtime.errors import BaseMismatchError

    path = other_base_blob(tmp_path)
    before = engine.logits(IDS)
    with pytest.raises(BaseMismatchError, match="trained against base"):
        engine.load_user(path)
    assert np.array_equal(engine.logits(IDS), before)  # the refusal changed nothing


def test_data_file_of_another_program_is_refused():
    from lowra.device_runtime.errors import ProgramError
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    folder = copy_folder(exported(), "foreign-ptd")
    shutil.copyfile(folder / "merge.ptd", folder / "side.ptd")  # the other program's data
    with pytest.raises(ProgramError, match="belongs to another export"):
        ExecutorchEngine(folder)
    # Unverified, the data still does not fit the program: refused (by the layout check or by ExecuTorch).
    with pytest.raises(ProgramError):
        ExecutorchEngine(folder, verify=False)


def test_missing_kernel_library_is_refused():
    from lowra.device_runtime.errors import KernelLibraryError
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    folder = copy_folder(exported(), "no-kernels")
    (folder / "liblowra_executorch_kernels.so").unlink()
    with pytest.raises(KernelLibraryError, match="python -m lowra.export.executorch.kernels"):
        ExecutorchEngine(folder)


def test_corrupted_program_is_refused():
    from lowra.device_runtime.errors import ProgramError
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    folder = copy_folder(exported(), "corrupt-pte")
    data = bytearray((folder / "side.pte").read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    (folder / "side.pte").write_bytes(bytes(data))
    with pytest.raises(ProgramError, match="corrupted"):
        ExecutorchEngine(folder)
    (folder / "side.pte").write_bytes(b"not a program at all")
    with pytest.raises(ProgramError):
        ExecutorchEngine(folder, verify=False)


def test_the_engine_runs_without_torch_or_the_executorch_binding(tmp_path):
    """The whole engine (manifest, verification, native program runner, users, generation) in an interpreter where
    importing torch or executorch raises: its logits are the eager model's, as in the tests above."""
    folder, (blob, _) = exported(), user_blobs()
    out = tmp_path / "logits.npz"
    done = run_with_blocked_imports(f"""
        import numpy as np
        from lowra.device_runtime.engines.executorch import ExecutorchEngine
        from lowra.device_runtime.engines.generation import GenerationConfig
        ids = np.array({IDS.tolist()!r}, dtype=np.int64)
        engine = ExecutorchEngine({str(folder)!r})
        base = engine.logits(ids)
        engine.load_user({str(blob)!r}, mode="side")
        side = engine.logits(ids)
        tokens = engine.generate_ids(ids, GenerationConfig(max_new_tokens=4))
        engine.load_user({str(blob)!r}, mode="merge")
        merge = engine.logits(ids)
        engine.close()
        np.savez({str(out)!r}, base=base, side=side, merge=merge, tokens=np.array(tokens))
        print("ok")
    """, blocked=("torch", "executorch"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    got = np.load(out)
    assert np.abs(got["base"] - _eager_logits(None)).max() < LOGIT_TOL
    for mode in ("side", "merge"):
        assert np.abs(got[mode] - _eager_logits(1)).max() < LOGIT_TOL, mode
    assert got["tokens"].tolist() == _eager_greedy(1, 4)


def test_data_composition_runs_without_torch():
    """Manifest, fingerprint check and the per-user .ptd composition are numpy-only (torch import blocked)."""
    folder, (blob, _) = exported(), user_blobs()
    done = run_with_blocked_imports(f"""
        import numpy as np
        from lowra.device_runtime import read_blob
        from lowra.device_runtime.engines.executorch import compose_user_data
        from lowra.device_runtime.formats import check_base_binding
        from lowra.device_runtime.formats.executorch_manifest import Manifest
        manifest = Manifest.read({str(folder)!r})
        parsed = read_blob({str(blob)!r})
        check_base_binding(parsed, manifest.digests, manifest.shapes, "the program")  # raises on a mismatch
        factors = parsed.all_factors(drop_empty=True)
        packed = dict()
        for mode in ("side", "merge"):
            program = manifest.program(mode)
            template = np.memmap(manifest.folder / program["data"], dtype=np.uint8, mode="r")
            data = compose_user_data(template, program, mode, factors, manifest.data["rank"], parsed)
            assert len(data) == template.size
            for key, entry in program["tensors"].items():
                module, role = key.rsplit(":", 1)
                dtype = np.dtype(entry["dtype"])  # side: 4-bit codes and float16 levels, merge: float32
                got = np.frombuffer(data, dtype, int(np.prod(entry["shape"])), entry["offset"]).reshape(entry["shape"])
                up, down = factors[module]
                if mode == "side":
                    packed[(module, role)] = got
                    if len(packed) % 4:
                        continue
                    k = up.shape[1]
                    for part, length, values in (("down", down.shape[1], down), ("up", up.shape[0], up.T)):
                        codes, books = packed[(module, part + "_codes")], packed[(module, part + "_books")]
                        nibbles = np.stack([codes & 15, codes >> 4], -1)
                        nibbles = nibbles.reshape(len(nibbles), -1)[:, :length].astype(np.int64)
                        decoded = np.take_along_axis(books, nibbles, 1).astype(np.float32)
                        assert np.array_equal(decoded[:k], values), key  # the blob's values, none rounded
                        assert not decoded[k:].any(), key  # slots past the user's components: zeros
                else:
                    base = np.frombuffer(template, np.float32, got.size, entry["offset"]).reshape(got.shape)
                    assert np.allclose(got, base + up @ down, atol=1e-6), key
        print("ok")
    """, blocked=("torch", "executorch"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

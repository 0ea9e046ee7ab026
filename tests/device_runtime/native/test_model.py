"""liblowra_program (CMake, on the executorch wheel's C++ runtime) on an exported model folder, against the Python
ExecutorchEngine: the same logits (side branch bit for bit: the same bytes reach the same program; merge within
float32 summation order), the same greedy tokens, bit-exact swaps back to the base, and the same refusals. Then the
example app, lowra_chat, generating and swapping users from token ids."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowra.device_runtime.errors import BaseMismatchError, BlobTruncatedError, ChecksumMismatchError

from tests.device_runtime.native.liblowra import Model
from tests.export.executorch.test_executorch_artifacts import (
    MAX_SEQ_LEN,
    copy_folder,
    exported,
    requires_executorch,
    user_blobs,
)

pytestmark = requires_executorch
IDS = np.array([5, 17, 42, 7, 99, 123, 64, 250, 11], dtype=np.int64)
MERGE_TOL = 1e-5  # merge_into's k-sum order (liblowra's loop vs numpy's BLAS); the side branch is exact


@pytest.fixture(scope="module")
def program_build(build_dir) -> Path:
    assert (build_dir / "liblowra_program.so").is_file(), "CMake did not find the executorch wheel's runtime"
    return build_dir


@pytest.fixture(scope="module")
def engine():
    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    eng = ExecutorchEngine(exported())
    yield eng
    eng.close()


@pytest.mark.parametrize("mode", ["side", "merge"])
def test_logits_and_tokens_equal_the_python_engine_and_swaps_are_exact(program_build, engine, mode):
    from lowra.device_runtime.engines.generation import GenerationConfig

    model = Model(program_build / "liblowra_program.so", exported(), mode)
    try:
        base_logits = model.logits(IDS)
        engine.load_user(user_blobs()[0], mode=mode)  # the engine's program of this mode, then its base
        engine.unload_user()
        assert np.array_equal(base_logits, engine.logits(IDS))
        n = MAX_SEQ_LEN - IDS.size - 1
        base_tokens = model.generate(IDS, n)
        assert base_tokens == engine.generate_ids(IDS, GenerationConfig(max_new_tokens=n))
        for i, blob in enumerate(user_blobs(), start=1):
            info = model.load(blob.read_bytes())
            assert info.adapter_id.decode() == f"user{i}" and info.n_modules > 0
            engine.load_user(blob, mode=mode)
            got, want = model.logits(IDS), engine.logits(IDS)
            if mode == "side":
                assert np.array_equal(got, want)
            else:
                assert np.abs(got - want).max() < MERGE_TOL
            assert np.abs(got - base_logits).max() > 1e-2  # the user really changes the output
            assert model.generate(IDS, n) == engine.generate_ids(IDS, GenerationConfig(max_new_tokens=n))
        model.unload()
        assert np.array_equal(model.logits(IDS), base_logits)
        assert model.generate(IDS, n) == base_tokens
    finally:
        model.close()


def test_packed_factors_give_the_float16_programs_logits(program_build):
    """A side program holding users' factors as 4-bit codes (side_factors="packed4", the default: the blob's codes,
    each channel in a 4-bit slot) computes with the same values as a float16 one: liblowra_program (packing the blob
    natively) and the Python engine (formats.executorch_manifest.pack4_factors) give the float16 program's logits bit
    for bit, users and base alike, from a quarter of its factor bytes (at SmolLM2's widths)."""
    import json

    from lowra.device_runtime.engines.executorch import ExecutorchEngine

    folder = exported(modes=("side",))
    float16_folder = exported(modes=("side",), side_factors="float16")
    manifest = json.loads((folder / "manifest.json").read_text())
    roles = {key.rsplit(":", 1)[1] for key in manifest["programs"]["side"]["tensors"]}
    assert roles == {"down_codes", "down_books", "up_codes", "up_books"}
    assert "lowra::lowbit_linear_blocked_lora4.out" in manifest["kernel_ops"]
    def factor_bytes(data: dict) -> int:
        return sum(entry["nbytes"] for entry in data["programs"]["side"]["tensors"].values())

    float16 = factor_bytes(json.loads((float16_folder / "manifest.json").read_text()))
    rank = manifest["rank"]
    codes_and_books = sum(rank * (-(-i // 2) + -(-o // 2) + 2 * 16 * 2) for o, i in
                          (m["shape"] for m in manifest["modules"].values()))
    assert factor_bytes(manifest) == codes_and_books  # half a byte per value, 2 x 16 float16 levels per component
    assert float16 == sum(2 * rank * (o + i) for o, i in (m["shape"] for m in manifest["modules"].values()))
    model = Model(program_build / "liblowra_program.so", folder, "side")
    packed_engine, float16_engine = ExecutorchEngine(folder), ExecutorchEngine(float16_folder)
    try:
        assert np.array_equal(model.logits(IDS), float16_engine.logits(IDS))
        for blob in user_blobs():
            model.load(blob.read_bytes())
            packed_engine.load_user(blob)
            float16_engine.load_user(blob)
            want = float16_engine.logits(IDS)
            assert np.array_equal(model.logits(IDS), want)
            assert np.array_equal(packed_engine.logits(IDS), want)
        model.unload()
        float16_engine.unload_user()
        assert np.array_equal(model.logits(IDS), float16_engine.logits(IDS))
    finally:
        model.close()
        packed_engine.close()
        float16_engine.close()


def test_refusals_keep_the_active_user(program_build, tmp_path):
    from tests.device_runtime.engines.test_executorch import other_base_blob

    model = Model(program_build / "liblowra_program.so", exported(), "side")
    try:
        blob = user_blobs()[0].read_bytes()
        model.load(blob)
        user_logits = model.logits(IDS)
        with pytest.raises(BlobTruncatedError):
            model.load(blob[:-1])
        with pytest.raises(BaseMismatchError, match="was trained against base"):
            model.load(other_base_blob(tmp_path).read_bytes())
        assert np.array_equal(model.logits(IDS), user_logits)
    finally:
        model.close()
    folder = copy_folder(exported(), "native-corrupt")
    data = bytearray((folder / "side.ptd").read_bytes())
    data[-1] ^= 1
    (folder / "side.ptd").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="side data template"):
        Model(program_build / "liblowra_program.so", folder, "side")


def test_signed_blobs_under_the_apps_trust_policy(program_build, tmp_path):
    """lowra_model_set_trust + lowra_model_user_load_signed: a signed, encrypted blob runs like its plain body; the
    policy's refusals keep the active user; a base_content claim is refused (a program cannot prove its base)."""
    import datetime as dt

    from lowra.device_runtime.errors import DecryptionKeyError, UntrustedKeyError, WrongRecipientError
    from lowra.sdk.signing import load_private_key, new_key, sign_bytes

    from tests.device_runtime.native.liblowra import Liblowra

    server = new_key(tmp_path / "keys", "server")
    key = load_private_key(server.private_path)
    body = user_blobs()[0].read_bytes()
    aes = bytes(range(32))
    data = sign_bytes(body, key, user_id="alice", sequence=1, encryption_key=aes)
    model = Model(program_build / "liblowra_program.so", exported(), "side")
    try:
        model.load(body)
        plain_logits = model.logits(IDS)
        model.unload()
        with pytest.raises(UntrustedKeyError, match="does not trust"):  # the default policy pins no key
            model.load(data, user_id="alice", decryption_key=aes)
        native = Liblowra(program_build / "liblowra.so")
        model.set_trust(native.trust([server.public_path.read_bytes()]))  # the app's handle is freed right away
        model.load(data, user_id="alice", decryption_key=aes)
        assert np.array_equal(model.logits(IDS), plain_logits)
        with pytest.raises(WrongRecipientError):
            model.load(data, user_id="bob", decryption_key=aes)
        with pytest.raises(DecryptionKeyError):
            model.load(data, user_id="alice")
        with pytest.raises(BaseMismatchError, match="cannot prove its content"):
            model.load(sign_bytes(body, key, user_id="alice", sequence=2, base_content="ab" * 32,
                                  now=dt.datetime.now(dt.timezone.utc)), user_id="alice")
        assert np.array_equal(model.logits(IDS), plain_logits)
    finally:
        model.close()


def test_lowra_chat_generates_and_swaps_users_from_token_ids(program_build, engine, tmp_path):
    from lowra.device_runtime.engines.generation import GenerationConfig

    first, second = user_blobs()
    corrupt = tmp_path / "corrupt.lowra"
    corrupt.write_bytes(second.read_bytes()[:-1])
    prompt = " ".join(str(i) for i in IDS)
    script = "\n".join([f"generate 6 {prompt}", f"load {first}", f"generate 6 {prompt}", f"load {corrupt}", "user",
                        "unload", f"generate 6 {prompt}", "user", "quit"]) + "\n"
    result = subprocess.run([str(program_build / "lowra_chat"), str(exported()), "side"], input=script,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def tokens(user):
        if user is None:
            engine.unload_user()
        else:
            engine.load_user(user, mode="side")
        return "ok tokens " + " ".join(str(t) for t in engine.generate_ids(IDS, GenerationConfig(max_new_tokens=6)))

    assert lines[0].startswith("ok model") and "vocab 300" in lines[0]
    assert lines[1] == tokens(None)
    assert lines[2].startswith("ok user user1")
    assert lines[3] == tokens(first) and lines[3] != lines[1]
    assert lines[4].startswith("error 3 ") and "truncated" in lines[4]
    assert lines[5] == "ok user user1"  # the refused blob kept the previous user
    assert lines[6] == "ok unloaded" and lines[7] == lines[1] and lines[8] == "ok user none"

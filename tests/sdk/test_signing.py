"""Server-side signing (lowra.sdk.signing) beyond the device's trust tests: key files, signing quantized bases, the
base_content claim, the per-user key file, and reading envelopes for `lowra inspect`."""
from __future__ import annotations

import stat

import numpy as np
import pytest

from lowra.device_runtime import DeviceRuntime
from lowra.device_runtime.errors import (
    BaseMismatchError,
    BlobContentError,
    ConfigError,
    ForgedSignatureError,
    OutputExistsError,
    RevokedKeyError,
    UntrustedKeyError,
)
from lowra.device_runtime.formats import container, signed
from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.device_runtime.trust import TrustPolicy, keyring
from lowra.sdk.signing import (
    adapter_base_content,
    new_key,
    read_encryption_key,
    revoke,
    sign_file,
    trusted_keys,
    write_encryption_key,
)
from lowra.sdk.workflow import model_fingerprint

from tests.conftest import build_tiny_model
from tests.device_runtime.conftest import make_blob_bytes, write_base
from tests.sdk.cli.conftest import make_blob, random_adapter


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    return folder, new_key(folder, "server"), new_key(folder, "attacker")


@pytest.fixture
def quantized(tmp_path):
    """A quantized tiny base file and an adapter blob compressed against it."""
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.lowbit_linear import replace_linears

    model = build_tiny_model()
    q = quantize_model(model, QuantizeConfig(bits=8.0, group_size=32, calibration=None), progress=False)
    base_file = q.write(tmp_path / "base.lowra-base")
    replace_linears(model, q.layers)
    factors = random_adapter(model)
    blob = make_blob(model, factors, model_fingerprint(model, list(factors))).write(tmp_path / "u.lowra")
    return base_file, blob


def test_key_files_modes_and_no_half_pair(keys, tmp_path):
    folder, server, _ = keys
    assert mode(folder) == 0o700 and mode(server.private_path) == 0o600
    assert server.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # a stray public key of that name: refused before the private key is written
    (folder / "third.pub.pem").write_bytes(server.public_path.read_bytes())
    with pytest.raises(OutputExistsError, match="third.pub.pem already exists"):
        new_key(folder, "third")
    assert not (folder / "third.key.pem").exists()
    with pytest.raises(ConfigError, match="plain file name"):
        new_key(folder, "../escape")


def test_sign_file_refuses_an_existing_output_before_any_work(tmp_path):
    out = tmp_path / "out.signed"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        sign_file(tmp_path / "out.signed", out, tmp_path / "no-such.key.pem")  # neither input nor key is read
    assert out.read_bytes() == b"keep"


def test_signing_a_quantized_base_records_its_content(keys, quantized, tmp_path):
    folder, server, _ = keys
    base_file, _ = quantized
    out = sign_file(base_file, tmp_path / "base.signed", server.private_path)
    envelope = trusted_keys(folder).policy().verify(out.read_bytes(), "base")
    base = read_quantized_base(base_file)
    assert envelope.claims["format"] == "lowra-base" and envelope.claims["user_id"] is None
    assert envelope.claims["subject"] == envelope.claims["base_fingerprint"] == base.fingerprint
    assert envelope.claims["base_content"] == base.metadata["payload_sha256"]
    assert bytes(envelope.payload) == base_file.read_bytes()
    with pytest.raises(ConfigError, match="signed, not encrypted"):
        sign_file(base_file, tmp_path / "base.enc", server.private_path, encryption_key=bytes(32))
    assert not (tmp_path / "base.enc").exists()


def test_adapter_base_content_binds_the_adapter_to_its_quantized_base(keys, quantized, tmp_path):
    _, server, _ = keys
    base_file, blob = quantized
    out = sign_file(blob, tmp_path / "u.signed", server.private_path, user_id="alice", quantized_base=base_file)
    claims = signed.read_unverified(out.read_bytes(), "blob").claims
    assert claims["base_content"] == read_quantized_base(base_file).metadata["payload_sha256"]
    pinned = [server.public_path]
    signed_base = sign_file(base_file, tmp_path / "base.signed", server.private_path)
    DeviceRuntime(signed_base, trusted_keys=pinned).load_user(out, user_id="alice")

    # the base with one dense value edited and its checksum recomputed: the signed adapter refuses it
    header = container.parse_header(base_file.read_bytes(), base_file.stat().st_size, "base")
    data = base_file.read_bytes()
    tensors = {n: np.array(container.tensor_from_buffer(data, t)) for n, t in header.tensors.items()}
    dense = next(n for n, t in tensors.items() if t.dtype == np.float16)
    tensors[dense].flat[0] += np.float16(0.5)
    meta = dict(header.metadata)
    meta["payload_sha256"] = container.payload_digest(tensors, meta)
    edited = tmp_path / "edited.lowra-base"
    edited.write_bytes(container.serialize(tensors, meta))
    policy = TrustPolicy(trusted_keys=keyring(pinned), allow_unsigned=True)
    with pytest.raises(BaseMismatchError, match="base was edited"):
        DeviceRuntime(edited, trust=policy).load_user(out, user_id="alice")

    # a base the adapter was not compressed against, or a model folder, cannot be named
    other = tmp_path / "u-other.lowra"
    other.write_bytes(make_blob_bytes(write_base(tmp_path / "fp")))
    with pytest.raises(ConfigError, match="compressed against another base"):
        adapter_base_content(other.read_bytes(), base_file)
    with pytest.raises(ConfigError, match="quantized base files only"):
        adapter_base_content(other.read_bytes(), tmp_path / "fp")
    with pytest.raises(ConfigError, match="not one"):
        adapter_base_content(base_file.read_bytes(), base_file)


def test_trusted_keys_and_verify_envelope_name_each_failure(keys, tiny_blob, tmp_path):
    folder, server, attacker = keys
    data = sign_file(tiny_blob, tmp_path / "u.signed", server.private_path, user_id="u").read_bytes()
    trust = trusted_keys(folder)
    assert trust.names[server.key_id] == "server" and set(trust.keys) == {server.key_id, attacker.key_id}
    assert trust.policy().verify(data, "blob").key_id == server.key_id

    only_attacker = trusted_keys(attacker.public_path)
    with pytest.raises(UntrustedKeyError, match="does not trust"):
        only_attacker.policy().verify(data, "blob")
    forged = bytearray(data)
    forged[-1] ^= 1
    with pytest.raises(ForgedSignatureError, match="does not match key"):
        trust.policy().verify(bytes(forged), "blob")
    revoke(folder, server.key_id)
    with pytest.raises(RevokedKeyError, match="which is revoked"):
        trusted_keys(folder).policy().verify(data, "blob")
    with pytest.raises(ConfigError, match="neither a key folder nor a public key file"):
        trusted_keys(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        trusted_keys(tmp_path / "empty")


def test_read_unverified_envelope_shows_claims_and_refuses_malformed_ones(keys, tiny_blob, tmp_path):
    _, server, _ = keys
    data = sign_file(tiny_blob, tmp_path / "u.signed", server.private_path, user_id="u", sequence=9).read_bytes()
    envelope = signed.read_unverified(data, "blob")
    assert envelope.key_id == server.key_id and envelope.claims["sequence"] == 9 and not envelope.encrypted
    assert signed.decrypt_payload(envelope, None, "blob") == tiny_blob.read_bytes()
    bad = bytearray(data)
    bad[signed.PREFIX.size] = ord("[")  # the claims no longer parse as an object
    with pytest.raises(BlobContentError, match="claims"):
        signed.read_unverified(bytes(bad), "blob")


def test_encryption_key_files(tmp_path):
    path = write_encryption_key(tmp_path / "alice.aes")
    assert mode(path) == 0o600 and len(read_encryption_key(path)) == 32
    with pytest.raises(OutputExistsError):
        write_encryption_key(path)
    (tmp_path / "short.aes").write_bytes(b"x" * 16)
    with pytest.raises(ConfigError, match="holds 16 bytes"):
        read_encryption_key(tmp_path / "short.aes")
    with pytest.raises(ConfigError, match="does not exist"):
        read_encryption_key(tmp_path / "none.aes")


@pytest.fixture
def tiny_blob(tmp_path):
    path = tmp_path / "tiny.lowra"
    path.write_bytes(make_blob_bytes(write_base(tmp_path / "base")))
    return path

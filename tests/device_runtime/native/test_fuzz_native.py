"""The fuzzer's inputs (tests/fuzz_mutations.py: every mutation of every seed, signed and encrypted ones included)
through liblowra and through the Python runtime: both accept the same inputs and refuse the others with the same
error kind, and liblowra never crashes (a crash would take the test process with it)."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowra.device_runtime.errors import BlobContentError

from tests.device_runtime.native.liblowra import Liblowra
from tests.device_runtime.native.test_liblowra import python_error
from tests.fuzz_mutations import NOW, USER, FuzzContext, raw_public_key

# Where liblowra is stricter by design (device_runtime/native/README.md): JSON nested deeper than 64 levels.
STRICTER = {"deep_nesting": BlobContentError}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> FuzzContext:
    return FuzzContext(tmp_path_factory.mktemp("fuzz-native"))


@pytest.fixture(scope="module")
def native(build_dir) -> Liblowra:
    return Liblowra(build_dir / "liblowra.so")


def native_python_error(native: Liblowra, ctx: FuzzContext, seed, data: bytes) -> type[Exception] | None:
    """The device's call natively, under the policy ctx.policy(seed) stands for (a fresh replay store each time)."""
    keys = [raw_public_key(ctx.keys.trusted)] if seed.signed else []
    trust = native.trust(keys, allow_unsigned=-1 if seed.signed else 1, now=NOW.timestamp())
    if seed.family == "blob":
        def load() -> None:
            handle = native.open(ctx.base_dir, trust)
            try:
                native.load(handle, data, user_id=USER, decryption_key=ctx.keys.aes if seed.encrypted else None)
            finally:
                native.close(handle)
        return python_error(load)
    path = ctx.workdir / "native-input.safetensors"
    path.write_bytes(data)
    return python_error(lambda: native.close(native.open(path, trust)))


def compare(native: Liblowra, ctx: FuzzContext, seed, mutation, rng_seed: int) -> str | None:
    data = mutation.apply(random.Random(rng_seed), seed.data)
    python = python_error(ctx._load(seed, data))
    expected = STRICTER.get(mutation.name.split("/")[-1], python) if python is None else python
    got = native_python_error(native, ctx, seed, data)
    if got is not expected:
        return (f"{seed.name} / {mutation.name} / rng {rng_seed}: python {python and python.__name__}, "
                f"liblowra {got and got.__name__}")
    return None


def test_every_mutation_of_every_seed_alike(native, ctx):
    mismatches = [m for s, mut in ctx.cases() if (m := compare(native, ctx, s, mut, 0))]
    assert not mismatches, f"{len(mismatches)} of {len(ctx.cases())}:\n" + "\n".join(mismatches[:40])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_alike(native, ctx, data):
    seed, mutation = data.draw(st.sampled_from(ctx.cases()), label="case")
    mismatch = compare(native, ctx, seed, mutation, data.draw(st.integers(0, 2**32 - 1), label="rng"))
    assert mismatch is None, mismatch

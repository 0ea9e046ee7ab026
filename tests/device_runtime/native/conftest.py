"""One build of the CMake project per test session (liblowra, liblowra_program where the executorch wheel is
installed, lowra_chat), shared by every native test module: about 25 s on 2 cores."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.device_runtime.native.liblowra import build, missing_toolchain


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    reason = missing_toolchain()
    if reason:
        pytest.skip(f"cannot build liblowra: {reason}")
    return build(tmp_path_factory.mktemp("liblowra-build"))

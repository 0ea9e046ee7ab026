"""The loader never imports the sdk: it checks that the sdk defined the ``lowra::`` schemas before building."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from lowra.cuda_kernels import OPS, build_dir
from lowra.sdk.quant import ops  # noqa: F401  (defines the lowra:: schemas)


def test_loader_imports_no_sdk_and_sees_missing_schemas() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torch
        import lowra.cuda_kernels as ck
        status = ck.load()
        assert not status
        print(sorted(m for m in sys.modules if m.startswith("lowra.sdk")), ck._missing_schemas(torch) == list(ck.OPS))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"]


def test_schemas_defined_by_the_sdk_are_found() -> None:
    from lowra.cuda_kernels import _missing_schemas

    assert _missing_schemas(torch) == [] and len(OPS) == 4


def test_builds_are_cached_under_lowra_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path))
    assert build_dir("abc") == tmp_path / "cuda_kernels" / "abc"

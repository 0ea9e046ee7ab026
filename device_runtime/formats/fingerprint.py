"""Identity of base weights: the fingerprint an adapter names to bind itself to the base it was trained on.

One definition for every reader (numpy runtime, ONNX and ExecuTorch engines) and writer (sdk, exporters), and one
check of a blob against a base (:func:`check_base_binding`), so every engine refuses a foreign adapter alike.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from lowra.device_runtime.errors import BaseMismatchError, BlobContentError

if TYPE_CHECKING:
    from lowra.device_runtime.formats.adapter import Blob


def tensor_digest(array: np.ndarray) -> str:
    """sha256 of a weight as contiguous little-endian float32 (so fp32 and bf16 files of one model agree)."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def base_fingerprint(module_digests: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Fingerprint of the targeted base weights: sha256 over sorted 'module|shape|sha256(weight)' lines."""
    h = hashlib.sha256()
    for name in sorted(module_digests):
        h.update(f"{name}|{list(shapes[name])}|{module_digests[name]}\n".encode())
    return "sha256:" + h.hexdigest()


def check_base_binding(
    blob: "Blob", digests: Mapping[str, str], shapes: Mapping[str, Sequence[int]], where: str
) -> None:
    """Refuse ``blob`` unless the base described by ``digests``/``shapes`` (module -> weight digest / [out, in])
    is the one it was trained on: every module known (else BaseMismatchError), every shape equal (else
    BlobContentError), the fingerprint over its modules equal (else BaseMismatchError). ``where`` names the base
    in messages, e.g. "the base at /models/smollm2"."""
    names = [m.name for m in blob.modules]
    unknown = [n for n in names if n not in shapes or n not in digests]
    if unknown:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} targets {len(unknown)} module(s) {where} does not have "
            f"(first: {unknown[0]!r}); it was trained for another base model"
        )
    for m in blob.modules:
        if list(shapes[m.name]) != [m.out_features, m.in_features]:
            raise BlobContentError(
                f"adapter module {m.name} is [{m.out_features}, {m.in_features}] but the base weight is "
                f"{list(shapes[m.name])}; the adapter was made for another model"
            )
    expected = base_fingerprint({n: digests[n] for n in names}, {n: tuple(shapes[n]) for n in names})
    if blob.base_fingerprint != expected:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} was trained against base {blob.base_fingerprint[:23]}..., but {where} is "
            f"{expected[:23]}...; load the base it was trained on or retrain the adapter for this base"
        )

"""Identity of base weights: the fingerprint an adapter names to bind itself to the base it was trained on.

One definition for every reader (numpy runtime, ONNX and ExecutorTorch engines) and writer (sdk, exporters).
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

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

"""Tiny numpy-only bases and blobs for the device runtime tests (no torch, no sdk)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.runtime import BaseWeights
from lowra.device_runtime.formats.container import serialize

# module path -> (out_features, in_features)
TINY_MODULES = {
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.mlp.down_proj": (16, 40),
    "model.layers.1.self_attn.q_proj": (24, 16),
}
CREATED = "2026-01-01T00:00:00+00:00"


def write_base(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {f"{m}.weight": rng.standard_normal(shape).astype(np.float32) for m, shape in TINY_MODULES.items()}
    tensors["model.norm.weight"] = np.ones(16, dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(serialize(tensors, {"format": "pt"}))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder


def scaled_levels(scale: float):
    """A codebook maker: ``2**w`` sorted normal draws times ``scale``, as float16."""
    return lambda rng, w: np.sort(rng.standard_normal(1 << w) * scale).astype(np.float16)


def random_channels(rng: np.random.Generator, entries, widths, levels_of):
    """Widths, codes and codebooks of every channel of ``entries`` in blob order: component k of every module gets
    ``widths[k % len(widths)]`` on both sides, random codes, and ``levels_of(rng, w)`` as its codebook (the one
    random blob recipe the device, native and ONNX tests share; its draw order is what their golden values fix)."""
    all_widths, codes, levels = [], [], []
    for e in entries:
        for length in (e.in_features, e.out_features):
            for k in range(e.rank):
                w = widths[k % len(widths)]
                all_widths.append(w)
                codes.append(rng.integers(0, 1 << w, length).astype(np.uint8) if w else np.zeros(0, np.uint8))
                levels.append(levels_of(rng, w) if w else np.zeros(0, np.float16))
    return np.array(all_widths, np.uint8), codes, levels


def normal_levels(rng: np.random.Generator, width: int) -> np.ndarray:
    return np.sort(rng.standard_normal(1 << width) * 0.05).astype(np.float16)


def recovery_blob(modules: dict[str, tuple[int, int]], rank: int = 3, seed: int = 4, widths=(4, 2, 0),
                  fingerprint: str = "sha256:" + "0" * 64) -> bytes:
    """An adapter blob over ``modules`` (name -> (out, in)) as a version-3 base stores its recovery adapter; component
    2 of every module is dropped (width 0), so the decode keeps fewer components than the rank."""
    rng = np.random.default_rng(seed)
    entries = [fmt.ModuleEntry(m, o, i, rank) for m, (o, i) in modules.items()]
    all_widths, codes, levels = random_channels(rng, entries, widths, normal_levels)
    meta = {"adapter_id": "recovery", "base_fingerprint": fingerprint, "lora": {"rank": rank},
            "scheme": {"method": "test"}, "created": CREATED, "card": {}}
    return fmt.build_blob_bytes(entries, all_widths, codes, levels, meta)


def make_blob_bytes(base_dir: Path, seed: int = 1, rank: int = 4, widths: tuple[int, ...] = (4, 2, 1, 0),
                    adapter_id: str = "user-a", modules: dict | None = None) -> bytes:
    """A valid blob with random codes/levels; component k of every module gets widths[k] on both sides."""
    rng = np.random.default_rng(seed)
    modules = modules or TINY_MODULES
    entries = [fmt.ModuleEntry(m, o, i, rank) for m, (o, i) in modules.items()]
    all_widths, codes, levels = random_channels(rng, entries, widths, scaled_levels(0.05))
    base = BaseWeights(base_dir)
    fingerprint = base.fingerprint([e.name for e in entries]) if all(f"{e.name}.weight" in base.tensors for e in entries) else "sha256:" + "0" * 64
    meta = {
        "adapter_id": adapter_id,
        "base_fingerprint": fingerprint,
        "lora": {"rank": rank, "alpha": 2 * rank, "targets": ["q_proj", "down_proj"], "scaling": 2.0},
        "scheme": {"method": "test"},
        "created": CREATED,
        "card": {"task": "test"},
    }
    return fmt.build_blob_bytes(entries, all_widths, codes, levels, meta)


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    return write_base(tmp_path / "base")

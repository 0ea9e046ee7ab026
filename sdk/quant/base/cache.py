"""``cached_quantized_base``: a base quantized once per (base files, config, method) and kept in lowra's cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

from typing import Any

from torch import nn

from lowra.device_runtime._files import cache_dir
from lowra.device_runtime.errors import LowraError
from lowra.device_runtime.formats.quantized_base import read_quantized_base
from lowra.sdk.quant.base.apply import quantize_model
from lowra.sdk.quant.base.config import QuantizeConfig
from lowra.sdk.quant.base.plan import METHOD

__all__ = ["cached_quantized_base"]


def cached_quantized_base(
    model: nn.Module, base_path: str | Path, config: QuantizeConfig, tokenizer: Any = None, progress: bool = True
) -> Path:
    """The quantized base of ``model`` (loaded from ``base_path``) under ``config``, written once to the lowra cache.

    A calibrated ``config`` (the default) needs the base's ``tokenizer`` for its calibration text.

    The cache key covers the base folder, its weight files' sizes and times, the config and the method, so a changed
    base or quantizer writes a new file. A cached file is verified (checksum) before use; a damaged one is redone.
    """
    base_path = Path(base_path).resolve()
    stamp = [str(base_path), repr(config), METHOD]
    for f in sorted(base_path.glob("*.safetensors")) if base_path.is_dir() else []:
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:12]
    path = cache_dir("quantized") / f"{base_path.name}-{config.bits:g}bit-{key}.safetensors"
    if path.is_file():
        try:
            read_quantized_base(path)
            return path
        except LowraError:
            pass  # damaged (e.g. a disk error): quantize again and replace it
    path.parent.mkdir(parents=True, exist_ok=True)
    quantized = quantize_model(model, config, tokenizer=tokenizer, progress=progress, source=str(base_path))
    quantized.write(path, overwrite=True)
    return path

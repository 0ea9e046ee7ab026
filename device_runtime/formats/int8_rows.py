"""8-bit rows with a float16 scale per block of 32: how an exported program may store a model's token embedding and
output head (``embeddings="int8"``; docs/FORMAT.md, ExecuTorch model folder).

    W[r, j] = q[r, j] * float(scale[r, j // Q8_BLOCK])        q int8 in [-127, 127], scale float16

The rule of llama.cpp's Q8_0 blocks: ``scale = absmax / 127`` of the block, rounded to float16, and
``q = round(w / scale)`` (half to even) against that float16 scale; a block of zeros has scale 0 and codes 0.
The exporter writes these with :func:`quantize_q8`; ``lowra::q8_linear`` / ``lowra::q8_embedding`` (and their
reference in ``sdk.quant.ops``) read them; :func:`dequantize_q8` is the reference decode.
"""
from __future__ import annotations

import numpy as np

from lowra.device_runtime.errors import ConfigError

__all__ = ["Q8_BLOCK", "dequantize_q8", "quantize_q8"]

Q8_BLOCK = 32


def quantize_q8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` float [rows, cols] (cols a multiple of Q8_BLOCK) -> (int8 codes [rows, cols], float16 scales
    [rows, cols // Q8_BLOCK])."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[1] == 0 or weight.shape[1] % Q8_BLOCK:
        raise ConfigError(f"8-bit rows need a [rows, cols] matrix with cols a multiple of {Q8_BLOCK}; got shape "
                          f"{list(weight.shape)}")
    if not np.isfinite(weight).all():
        raise ConfigError("8-bit rows of a matrix with NaN or infinite values")
    blocks = weight.reshape(weight.shape[0], -1, Q8_BLOCK)
    scales = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float16)
    scale32 = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale32 > 0, np.rint(blocks / np.where(scale32 > 0, scale32, 1)), 0)
    codes = np.clip(codes, -127, 127).astype(np.int8).reshape(weight.shape)
    return codes, scales


def dequantize_q8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, cols]: ``codes * scale`` of each block, one float32 multiply per element."""
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if (codes.dtype != np.int8 or scales.dtype != np.float16 or codes.ndim != 2 or codes.shape[1] % Q8_BLOCK
            or scales.shape != (codes.shape[0], codes.shape[1] // Q8_BLOCK)):
        raise ConfigError(f"8-bit rows: codes {codes.dtype} {list(codes.shape)} and scales {scales.dtype} "
                          f"{list(scales.shape)}; expected int8 [rows, cols] (cols a multiple of {Q8_BLOCK}) and "
                          f"float16 [rows, cols / {Q8_BLOCK}]")
    values = codes.astype(np.float32).reshape(codes.shape[0], -1, Q8_BLOCK) * scales.astype(np.float32)[..., None]
    return values.reshape(codes.shape)

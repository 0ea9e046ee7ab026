"""Configuration of the ONNX export, and the opset and domains the graphs use."""
from __future__ import annotations

from dataclasses import dataclass

from lowra.device_runtime.errors import ConfigError

OPSET = 25  # UINT2 needs >= 25; ORT 1.32 has no kernels for the opset-28 DequantizeLinear (ENVIRONMENT.md)
LOWRA_DOMAIN = "ai.lowra"
MS_DOMAIN = "com.microsoft"


@dataclass
class OnnxExportConfig:
    """``matmulnbits``: "never" or "affine" (2/4-bit row groups whose codebooks are affine use MatMulNBits).

    ``dense_dtype``: storage of the dense tensors (embeddings, norms, head); cast to float32 in the graph.
    ``max_positions``: the longest sequence (prompt + generated) the engine allows; default: the model config's.
    """

    matmulnbits: str = "never"
    dense_dtype: str = "float16"
    max_positions: int | None = None
    matmulnbits_block_size: int = 64
    # 0: float32 compute (exact up to rounding); 4: int8 activations (ORT's fast path, approximate)
    matmulnbits_accuracy_level: int = 0
    affine_tolerance: float = 2.0**-10  # relative to the row's largest |level|: fp16 rounding of the levels

    def __post_init__(self) -> None:
        if self.matmulnbits not in ("never", "affine"):
            raise ConfigError(f"matmulnbits={self.matmulnbits!r}; expected 'never' or 'affine'")
        if self.dense_dtype not in ("float16", "float32"):
            raise ConfigError(f"dense_dtype={self.dense_dtype!r}; expected 'float16' or 'float32'")
        b = self.matmulnbits_block_size
        if b < 16 or b & (b - 1):
            raise ConfigError(f"matmulnbits_block_size={b}; MatMulNBits needs a power of two >= 16")

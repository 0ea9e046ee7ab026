"""LowRA quantization of a base model's linear layers (see :mod:`.quantize`)."""
from lowra.sdk.quant.base.quantize import *  # noqa: F401,F403

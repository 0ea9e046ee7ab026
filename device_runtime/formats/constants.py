"""Names, versions and widths of every lowra on-disk format: the one table writers and readers import.

Each format's module (:mod:`.adapter`, :mod:`.quantized_base`, :mod:`.onnx_manifest`,
:mod:`.executorch_manifest`) defines its layout; the identifiers they share live here.
"""
from __future__ import annotations

# The adapter blob (docs/FORMAT.md, "Adapter blob").
ADAPTER_FORMAT = "lowra-adapter"
ADAPTER_VERSION = 1
ADAPTER_READS = (1,)

# The quantized base file (docs/FORMAT.md, "Quantized base").
BASE_FORMAT = "lowra-base"
BASE_VERSION = 1
BASE_READS = (1,)

# Bits a channel of an adapter may take; 0 drops the channel (decodes to zeros).
ADAPTER_WIDTHS = (0, 1, 2, 4)
# The 2-bit code that stands for each width in a packed width map (adapter channels and base rows alike).
WIDTH_CODE = {w: i for i, w in enumerate(ADAPTER_WIDTHS)}
# The widths that carry codes: an adapter channel of width > 0, and every row of a quantized base weight
# (a base row is always stored, so it never has width 0).
CODED_WIDTHS = (1, 2, 4)

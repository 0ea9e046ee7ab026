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
# A base that carries an accuracy-recovery adapter (``lowra recover``) is written as version 2, so a reader that
# predates recovery refuses it instead of running the base without it; a plain base stays version 1.
BASE_RECOVERY_VERSION = 2
# Version 3: the recovery adapter stored compressed, as one adapter blob (the user adapters' codec) inside the base.
BASE_COMPRESSED_RECOVERY_VERSION = 3
# Version 4: every layer's codebook levels stored as integers (6 bits; 8 in 4-bit rows) times a power of two per row
# (:mod:`.int_levels`), with or without a recovery adapter (either kind, told by its tensors).
BASE_INT_LEVELS_VERSION = 4
BASE_READS = (1, 2, 3, 4)
# How a base file stores its layers' codebook levels: "float16" (versions 1-3) or "int" (version 4).
CODEBOOK_FORMATS = ("float16", "int")
# How the CLI names each of them to a person.
CODEBOOK_FORMAT_TEXT = {"float16": "float16 levels", "int": "integers x 2**e per row (6 bits; 8 in 4-bit rows)"}

# Bits a channel of an adapter may take; 0 drops the channel (decodes to zeros).
ADAPTER_WIDTHS = (0, 1, 2, 4)
# The 2-bit code that stands for each width in a packed width map (adapter channels and base rows alike).
WIDTH_CODE = {w: i for i, w in enumerate(ADAPTER_WIDTHS)}
# The widths that carry codes: an adapter channel of width > 0, and every row of a quantized base weight
# (a base row is always stored, so it never has width 0).
CODED_WIDTHS = (1, 2, 4)

# The two ways an engine runs a user (``load_user(blob, mode=...)``), which are also the names of an ExecuTorch
# folder's programs: "merge" adds up @ down into the base weights at load; "side" keeps the base as it is and
# runs the adapter as an unmerged side branch x @ down^T @ up^T.
USER_MODES = ("side", "merge")

# Both exported model folders ship the base's Hugging Face ``tokenizers`` file under this name.
TOKENIZER_FILE = "tokenizer.json"
# The prompt template a manifest without ``prompt_template`` stands for: the ChatML turn of SmolLM2-Instruct, which
# every export wrapped prompts in before exporters recorded the tokenizer's own template. ``{prompt}`` is the
# user's text (a ``str.format`` pattern: literal braces are doubled).
CHATML_PROMPT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

"""DemoConfig: what `lowra demo` runs. Torch-free, so `lowra --help` shows the demo's defaults without torch."""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

from lowra.sdk.adapters.config import LoraConfig

# The sample users ship as package data (lowra.samples), so an installed wheel runs the demo too.
SAMPLE_USERS = Path(str(importlib.resources.files("lowra.samples"))) / "users"


@dataclass
class DemoConfig:
    out: str = "out/demo"
    users: tuple[str, ...] = tuple(str(SAMPLE_USERS / u) for u in ("terse_notes", "python_help", "json_reply"))
    steps: int = 40
    bits: float = 1.0
    sweep: tuple[float, ...] = (0.5, 2.0)
    base: str | None = None
    # The base users train on: quantized to this many effective bits (LowRA, cached after the first run);
    # None trains on the full-precision base. 4 bits, the lowest budget that measures good after a user adapter
    # (docs/RESULTS.md, "After a user adapter", 2026-11-30): the sample users' adapters on the 4-bit base are within
    # 1.4% of the same adapters on fp32 over all held-out tokens, on the 3-bit base 13.9% worse (up to 81% for one
    # user). Sub-2-bit bases are for larger models; `--base-bits 1.5` runs that path.
    base_bits: float | None = 4.0
    # How the demo's base stores its codebook levels (QuantizeConfig.codebook_format). At 4 bits float16 levels measure
    # better after a user adapter (docs/RESULTS.md, eighth session: 1.014x fp32 over all held-out tokens, per user
    # 1.10 / 1.01 / 1.12, against 1.053x and 1.78 / 1.01 / 1.43 with integer levels, the library default that is
    # better at 3 bits and below), so the demo's 4-bit base keeps them.
    base_codebook_format: str = "float16"
    weighted: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_new_tokens: int = 48
    force: bool = False  # replace a non-empty output folder (atomically, at the end of the run)

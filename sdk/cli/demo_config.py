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
    # None trains on the full-precision base. 4 bits by default because that is what SmolLM2-135M survives:
    # measured 2026-11-29 at 1.5 bits (uncalibrated, no LoftQ), terse_notes' held-out loss was 14.2 on the base
    # and 6.08 with its adapter (0.23 on the fp base) and the replies were "- - -" (docs/RESULTS.md). Sub-2-bit
    # bases are for larger models; `--base-bits 1.5` runs that path.
    base_bits: float | None = 4.0
    weighted: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_new_tokens: int = 48
    force: bool = False  # replace a non-empty output folder (atomically, at the end of the run)

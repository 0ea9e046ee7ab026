"""The sdk configs a command builds from its parsed flags (shared by the commands that train and compress)."""
from __future__ import annotations

import argparse
from typing import Any


def lora_config(args: argparse.Namespace) -> Any:
    from lowra.sdk.adapters.config import LoraConfig
    from lowra.sdk.targets import ALL_LINEAR

    targets = ALL_LINEAR if args.targets == ALL_LINEAR else [t.strip() for t in args.targets.split(",") if t.strip()]
    return LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets)


def compress_config(args: argparse.Namespace) -> Any:
    from lowra.sdk.quant.config import CompressConfig

    return CompressConfig(bits=args.bits, weighted=not args.unweighted)

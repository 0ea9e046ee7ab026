"""The ``lowra`` command: train, compress, inspect, merge, generate, quantize-base, demo, sign, keys.

Every subcommand runs offline on the CPU (CUDA when present), refuses to overwrite outputs unless --force,
and exits with status 2 and a one-line explanation when lowra refuses an input. The parser lives in
:mod:`.parser`, the commands in :mod:`.commands`; this module only connects them.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from lowra.device_runtime.errors import LowraError
from lowra.sdk.cli.commands import COMMANDS, quiet_third_party_logs
from lowra.sdk.cli.parser import build_parser
from lowra.sdk.threads import size_this_process


def main(argv: Sequence[str] | None = None) -> int:
    quiet_third_party_logs()
    args = build_parser().parse_args(argv)
    try:
        if args.command != "fleet" and hasattr(args, "threads"):
            size_this_process(args.threads)
        return COMMANDS[args.command](args)
    except (LowraError, FileExistsError, FileNotFoundError) as exc:
        command = " ".join(filter(None, (args.command, getattr(args, "keys_command", None))))
        print(f"lowra {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

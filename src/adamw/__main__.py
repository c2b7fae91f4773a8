"""The ``adamw`` command (also ``python -m adamw``): one subcommand per tool of :mod:`adamw.cli`.

Only the chosen command's module is imported (and with it torch), so ``adamw --help`` and
``adamw --version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# Each subcommand: (one-line help, its module). The module owns its options and its work:
# add_arguments(parser) and main(args, parser) -> exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("time a step of every implementation on named workloads", "adamw.cli.bench.command"),
    "demo": ("train a small model with torch.optim.AdamW and each low-bit mode; compare", "adamw.cli.demo.command"),
}


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, with the options of ``command`` only (the others' modules stay unimported)."""
    parser = argparse.ArgumentParser(prog="adamw", description="adamw: a drop-in torch.optim.AdamW with fused kernels.")
    parser.add_argument("--version", action="version", version=f"adamw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (summary, module) in COMMANDS.items():
        parsers[name] = subparsers.add_parser(name, help=summary)
        if name == command:
            importlib.import_module(module).add_arguments(parsers[name])
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The options before the command take no values, so the first other word is the command.
    parser, parsers = build_parser(next((word for word in argv if not word.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _, module = COMMANDS[args.command]
    code: int = importlib.import_module(module).main(args, parsers[args.command])
    return code


if __name__ == "__main__":
    sys.exit(main())

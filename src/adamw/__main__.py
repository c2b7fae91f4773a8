"""The ``adamw`` command (also ``python -m adamw``): one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__, bench

# Each subcommand: (one-line help, add its arguments to a parser, run it -> exit code).
# `adamw demo` will be one more entry here, with its module beside bench.py.
Command = tuple[
    str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, argparse.ArgumentParser], int]
]
COMMANDS: dict[str, Command] = {
    "bench": ("time a step of every implementation on named workloads", bench.add_arguments, bench.main),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="adamw", description="adamw: a drop-in torch.optim.AdamW with fused kernels.")
    parser.add_argument("--version", action="version", version=f"adamw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (summary, add_arguments, _) in COMMANDS.items():
        parsers[name] = subparsers.add_parser(name, help=summary)
        add_arguments(parsers[name])
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _, _, run = COMMANDS[args.command]
    return run(args, parsers[args.command])


if __name__ == "__main__":
    sys.exit(main())

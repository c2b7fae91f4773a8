"""The ``adamw`` command (also ``python -m adamw``): one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__, bench, demo

# Each subcommand: (one-line help, add its arguments to a parser, run it -> exit code); its module
# (beside this one) owns its options and its work.
Command = tuple[
    str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, argparse.ArgumentParser], int]
]
COMMANDS: dict[str, Command] = {
    "bench": ("time a step of every implementation on named workloads", bench.add_arguments, bench.main),
    "demo": (
        "train a small model with torch.optim.AdamW and with each lean mode, and compare",
        demo.add_arguments,
        lambda args, _parser: demo.main(args),
    ),
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

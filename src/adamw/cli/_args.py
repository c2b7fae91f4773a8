"""Argument types shared by the commands: a bad value becomes argparse's usage error (exit code 2,
the argument named, what it accepts listed)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def comma_list(names: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """A type for a comma-separated list of ``names`` (at least one); ``what`` names one in errors."""
    valid = list(names)

    def parse(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in valid]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; valid: {', '.join(valid)}"
            )
        return chosen

    return parse


def output_file(text: str) -> str:
    """A file the command writes when it is done: checked now, so that a typo does not cost the run.
    '' (write none) passes as it is."""
    if not text:
        return text
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file's path")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {directory!r} is not writable")
    return text

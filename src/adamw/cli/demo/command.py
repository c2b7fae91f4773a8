"""``adamw demo`` on the command line: its options, the run, and the exit code (1 when a check fails)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .._args import comma_list, output_file, positive
from .model import ModelConfig
from .report import format_table
from .train import MODE_KEYS, run_demo

DEVICES = "cpu, cuda, cuda:N"


def _device(text: str) -> torch.device:
    """A device the demo can train on here: the CPU, or a CUDA device that exists."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available in this torch build or on this machine; valid here: cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _threads(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (torch's default) or more, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Train a small character-level transformer with torch.optim.AdamW and with each low-bit mode."
    parser.epilog = "Exit status: 0 when every check passes, 1 when one fails, 2 for a usage error."
    parser.add_argument(
        "--steps", type=positive, default=None, help="training steps per mode (default 400; 30 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and stochastic rounding")
    parser.add_argument("--device", type=_device, default="cpu", help=f"device to train on: {DEVICES} (default cpu)")
    parser.add_argument(
        "--out", type=output_file, default="demo.png", help="PNG of the loss curves (default demo.png; '' for none)"
    )
    parser.add_argument(
        "--json", metavar="PATH", type=output_file, default=None, help="also write the results as JSON to PATH"
    )
    parser.add_argument(
        "--modes",
        type=comma_list(MODE_KEYS, "mode"),
        default=None,
        metavar="LIST",
        help=f"comma list of {{{','.join(MODE_KEYS)}}} (default all; include torch for the checks)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps: a smoke test, not a result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch CPU threads (default 1; 0 for torch's default). The model is small, and torch's threads "
        "slow down many times over when other jobs keep the cores busy",
    )


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out and not _has_matplotlib():  # said before the run, not after it
        parser.error(
            "argument --out: the loss curves are drawn with matplotlib, which is not installed here: "
            "pip install 'adamw[demo]', or --out '' for no plot"
        )
    quick = args.quick
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = ModelConfig(d_model=64, n_layers=1, n_heads=2, context=32) if quick else ModelConfig()
    report = run_demo(
        args.steps or (30 if quick else 400),
        args.seed,
        args.device,
        args.out or None,
        modes=args.modes,
        config=config,
        batch_size=8 if quick else 16,
        show_progress=not args.no_progress,
    )
    print(format_table(report))
    if quick:
        print("(--quick is a smoke test of a tiny model: the checks are the acceptance only on the default run)")
    if args.out:
        print(f"loss curves: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"results: {args.json}")
    failed = [name for name, ok in report["checks"].items() if not ok]
    if failed:
        print(f"adamw demo: {len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0

"""``adamw bench`` on the command line: its options, their help, and the run they start."""

from __future__ import annotations

import argparse
import json

import torch

from .._args import comma_list, output_file, positive
from .report import format_report, to_json
from .timing import FORMULA, Config, run
from .workloads import IMPLEMENTATIONS, WORKLOADS, MiB

EPILOG = f"""\
workloads:
{chr(10).join(f"  {w.name:<6} {w.description}" for w in WORKLOADS.values())}

implementations:
{chr(10).join(f"  {i.name:<14} {i.description}" for i in IMPLEMENTATIONS.values())}
  one that cannot run here (e.g. its kernel cannot be built) is listed as "unavailable: <reason>".

columns:
  ms/step      median over the timing windows of (window time / steps in it); min-max of the windows
  Mparams/s    parameters updated per second
  GB/s         bytes a step must move / ms/step
  % copy       GB/s as a fraction of this machine's bandwidth, measured in the same run by a large
               dst.copy_(src) counted as read + write. On a CPU the copy also pays a hidden read of
               each destination line (write-allocate) that an in-place update does not, so a good
               kernel can exceed 100%.
  vs torch-fused
               torch-fused's ms/step / this row's: above 1 is faster than torch's fused step
  x floor      this row's ms/step / that of its storage format's floor row (1.00: at the memory limit)
  floor rows   a storage format's memory traffic with no arithmetic: param, grad and every state
               tensor of the format (not amsgrad's max_exp_avg_sq) read once, param and state written
               back unchanged, on the same buffers. No step in that format can take less time. A C
               pass over CPU tensors: left out on CUDA unless named in --impls.

{FORMULA}

timing: every implementation of a workload takes its warm-up steps, then the timed steps run in
windows (steps rounded down to a multiple of --windows), interleaved across the implementations and
the copy in an order rotated every round, so drift on a shared machine touches all alike. On CPU
each step is its own window by default, so that a busy machine's hiccups (a 2-thread step stalls
when a core is taken) stay out of the median. On CPU a step's time also depends on which physical
memory backs its tensors (the same kernel can run markedly slower on one fresh allocation than on
another), so the implementations of a workload step the same params, grads and state tensors (each
state format its own) and only what they do with them differs; a standalone timing can differ from
the table by that much.

memory: every implementation of a workload is alive at once, its params, grads and states shared
(GPT-2 in float32: ~1 GB of params and grads plus ~1 GB of float32 state, and each other state
format's own). Hyper-parameters: lr=1e-3, weight_decay=1e-2, torch's betas and eps.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Time one AdamW step of each implementation (ours and torch.optim.AdamW's) on named workloads."
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--workloads",
        type=comma_list(WORKLOADS, "workload"),
        default=list(WORKLOADS),
        metavar="LIST",
        help=f"comma list of {{{','.join(WORKLOADS)}}} (default: all)",
    )
    parser.add_argument(
        "--impls",
        type=comma_list(IMPLEMENTATIONS, "implementation"),
        metavar="LIST",
        help="comma list of implementations (default: all, see below; on CUDA all but the floor rows)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=positive, help="timed steps per implementation (default: CPU 10, CUDA 100)")
    parser.add_argument("--warmup", type=positive, help="untimed steps first (default: CPU 2, CUDA 10)")
    parser.add_argument("--windows", type=positive, help="timing windows (default: CPU one per step, CUDA 10)")
    parser.add_argument(
        "--threads", type=positive, help=f"torch.set_num_threads (default here: {torch.get_num_threads()})"
    )
    parser.add_argument("--amsgrad", action="store_true", help="benchmark with amsgrad=True")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the results as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 3 steps, 1 warm-up, small copy: a smoke test in seconds (numbers are meaningless)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine")
    cuda = device == "cuda"
    if args.quick:
        steps, warmup, copy_bytes = 3, 1, 8 * MiB
    else:
        steps, warmup, copy_bytes = (100, 10, 1024 * MiB) if cuda else (10, 2, 256 * MiB)
    steps = args.steps or steps
    return Config(
        device=device,
        workloads=args.workloads,
        impls=args.impls or default_impls(device),
        steps=steps,
        warmup=args.warmup or warmup,
        windows=args.windows or (10 if cuda and not args.quick else steps),
        threads=args.threads or torch.get_num_threads(),
        amsgrad=args.amsgrad,
        quick=args.quick,
        copy_bytes=copy_bytes,
        copies_per_window=20 if cuda and not args.quick else 1,
        progress=args.progress,
    )


def default_impls(device: str) -> list[str]:
    """Every implementation that runs on ``device``: the floor rows stream CPU tensors only."""
    return [name for name in IMPLEMENTATIONS if device == "cpu" or not name.startswith("floor")]


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = config_from_args(args, parser)
    results, copy, meta = run(config)
    print(format_report(results, copy, meta))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, copy, meta), out, indent=2)
            out.write("\n")
    return 0

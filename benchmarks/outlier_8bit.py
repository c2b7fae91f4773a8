"""How one outlier grad element affects the rest of its 8-bit block, against torch.optim.AdamW.

One param of 4096 values (16 blocks of 256) gets unit-normal grads every step; at step 1 one element's
grad is ``--outlier`` times larger. The same grads go to ``torch.optim.AdamW`` (float32 state) and to
``adamw.AdamW(state_precision="8bit")``. For the other 255 values of the outlier's block, and for a
block without the outlier, it prints how large a step each takes relative to torch's (the mean
absolute update of those values, ours over torch's), as the minimum and maximum of that ratio over
windows of steps.

    python benchmarks/outlier_8bit.py --steps 30000

Weight decay is 0 so that each update is the moments' alone; default betas, lr and eps.
"""

from __future__ import annotations

import argparse

import torch

import adamw

NUMEL = 4096
BLOCK = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--outlier", type=float, default=1e6, help="the outlier grad over a unit-normal one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    start = torch.randn(NUMEL)
    theirs = torch.nn.Parameter(start.clone())
    ours = torch.nn.Parameter(start.clone())
    torch_opt = torch.optim.AdamW([theirs], weight_decay=0.0)
    our_opt = adamw.AdamW([ours], weight_decay=0.0, state_precision="8bit", fused=True)

    same_block = slice(1, BLOCK)  # the outlier is element 0
    other_block = slice(BLOCK, 2 * BLOCK)
    edges = [e for e in (1, 10, 100, 1_000, 10_000, 30_000, 100_000) if e < args.steps] + [args.steps]
    windows: dict[int, list[tuple[float, float]]] = {end: [] for end in edges}
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        grad = torch.randn(NUMEL, generator=generator)
        if step == 1:
            grad[0] *= args.outlier
        before_theirs, before_ours = theirs.detach().clone(), ours.detach().clone()
        theirs.grad, ours.grad = grad.clone(), grad.clone()
        torch_opt.step()
        our_opt.step()
        delta_theirs = (theirs.detach() - before_theirs).abs()
        delta_ours = (ours.detach() - before_ours).abs()
        ratios = tuple(
            float(delta_ours[part].mean() / delta_theirs[part].mean()) for part in (same_block, other_block)
        )
        windows[next(end for end in edges if step <= end)].append(ratios)

    print(f"outlier {args.outlier:g} x a unit-normal grad at step 1; our step / torch's step (mean |update|)")
    print(f"{'steps':>15}  {'outlier block: min':>18} {'max':>6}  {'other block: min':>16} {'max':>6}")
    first = 1
    for end, ratios in windows.items():
        if ratios:
            same, other = zip(*ratios, strict=True)
            print(f"{first:>7}-{end:<7}  {min(same):18.2f} {max(same):6.2f}  {min(other):16.2f} {max(other):6.2f}")
        first = end + 1


if __name__ == "__main__":
    main()

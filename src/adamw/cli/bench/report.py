"""The report of ``adamw bench``: a text table and the JSON of the same results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .timing import Copy, Result
from .workloads import MiB

BUSY_WARNING = 0.1  # others' share of CPU time above which the report warns that timings are noisy


def format_report(results: list[Result], copy: Copy, meta: dict[str, Any]) -> str:
    lines = [
        f"adamw bench {meta['adamw']}  {meta['date']}",
        f"device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads, torch {meta['torch']}",
        f"copy bandwidth (dst.copy_(src), {copy.bytes_per_copy // 2 / MiB:.0f} MiB, read+write): "
        f"{copy.gb_per_s:.1f} GB/s",
        f"{meta['steps']} timed steps in {meta['windows']} windows after {meta['warmup']} warm-up; "
        f"ms/step is the median {'step' if meta['steps'] == meta['windows'] else 'window'} (min-max)"
        + (", amsgrad" if meta["amsgrad"] else ""),
    ]
    others = meta.get("others_cpu_fraction")
    if others is not None and others >= BUSY_WARNING:
        lines.append(
            f"warning: other processes used {100 * others:.0f}% of this machine's CPU time during the run; "
            "multi-threaded CPU steps slow down far more than that share, so expect noisy numbers"
        )
    lines.append("")
    header = (
        "workload",
        "implementation",
        "ms/step",
        "min-max",
        "Mparams/s",
        "GB/s",
        "% copy",
        "vs torch-fused",
        "x floor",
    )
    rows: list[Sequence[str]] = []
    for r in results:
        if r.status != "ok":
            rows.append((r.workload, r.impl, f"unavailable: {r.reason}"))
            continue
        row = (
            r.workload,
            r.impl,
            f"{r.ms_median:.3f}",
            f"{r.ms_min:.3f}-{r.ms_max:.3f}",
            f"{r.params_per_s / 1e6:.0f}",
            f"{r.gb_per_s:.1f}",
            f"{100 * r.fraction_of_copy:.0f}%",
            f"{r.vs_torch_fused:.2f}x" if r.vs_torch_fused is not None else "-",
            f"{r.over_floor:.2f}" if r.over_floor is not None else "-",
        )
        rows.append(row)
    # A note row ("unavailable: ...") runs on past the numeric columns, left-aligned, and sets no width.
    widths = [max(len(h), *(len(row[i]) for row in rows if len(row) == len(header))) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        note = len(cells) < len(header)  # otherwise workload and implementation left-aligned, numbers right
        pairs = enumerate(zip(cells, widths, strict=False))
        return "  ".join(c.ljust(w) if note or i < 2 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    lines += [line(header), line(["-" * w for w in widths])]
    for i, cells in enumerate(rows):
        if i > 0 and cells[0] != rows[i - 1][0]:  # a blank line between workloads
            lines.append("")
        lines.append(line(cells))
    return "\n".join(lines)


def to_json(results: list[Result], copy: Copy, meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "copy": asdict(copy), "results": [asdict(r) for r in results]}

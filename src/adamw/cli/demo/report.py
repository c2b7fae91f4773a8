"""The report of ``adamw demo``: the results as a text table with the checks, and the loss curves as a PNG."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import RunResult


def plot_losses(results: list[RunResult], path: str) -> None:
    """Loss curves of every mode (smoothed), and each one's difference from torch's, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(13, 5))
    smooth = {r.mode: list(_ema(r.losses, 0.9)) for r in results}
    baseline = smooth.get("torch")
    for r in results:
        style = "--" if r.mode in ("torch", "adamw") else "-"
        ax_loss.plot(smooth[r.mode], style, label=r.mode, linewidth=1.2)
        if baseline is not None:
            diff = [100 * (a / b - 1) for a, b in zip(smooth[r.mode], baseline, strict=True)]
            ax_diff.plot(diff, style, label=r.mode, linewidth=1.2)
    ax_loss.set_title("training loss (EMA 0.9)")
    ax_loss.set_ylabel("cross-entropy (nats/char)")
    ax_diff.set_title("difference from torch.optim.AdamW (EMA 0.9)")
    ax_diff.set_ylabel("% of torch's loss")
    for ax in (ax_loss, ax_diff):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(values: list[float], decay: float) -> Iterator[float]:
    average = values[0] if values else 0.0
    for v in values:
        average = decay * average + (1 - decay) * v
        yield average


def format_table(report: dict[str, Any]) -> str:
    """The results as an aligned text table, then the acceptance checks."""
    header = ["mode", "final loss", "vs torch", "state bytes", "param bytes", "bytes/param", "ms/step", "opt ms"]
    rows = [header]
    for r in report["results"]:
        vs = r["vs_torch"]
        rows.append(
            [
                r["mode"],
                f"{r['final_loss']:.4f}",
                "" if vs is None else f"{vs:+.2%}",
                f"{r['state_bytes']:,}",
                f"{r['param_bytes']:,}",
                f"{r['bytes_per_param']:.2f}",
                f"{r['ms_per_step']:.1f}",
                f"{r['optimizer_ms_per_step']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    model = report["model"]
    lines.append("")
    lines.append(
        f"{report['steps']} steps, seed {report['seed']}, {model['params']:,} params "
        f"({model['n_layers']} layers, d_model {model['d_model']}, context {model['context']}), "
        f"{report['seconds']:.0f} s. bytes/param = (state + params) / params; final loss = mean of the last steps; "
        "opt ms = the optimizer's step and zero_grad."
    )
    implementations = {r["mode"]: r["implementation"] for r in report["results"]}
    for implementation in dict.fromkeys(implementations.values()):
        modes = [mode for mode, used in implementations.items() if used == implementation]
        lines.append(f"{'; '.join(modes)}: {implementation}")
    for name, ok in report["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}")
    return "\n".join(lines)

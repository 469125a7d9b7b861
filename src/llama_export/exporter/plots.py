"""Pictures: verify's per-position comparison of a package with PyTorch, and bench tables as bar charts
(matplotlib, drawn without a display)."""

from __future__ import annotations

from pathlib import Path

from llama_export.exporter.errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parity(result: dict, path: Path, title: str) -> None:
    """For each prompt, along its positions (the prompt, then the greedy tokens): the largest |logit difference|
    from the fp32 source, whether the top-1 token agrees, and (quantized packages) the KL divergence."""
    prompts = [p for p in result.get("prompts", []) if "per_position" in p]
    if not prompts:
        raise UserError("the verify result has no per-position figures to plot")
    quantized = result.get("precision") != "fp32"
    plt = _pyplot()
    rows = 3 if quantized else 2
    figure, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    longest = max(len(p["per_position"]["top1_agrees"]) for p in prompts)
    agreement = [[float("nan")] * longest for _ in prompts]
    for number, prompt in enumerate(prompts, 1):
        series = prompt["per_position"]
        positions = range(len(series["max_abs_logit_diff"]))
        line, = axes[0].plot(positions, [max(d, 1e-9) for d in series["max_abs_logit_diff"]], lw=1,
                             label=f"prompt {number}")
        axes[0].axvline(prompt["prompt_tokens"] - 1, color=line.get_color(), lw=0.6, ls=":")
        agreement[number - 1][:len(series["top1_agrees"])] = [1.0 if a else 0.0 for a in series["top1_agrees"]]
        if quantized:
            axes[2].plot(positions, [max(k, 1e-9) for k in series["kl"]], lw=1, color=line.get_color())
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max |logit diff|")
    axes[0].legend(fontsize=7, ncol=min(len(prompts), 5), loc="upper left")
    axes[1].imshow(agreement, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest",
                   extent=(-0.5, longest - 0.5, len(prompts) + 0.5, 0.5))
    axes[1].set_yticks(range(1, len(prompts) + 1))
    axes[1].set_ylabel("prompt")
    axes[1].set_title(f"top-1 agreement (green: same token; overall {result['top1_agreement']:.3f})", fontsize=9)
    if quantized:
        axes[2].set_yscale("log")
        axes[2].set_ylabel("KL (nats)")
    axes[-1].set_xlabel("position (dotted: the last prompt token; greedy tokens after it)")
    figure.suptitle(f"{title} ({'passed' if result.get('passed') else 'FAILED'})", fontsize=10)
    figure.tight_layout()
    _save(figure, plt, path)


def plot_table(title: str, header: list[str], rows: list[list], path: Path) -> None:
    """A bench table as grouped bars: one group per row (its first cell names it), one bar per numeric column."""
    plt = _pyplot()
    columns = [i for i in range(1, len(header)) if any(_number(row[i]) is not None for row in rows)]
    if not columns or not rows:
        return
    figure, axes = plt.subplots(len(columns), 1, figsize=(max(6, 1.2 * len(rows) + 2), 2.4 * len(columns) + 0.6),
                                squeeze=False)
    for axis, column in zip(axes[:, 0], columns):
        values = [_number(row[column]) or 0.0 for row in rows]  # a missing figure ("-") draws no bar
        bars = axis.bar([str(row[0]) for row in rows], values, color="#4c72b0")
        axis.bar_label(bars, labels=[str(row[column]) for row in rows], fontsize=7)
        axis.set_ylabel(header[column], fontsize=8)
        axis.tick_params(axis="x", labelsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    _save(figure, plt, path)


def _number(cell) -> float | None:
    try:
        return float(str(cell).split()[0].rstrip("%x"))
    except (ValueError, IndexError):
        return None


def _save(figure, plt, path: Path) -> None:
    try:
        figure.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # ValueError: a format matplotlib does not write
        raise UserError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        plt.close(figure)

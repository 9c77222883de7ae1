"""Loss and learning-rate curves from ``metrics.jsonl`` (needs matplotlib: ``pip install accel_trainer[plot]``)."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def metrics_figure(output_dir: str | Path):
    """A matplotlib ``Figure`` of train/val loss and the LR of every optimizer against step and tokens,
    and, when the run measured them, validation bits per byte and benchmark task metrics against
    step; nothing is written (a notebook shows it, :func:`plot_metrics` saves it).

    Raises:
        ValueError: no metrics.jsonl, or it holds no loss records.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend is chosen or changed

    output_dir = Path(output_dir)
    source = output_dir if output_dir.suffix == ".jsonl" else output_dir / "metrics.jsonl"
    if not source.is_file():
        raise ValueError(f"{source}: no such file (is {output_dir} a run's output dir?)")
    records = read_metrics(source)
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    if not train:
        raise ValueError(f"{source}: no records with a 'loss' to plot")
    lr_keys = sorted({k for r in train for k in r if k.startswith("lr/")})
    bpb = [r for r in records if r.get("val_bpb") is not None]
    task_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    quality = bool(bpb or task_keys)
    fig = Figure(figsize=(12, 12 if quality else 8), constrained_layout=True)
    axes = fig.subplots(3 if quality else 2, 2)
    if quality:
        ax = axes[2][0]
        ax.plot([r["step"] for r in bpb], [r["val_bpb"] for r in bpb], "o-", label="val bits per byte")
        ax.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte (compares tokenizers)")
        if bpb:
            ax.legend()
        ax = axes[2][1]
        for key in task_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([s for s, _ in points], [v for _, v in points], "o-", label=key[5:])
        ax.set(xlabel="step", ylabel="score", title="benchmark tasks (lm-evaluation-harness)")
        if task_keys:
            ax.legend()
    for col, (x_key, x_label) in enumerate((("step", "step"), ("tokens_seen", "tokens seen"))):
        ax = axes[0][col]
        ax.plot([r[x_key] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
        if any("ema_loss" in r for r in train):
            ax.plot([r[x_key] for r in train], [r.get("ema_loss") for r in train], label="train loss (EMA)")
        if val:
            ax.plot([r[x_key] for r in val if x_key in r], [r["val_loss"] for r in val if x_key in r], "o-",
                    label="val loss")
        ax.set(xlabel=x_label, ylabel="loss", title=f"loss vs {x_label}")
        ax.legend()
        ax = axes[1][col]
        for key in lr_keys:
            ax.plot([r[x_key] for r in train if key in r], [r[key] for r in train if key in r], label=key[3:])
        ax.set(xlabel=x_label, ylabel="learning rate", title=f"LR per optimizer vs {x_label}")
        if lr_keys:
            ax.legend()
    return fig


def plot_metrics(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write :func:`metrics_figure` as a PNG.

    Args:
        output_dir: a run's output dir (or its ``metrics.jsonl``).
        out: the PNG path; default ``<output_dir>/metrics.png``.

    Returns:
        The PNG's path.

    Raises:
        ValueError: no metrics.jsonl, or it holds no loss records.
    """
    fig = metrics_figure(output_dir)
    output_dir = Path(output_dir)
    out = Path(out) if out else (output_dir.parent if output_dir.suffix == ".jsonl" else output_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    return out

"""What a run prints: progress bars on a terminal, plain lines in a log file, and the closing report.

A tqdm bar redraws itself with carriage returns; in a log file (stderr not a terminal, as under
Slurm or ``> run.log``) every redraw stays, and bars that are closed after another line are drawn
again. So bars are shown only on a terminal, and a log gets one line per logging step instead.
"""

from __future__ import annotations

import sys
from pathlib import Path


def interactive() -> bool:
    """True when progress bars can redraw in place (stderr is a terminal)."""
    return sys.stderr.isatty()


def quiet_library_bars(*libraries: str) -> None:
    """Off a terminal, silence the progress bars of ``datasets`` (one per split and map) and/or
    ``transformers`` (one per model load)."""
    if interactive():
        return
    if "datasets" in libraries:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in libraries:
        from transformers.utils import logging

        logging.disable_progress_bar()


def progress_postfix(metrics: dict) -> dict[str, str]:
    """The training bar's postfix: the loss and every optimizer's LR."""
    out = {"loss": f"{metrics['loss']:.4f}"}
    out.update({name: f"{value:.2e}" for name, value in metrics.items() if name.startswith("lr/")})
    return out


def progress_line(step: int, total: int, metrics: dict) -> str:
    """One line per logging step for a log file: step, loss, every optimizer's LR, throughput."""
    parts = [f"step {step}/{total}"] + [f"{k} {v}" for k, v in progress_postfix(metrics).items()]
    if metrics.get("tokens_per_second"):
        parts.append(f"{metrics['tokens_per_second']:,.0f} tokens/s")
    if metrics.get("val_loss") is not None:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if metrics.get("val_bpb") is not None:
        parts.append(f"val_bpb {metrics['val_bpb']:.4f}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


def final_report(*, step: int, total_steps: int, stopped_by: str | None, seconds: float, tokens_seen: int,
                 tokens_this_run: int, ema_loss: float | None, last_eval: tuple[int, float] | None,
                 best: dict | None, latest_step: int | None, output_dir: str | Path, metrics_file: Path | None,
                 tensorboard_dir: str | None) -> str:
    """The few lines a run ends with: where it got, how well, how fast, and where everything is."""
    out = Path(output_dir)
    ended = f"stopped at step {step} of {total_steps} by {stopped_by}" if stopped_by else f"finished step {step}"
    lines = [f"{ended} in {_duration(seconds)}: {tokens_this_run:,} tokens in this run "
             f"({tokens_this_run / max(seconds, 1e-9):,.0f} tokens/s), {tokens_seen:,} in all"]
    losses = [f"train loss (EMA) {'n/a' if ema_loss is None else f'{ema_loss:.4f}'}"]
    if last_eval is not None:
        losses.append(f"last val loss {last_eval[1]:.4f} (step {last_eval[0]})")
    if best is not None:
        what = "val loss" if best.get("metric", "val_loss") == "val_loss" else best["metric"]
        losses.append(f"best {what} {best['value']:.4f} (step {best['step']})")
    lines.append("; ".join(losses))
    if metrics_file is not None:
        lines.append(f"metrics      {metrics_file}")
    if tensorboard_dir is not None:
        lines.append(f"TensorBoard  {tensorboard_dir}  (tensorboard --logdir {out})")
    saved = [f"latest step-{latest_step}"] if latest_step is not None else []
    if best is not None:
        saved.append(f"best step-{best['step']}")
    lines.append(f"checkpoints  {out / 'checkpoints'}" + (f" ({', '.join(saved)})" if saved else " (none saved)"))
    if stopped_by:
        lines.append(f"resume with  --resume_from_checkpoint latest --output_dir {out}")
    return "\n".join(lines)

"""Metrics go two ways: Accelerate's trackers (TensorBoard by default) and ``metrics.jsonl``.

``metrics.jsonl`` has one JSON object per logging step (``step``, ``loss``, ``lr/<optimizer>``,
``tokens_seen``, ... and ``val_loss`` when evaluated): a file that plotting, diffing and tests can
read without TensorBoard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """Read every record of a ``metrics.jsonl`` (or of ``<output_dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes metrics to the trackers and, on the main process, appends them to ``metrics.jsonl``."""

    def __init__(self, accelerator, output_dir: str | Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (a resumed run rewrites the steps the crash lost)."""
        if self._file is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self._file.close()
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")

    def log(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self._file is not None:
            record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                       for k, v in metrics.items()}}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

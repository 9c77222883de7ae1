"""The trainer's counters, owned in one object with ``state_dict()``/``load_state_dict()``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Everything that says where a run is; every field is JSON-serialisable.

    Attributes:
        global_step: optimizer steps finished.
        epoch: epoch the next batch comes from.
        samples_in_epoch: training blocks consumed in ``epoch`` by all processes together; with the
            seeded epoch order this is the exact global data position, independent of world size.
        tokens_seen: tokens trained on, summed over all processes.
        best_val_loss: lowest validation loss seen so far (None before the first evaluation).
        best_val_step: the step at which ``best_val_loss`` was measured (None before it).
        ema_loss: exponential moving average of the (all-process mean) training loss.
        last_metrics: the most recent logged metrics.
        trackers: what a resumed run needs to continue the same tracker runs: ``run_name`` (the
            TensorBoard folder), ``wandb_run_id``.
    """

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_val_step: int | None = None
    ema_loss: float | None = None
    last_metrics: dict = field(default_factory=dict)
    trackers: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore counters; unknown keys are an error so that a newer format is never half-read."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise ValueError(f"train state has unknown keys {unknown}; it was written by a newer accel_trainer")
        for key, value in state.items():
            setattr(self, key, value)

    def improves_best(self, val_loss: float) -> bool:
        return self.best_val_loss is None or val_loss < self.best_val_loss

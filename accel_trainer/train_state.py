"""The trainer's counters, owned in one object with ``state_dict()``/``load_state_dict()``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Where the trainer is; every field is JSON-serialisable. The data position is the loader's and
    the best checkpoint the Checkpointer's; each is saved by its owner.

    Attributes:
        global_step: optimizer steps finished.
        tokens_seen: tokens trained on, summed over all processes.
        nonfinite_steps: steps skipped because the loss or the gradient was not finite.
        ema_loss: exponential moving average of the (all-process mean) training loss; a device
            tensor while training (no host sync per step), a float in ``state_dict()``.
        schedule_steps: the steps the LR schedule spanned when saved (a resume that changes it says so).
        trackers: what a resumed run needs to continue the same tracker runs: ``run_name`` (the
            TensorBoard folder), ``wandb_run_id``.
    """

    global_step: int = 0
    tokens_seen: int = 0
    nonfinite_steps: int = 0
    ema_loss: float | torch.Tensor | None = None
    schedule_steps: int | None = None
    trackers: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if state["ema_loss"] is not None:
            state["ema_loss"] = float(state["ema_loss"])  # the only host sync it costs: at save time
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore counters; unknown keys are an error so that a newer format is never half-read."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise ValueError(f"train state has unknown keys {unknown}; it was written by another accel_trainer")
        for key, value in state.items():
            setattr(self, key, value)

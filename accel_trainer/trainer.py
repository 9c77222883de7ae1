"""The training loop on Hugging Face Accelerate.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; every counter lives in
:class:`TrainState`. The LR schedules are stepped here once per optimizer step rather than prepared by
Accelerate, whose scheduler wrapper steps ``num_processes`` times per step and would tie the schedule
to the world size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .checkpoint.emergency import StopRequest
from .checkpoint.manager import Checkpointer
from .config import ConfigError, TrainingArguments
from .data import TextData, build_eval_dataloader, build_train_dataloader, position_to_skip
from .metrics import MetricsLogger
from .optim import OptimizersContainer, SchedulersContainer, lr_multiplier
from .train_state import TrainState


def build_accelerator(args: TrainingArguments) -> Accelerator:
    """An Accelerator for these arguments, seeded; call before building the model so init matches on all ranks.

    Raises:
        ConfigError: ``--mixed_precision=fp16`` without a CUDA device.
    """
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision=fp16 needs a CUDA GPU (the grad scaler is GPU-only here); "
                          "use --mixed_precision bf16 or no on CPU")
    trackers = {"none": None, "all": "all"}.get(args.report_to, [args.report_to])
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=trackers,
                              project_dir=args.output_dir, step_scheduler_with_optimizer=False)
    set_seed(args.seed)
    return accelerator


def tracker_config(config: dict) -> dict:
    """TensorBoard's hparams accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class Trainer:
    """Trains ``model`` with the named ``optimizers`` on ``data``.

    Args:
        accelerator: from :func:`build_accelerator`.
        model: the (unprepared) model; its forward takes ``input_ids``/``labels`` and returns ``loss``.
        optimizers: an :class:`OptimizersContainer` over the model's parameters.
        data: train/validation datasets and tokenizer.
        args: training arguments.
        run_config: the full flat run configuration (saved with checkpoints, sent to trackers).
    """

    def __init__(self, accelerator: Accelerator, model, optimizers: OptimizersContainer, data: TextData,
                 args: TrainingArguments, run_config: dict):
        self.accelerator = accelerator
        self.args = args
        self.run_config = run_config
        self.state = TrainState()
        world = accelerator.num_processes
        train_loader = build_train_dataloader(data.train, args.per_device_train_batch_size, args.seed)
        self.sampler = train_loader.sampler
        # Evaluate a fixed subset so every evaluation sees the same blocks and iterates to the end.
        n_eval = min(len(data.validation), args.max_eval_batches * args.per_device_eval_batch_size * world)
        eval_loader = build_eval_dataloader(data.validation.select(range(n_eval)), args.per_device_eval_batch_size)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizers, train_loader, eval_loader)
        self.optimizers = optimizers

        self.steps_per_epoch = len(self.train_loader) // args.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--per_device_train_batch_size={args.per_device_train_batch_size} x "
                f"--gradient_accumulation_steps={args.gradient_accumulation_steps} x {world} processes needs more "
                f"than the {len(data.train)} training blocks available; lower them or give more data")
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        self.total_steps = self.plan_total_steps()
        # The schedule reads total_steps when called, so a resume that re-plans it is followed.
        schedule = partial(lr_multiplier, kind=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
                           min_lr_ratio=args.min_lr_ratio, decay_ratio=args.decay_ratio)
        self.schedulers = SchedulersContainer(optimizers, lambda step: schedule(step, total_steps=self.total_steps))
        self.metrics = MetricsLogger(accelerator, args.output_dir)
        self.checkpointer = Checkpointer(self, args.output_dir, save_total_limit=args.save_total_limit,
                                         keep_every_n_steps=args.keep_every_n_steps, async_save=args.async_save,
                                         save_strict=args.save_strict)
        self.stop = StopRequest(world)
        self.interrupted_by: str | None = None
        self._ema = None            # device tensor; TrainState.ema_loss is its host copy
        self._unsynced_tokens = 0   # local tokens since the last all-process sum
        self._step_tokens = 0       # local tokens of the step in flight, counted once it completes
        self._consistent = True     # False while an optimizer step is half-applied
        self._epoch_finished = False

    def start_trackers(self) -> None:
        """Start Accelerate's trackers; a resumed run continues the runs its checkpoint names.

        TensorBoard reopens the same folder with ``purge_step`` so the steps after the checkpoint that
        the interrupted run had logged are replaced, not duplicated; W&B resumes the same run id.
        """
        saved = self.state.trackers
        run_name = saved.get("run_name") or self.args.run_name or "accel_trainer"
        if saved.get("run_name") and self.args.run_name and self.args.run_name != saved["run_name"]:
            self.accelerator.print(f"--run_name={self.args.run_name!r}: continuing the checkpoint's tracker run "
                                   f"{saved['run_name']!r} instead")
        init_kwargs = {}
        if self.state.global_step > 0:
            init_kwargs["tensorboard"] = {"purge_step": self.state.global_step + 1}
        if saved.get("wandb_run_id"):
            init_kwargs["wandb"] = {"id": saved["wandb_run_id"], "resume": "allow"}
        self.accelerator.init_trackers(run_name, config=tracker_config(self.run_config), init_kwargs=init_kwargs)
        saved["run_name"] = run_name
        if self.accelerator.is_main_process and any(t.name == "wandb" for t in self.accelerator.trackers):
            saved["wandb_run_id"] = self.accelerator.get_tracker("wandb", unwrap=True).id

    def plan_total_steps(self) -> int:
        """The step to stop at: ``--max_steps``, or the end of epoch ``--num_train_epochs`` counted from
        the data position, so a resume with another batch size still trains exactly the epochs asked."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        state = self.state
        target = math.ceil(self.args.num_train_epochs * self.steps_per_epoch)
        done = state.epoch * self.steps_per_epoch + state.samples_in_epoch // self.samples_per_step
        return state.global_step + max(0, target - done)

    # ----------------------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        """Run until ``total_steps`` or a stop signal; returns the final counters."""
        args, state = self.args, self.state
        self.total_steps = self.plan_total_steps()
        self.start_trackers()
        self.print_run_summary()
        progress = tqdm(total=self.total_steps, initial=state.global_step, desc="training", dynamic_ncols=True,
                        disable=args.disable_tqdm or not self.accelerator.is_local_main_process)
        self.model.train()
        batches = self.micro_batches()
        self.stop.install()
        try:
            while state.global_step < self.total_steps:
                loss, grad_norm = self.train_step(next(batches))
                self.after_step(loss, grad_norm, progress)
                if self.stop.agreed():
                    self.emergency_save(self.stop.name)
                    break
        except Exception as err:
            self.save_after_exception(err)
            raise
        finally:
            self.stop.uninstall()
            progress.close()
            self.metrics.close()
            self.accelerator.end_training()
        self.checkpointer.close()  # training ends only once the last checkpoint is on disk
        return state

    def emergency_save(self, why: str) -> None:
        """Checkpoint the current (consistent) step unless it is already saved, and say how to resume."""
        self.interrupted_by = why
        if self.checkpointer.last_saved_step != self.state.global_step:
            self.checkpointer.save(["emergency"], wait=True)
        self.checkpointer.wait()
        where = ("state saved under" if self.checkpointer.last_saved_step == self.state.global_step
                 else "the emergency checkpoint could not be written (see above); the last good one is under")
        self.accelerator.print(f"training stopped by {why} at step {self.state.global_step}; {where} "
                               f"{self.checkpointer.root}. Resume with: --resume_from_checkpoint latest")

    def save_after_exception(self, err: Exception) -> None:
        """--save_on_exception: save if the state is consistent and a save cannot deadlock."""
        reason = None
        if not self.args.save_on_exception:
            reason = "--save_on_exception is off"
        elif self.accelerator.num_processes > 1:
            # Other ranks may be blocked in a collective; a save would hang. Resume from the last save.
            reason = "the run has several processes (other ranks may be blocked in a collective)"
        elif not self._consistent:
            reason = "the error came in the middle of an optimizer step"
        if reason:
            self.accelerator.print(f"error at step {self.state.global_step}: no emergency checkpoint because {reason}; "
                                   f"the last checkpoint under {self.checkpointer.root} stays the latest")
            return
        try:
            self.emergency_save(f"{type(err).__name__}: {err}")
        except Exception as save_err:  # never hide the original error behind the save's
            self.accelerator.print(f"emergency checkpoint failed too ({type(save_err).__name__}: {save_err})")

    def micro_batches(self):
        """Yield lists of ``gradient_accumulation_steps`` micro-batches, continuing from ``self.state``."""
        state, args = self.state, self.args
        while True:
            skip, remainder = position_to_skip(state.samples_in_epoch, args.per_device_train_batch_size,
                                               self.accelerator.num_processes)
            if remainder:
                # The batch size or world size changed on resume: a partial batch cannot be skipped.
                self.accelerator.print(
                    f"data position: {state.samples_in_epoch} samples into epoch {state.epoch} is not a multiple of "
                    f"the new global micro-batch; the last {remainder} sample(s) are seen again")
                state.samples_in_epoch -= remainder
            loader = self.train_loader if skip == 0 else self.accelerator.skip_first_batches(self.train_loader, skip)
            loader.set_epoch(state.epoch)
            self.sampler.set_epoch(state.epoch)
            iterator = iter(loader)
            remaining = (len(self.train_loader) - skip) // args.gradient_accumulation_steps
            for i in range(remaining):
                self._epoch_finished = i == remaining - 1
                yield [next(iterator) for _ in range(args.gradient_accumulation_steps)]
            state.epoch += 1
            state.samples_in_epoch = 0

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward/backward over the micro-batches, clip, step every optimizer and schedule once."""
        accelerator, model = self.accelerator, self.model
        total, tokens = None, 0
        for i, batch in enumerate(micro_batches):
            ids = batch["input_ids"]
            # Only the last micro-batch all-reduces gradients under DDP.
            sync = accelerator.no_sync(model) if i < len(micro_batches) - 1 else nullcontext()
            with sync:
                loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
                accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
            tokens += ids.numel()
        grad_norm = None
        if self.args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self._consistent = False
        self._step_tokens = tokens
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
            self.schedulers.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def after_step(self, loss: torch.Tensor, grad_norm, progress) -> None:
        """Advance counters; log, evaluate and save when their interval comes."""
        args, state = self.args, self.state
        state.global_step += 1
        state.samples_in_epoch += self.samples_per_step
        self._unsynced_tokens += self._step_tokens
        self._consistent = True
        # One scalar all-reduce per step (asynchronous on GPU) so the EMA is the same on every rank.
        mean_loss = self.accelerator.reduce(loss, reduction="mean")
        self._ema = mean_loss if self._ema is None else self._ema * args.ema_decay + mean_loss * (1 - args.ema_decay)
        step, last = state.global_step, state.global_step >= self.total_steps
        progress.update(1)
        metrics, reasons = {}, []
        if step % args.logging_steps == 0 or last:
            metrics.update(self.train_metrics(mean_loss, grad_norm))
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr/adamw', 0):.2e}")
        if args.eval_steps and (step % args.eval_steps == 0 or last):
            metrics["val_loss"] = self.evaluate()
            if state.improves_best(metrics["val_loss"]):
                state.best_val_loss, state.best_val_step = metrics["val_loss"], step
                reasons.append("best")
        if metrics:
            if "tokens_seen" not in metrics:  # not setdefault: its argument would all-reduce every time
                metrics["tokens_seen"] = self.sync_tokens()
            state.last_metrics = {"step": step, **metrics}
            self.metrics.log(metrics, step=step)
        if args.save_steps and step % args.save_steps == 0:
            reasons.append("periodic")
        if args.save_on_each_epoch and self._epoch_finished:
            reasons.append("epoch")
        if last:
            reasons.append("final")
        if reasons:
            self.checkpointer.save(reasons)

    def sync_state(self) -> TrainState:
        """Bring ``self.state`` up to date for a checkpoint: tokens summed over ranks (a collective
        call) and the EMA copied from its device tensor."""
        self.sync_tokens()
        self.state.ema_loss = None if self._ema is None else float(self._ema.item())
        return self.state

    def restore_ema(self) -> None:
        ema = self.state.ema_loss
        self._ema = None if ema is None else torch.tensor(ema, dtype=torch.float32, device=self.accelerator.device)

    # ------------------------------------------------------------------------------------ helpers
    def train_metrics(self, mean_loss: torch.Tensor, grad_norm) -> dict:
        metrics = {"loss": mean_loss.item(), "ema_loss": self._ema.item(), "epoch": self.epoch_progress(),
                   "tokens_seen": self.sync_tokens()}
        self.state.ema_loss = metrics["ema_loss"]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for name, lr in self.schedulers.get_last_lr().items():
            metrics[f"lr/{name}"] = lr
        return metrics

    def sync_tokens(self) -> int:
        """Add every process's tokens since the last call to ``state.tokens_seen`` (a collective call)."""
        local = torch.tensor(self._unsynced_tokens, device=self.accelerator.device, dtype=torch.long)
        self.state.tokens_seen += int(self.accelerator.reduce(local, reduction="sum").item())
        self._unsynced_tokens = 0
        return self.state.tokens_seen

    def epoch_progress(self) -> float:
        return self.state.epoch + self.state.samples_in_epoch / (self.steps_per_epoch * self.samples_per_step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss (without the router's aux loss) over the fixed validation subset, all processes."""
        self.model.eval()
        losses = [self.model(input_ids=b["input_ids"], labels=b["input_ids"]).lm_loss for b in self.eval_loader]
        self.model.train()
        local = torch.stack(losses).mean() if losses else torch.zeros((), device=self.accelerator.device)
        return self.accelerator.reduce(local, reduction="mean").item()

    def print_run_summary(self) -> None:
        a = self.args
        self.accelerator.print(
            f"accel_trainer: {self.accelerator.num_processes} process(es) [{self.accelerator.distributed_type}], "
            f"mixed_precision={a.mixed_precision}, {self.total_steps} steps ({self.steps_per_epoch} per epoch), "
            f"{self.samples_per_step} sequences/step, starting at step {self.state.global_step}, "
            f"output_dir={a.output_dir}")

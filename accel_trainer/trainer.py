"""The training loop on Hugging Face Accelerate.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; the trainer's counters live in
:class:`TrainState`, the data position in the loader, and both are saved by name through the
:class:`~accel_trainer.checkpoint.Checkpointer`, whose public API this trainer uses like any loop.
The LR of step ``s`` is ``initial_lr * lr_multiplier(s)``: a pure function of the step, so there is
no scheduler state, and Accelerate's scheduler wrapper (which steps ``num_processes`` times per
step) is not involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Subset
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .checkpoint import Checkpointer
from .config import TrainingArguments
from .errors import ConfigError
from .console import final_report, interactive, progress_line, progress_postfix
from .data import TextData, build_eval_dataloader, build_train_dataloader, token_byte_lengths
from .metrics import MetricsLogger
from .models import logits_of, loss_of
from .optim import OptimizersContainer, lr_multiplier
from .parallel import DataParallel, ParallelPlan
from .telemetry import RouterStats, Throughput, peak_memory, peak_tflops
from .train_state import TrainState

# Optimizer hyperparameters that follow the current flags on resume (the checkpoint supplies state).
FLAG_HYPERPARAMETERS = ("initial_lr", "weight_decay", "momentum", "nesterov", "ns_steps", "betas", "eps")


def build_accelerator(args: TrainingArguments) -> Accelerator:
    """An Accelerator for these arguments, seeded; call before building the model so init matches on all ranks.

    ``args.mixed_precision`` None takes the launcher's setting (``accelerate launch`` exports the
    config file's ``mixed_precision``); ``accelerator.mixed_precision`` says what the run uses.

    Raises:
        ConfigError: ``--mixed_precision=fp16`` without a CUDA device.
    """
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision=fp16 needs a CUDA GPU (the grad scaler is GPU-only here); "
                          "use --mixed_precision bf16 or no on CPU")
    trackers = {"none": None, "all": "all"}.get(args.report_to, [args.report_to])
    if args.full_determinism:  # before the first CUDA kernel: cuBLAS reads its workspace setting once
        from transformers.trainer_utils import enable_full_determinism

        enable_full_determinism(args.seed)
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
        before_resume: the Checkpointer's policy for a checkpoint about to be resumed (see
            :func:`accel_trainer.run.resume_policy`).
        flops_per_token: training FLOPs per token (:func:`telemetry.flops_per_token`), for MFU.
        model_config: the model's ``config.json`` when the model has no transformers config (your own module).
        experts_per_token: a transformers MoE's top-k, to count the router's choices per expert.
        parallel: the run's :class:`~accel_trainer.parallel.ParallelPlan` (already applied to the
            model); the trainer calls its hooks. None: plain data parallelism.
        store_frozen: False: checkpoints leave the frozen parameters out (LoRA's base, named by the
            run config instead); see :class:`~accel_trainer.checkpoint.CheckpointConfig`.
    """

    def __init__(self, accelerator: Accelerator, model, optimizers: OptimizersContainer, data: TextData,
                 args: TrainingArguments, run_config: dict, before_resume=None, flops_per_token: float | None = None,
                 model_config: dict | None = None, experts_per_token: int = 0, parallel: ParallelPlan | None = None,
                 store_frozen: bool = True):
        self.accelerator = accelerator
        self.parallel = parallel or DataParallel()
        self.args = args
        self.run_config = run_config
        self.state = TrainState()
        world = accelerator.num_processes
        train_loader = build_train_dataloader(data.train, args.per_device_train_batch_size, args.dataloader_num_workers)
        # Evaluate a fixed subset so every evaluation sees the same blocks and iterates to the end.
        n_eval = min(len(data.validation), args.max_eval_batches * args.per_device_eval_batch_size * world)
        eval_loader = build_eval_dataloader(Subset(data.validation, range(n_eval)), args.per_device_eval_batch_size)
        self.parallel.before_prepare(accelerator, model)
        self.model, self.optimizer, train_loader, self.eval_loader = accelerator.prepare(
            model, optimizers, train_loader, eval_loader)
        self.optimizers = optimizers
        # Bytes of text per token id, for bits per byte (a loss that compares across tokenizers).
        self.token_bytes = torch.as_tensor(token_byte_lengths(data.tokenizer), device=accelerator.device)
        self.tokenizer = data.tokenizer

        self.steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--per_device_train_batch_size={args.per_device_train_batch_size} x "
                f"--gradient_accumulation_steps={args.gradient_accumulation_steps} x {world} processes needs more "
                f"than the {len(data.train)} training blocks available; lower them or give more data")
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        self.checkpointer = Checkpointer(
            accelerator, args.output_dir, model=self.model, optimizer=optimizers.optimizers, dataloader=train_loader,
            extra={"trainer_state": self.state}, config=run_config, tokenizer=data.tokenizer,
            settings=dataclasses.replace(args.checkpoint_config(), store_frozen=store_frozen),
            before_resume=before_resume, model_config=model_config)
        self.train_loader = self.checkpointer.dataloader
        if args.eval_tasks and self.checkpointer.sharded:
            raise ConfigError("--eval_tasks: the harness needs the whole model in one process and this run's model is "
                              "sharded (FSDP2 or --expert_parallel_size); run `accel-trainer eval <checkpoint> --tasks "
                              "...` on the saved "
                              "checkpoints instead (in another process, or after the run)")
        self.total_steps = self.plan_total_steps()
        self.metrics = MetricsLogger(accelerator, args.output_dir)
        self.throughput = Throughput(world, flops_per_token, peak_tflops(accelerator.device, args.peak_tflops))
        self.router = RouterStats(experts_per_token)
        self.interrupted_by: str | None = None
        self.diverged = False
        self.last_eval: tuple[int, float] | None = None
        self.nonfinite_streak = 0
        # --log_data_blocks: every rank appends the blocks each step reads (an audit of the data order).
        self._block_log = (open(Path(args.output_dir) / f"data_blocks.rank{accelerator.process_index}.jsonl", "a",
                                buffering=1) if args.log_data_blocks else None)
        self._unsynced_tokens = 0   # local tokens since the last all-process sum
        self._step_tokens = 0       # local tokens of the step in flight, counted once it completes
        self._consistent = True     # False while an optimizer step is half-applied
        self._epoch_finished = False

    def resume(self, spec: str, reset_optimizer: bool = False, reset_data_position: bool = False,
               **resolved) -> None:
        """Restore the run from ``spec`` (``latest``, ``best``, ``step-N`` or a path); current flags win
        over the checkpoint's optimizer hyperparameters (a lower LR to fine-tune, say).

        Args:
            reset_optimizer: keep this run's fresh optimizer state.
            reset_data_position: start the data from its beginning (other data than the checkpoint's).
            resolved: ``folder=`` what ``spec`` already resolved to (see :meth:`Checkpointer.resume`).
        """
        flags = [{k: g[k] for k in FLAG_HYPERPARAMETERS if k in g} for g in self.optimizers.param_groups]
        exclude = []
        if reset_optimizer:
            exclude.append("optimizer")
            self.accelerator.print("--reset_optimizer: loading weights, counters and RNG; optimizer state starts fresh")
        if reset_data_position:
            exclude.append("dataloader")
            self.accelerator.print("--reset_data_position: the data starts from its beginning (epoch 0)")
        step = self.checkpointer.resume(spec, exclude=tuple(exclude), **resolved)
        for group, values in zip(self.optimizers.param_groups, flags):
            group.update(values)
        if step == 0:
            return
        self.total_steps = self.plan_total_steps()
        if self.state.ema_loss is not None:  # the float32 device tensor it was, so the EMA goes on bitwise
            self.state.ema_loss = torch.tensor(self.state.ema_loss, dtype=torch.float32, device=self.accelerator.device)
        self.metrics.truncate_after(step)
        self.report_schedule_change(step)
        best = self.checkpointer.best
        best = "none yet" if best is None else f"{best['value']:.4f} (step {best['step']})"
        if self.total_steps <= step:
            self.accelerator.print(f"the checkpoint is at step {step}, at or past the end of this run "
                                   f"({self.total_steps} "
                                   "steps: --max_steps or --num_train_epochs): nothing left to train; raise it to "
                                   "train more")
            return
        self.accelerator.print(f"continuing at step {step + 1}: epoch {self.train_loader.epoch}, "
                               f"{self.state.tokens_seen:,} tokens seen, best val loss {best}")

    @property
    def schedule_steps(self) -> int:
        """Steps the LR schedule spans: --lr_schedule_steps, else the run's total."""
        return self.args.lr_schedule_steps or self.total_steps

    def lr_factor(self, step: int, schedule_steps: int | None = None) -> float:
        """The multiplier of every group's peak LR at ``step`` (a pure function of the step)."""
        steps, a = schedule_steps or self.schedule_steps, self.args
        return lr_multiplier(step, kind=a.lr_scheduler_type, warmup_steps=a.warmup_for(steps), total_steps=steps,
                             min_lr_ratio=a.min_lr_ratio, decay_ratio=a.decay_ratio)

    def report_schedule_change(self, step: int) -> None:
        """Say so when a resume stretches (or shrinks) the LR schedule: the LR then jumps."""
        saved, now = self.state.schedule_steps, self.schedule_steps
        self.state.schedule_steps = now
        if saved is None or saved == now or math.isclose(self.lr_factor(step, saved), self.lr_factor(step, now)):
            return
        self.accelerator.print(
            f"the LR schedule now spans {now} steps instead of the checkpoint's {saved} (--max_steps or "
            f"--num_train_epochs changed), so the {self.args.lr_scheduler_type} schedule is re-stretched: at step "
            f"{step + 1} the LR is {self.lr_factor(step, now):.3g} of its peak instead of "
            f"{self.lr_factor(step, saved):.3g}. To keep the saved schedule pass --lr_schedule_steps {saved} (the "
            "extra steps train at its final LR); to extend runs freely use --lr_scheduler_type wsd, whose LR stays "
            "at the peak until the last --decay_ratio of the steps")

    def start_trackers(self) -> None:
        """Start Accelerate's trackers; a resumed run continues the runs its checkpoint names.

        TensorBoard reopens the same folder with ``purge_step`` so the steps after the checkpoint that
        the interrupted run had logged are replaced, not duplicated; W&B resumes the same run id.
        """
        saved = self.state.trackers
        run_name = saved.get("run_name") or self.args.tracker_run_name
        if saved.get("run_name") and self.args.run_name and self.args.run_name != saved["run_name"]:
            self.accelerator.print(f"--run_name={self.args.run_name!r}: continuing the checkpoint's tracker run "
                                   f"{saved['run_name']!r} instead")
        init_kwargs = {}
        if self.state.global_step > 0:
            init_kwargs["tensorboard"] = {"purge_step": self.state.global_step + 1}
        if saved.get("wandb_run_id"):
            init_kwargs["wandb"] = {"id": saved["wandb_run_id"], "resume": "allow"}
        shown = {k: v for k, v in self.run_config.items() if k != "optimizer_assignment"}  # run_config.json has it
        self.accelerator.init_trackers(run_name, config=tracker_config(shown), init_kwargs=init_kwargs)
        saved["run_name"] = run_name
        if self.accelerator.is_main_process and any(t.name == "wandb" for t in self.accelerator.trackers):
            saved["wandb_run_id"] = self.accelerator.get_tracker("wandb", unwrap=True).id

    def plan_total_steps(self) -> int:
        """The step to stop at: ``--max_steps``, or the end of epoch ``--num_train_epochs`` counted from
        the data position, so a resume with another batch size still trains exactly the epochs asked."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        loader = self.checkpointer.dataloader
        target = math.ceil(self.args.num_train_epochs * self.steps_per_epoch)
        done = loader.epoch * self.steps_per_epoch + loader.samples_in_epoch // self.samples_per_step
        return self.state.global_step + max(0, target - done)

    # ----------------------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        """Run until ``total_steps`` or a stop signal; returns the final counters."""
        args, state = self.args, self.state
        self.start_trackers()
        self.print_run_summary()
        state.schedule_steps = self.schedule_steps
        progress = tqdm(total=self.total_steps, initial=state.global_step, desc="training", dynamic_ncols=True,
                        disable=args.disable_tqdm or not self.accelerator.is_local_main_process or not interactive())
        self.model.train()
        batches = self.micro_batches()
        began, tokens_before = time.perf_counter(), state.tokens_seen
        try:
            self.throughput.start(state.global_step, state.tokens_seen)
            while state.global_step < self.total_steps:
                self.after_step(*self.train_step(next(batches)), progress)
                if self.checkpointer.stop_requested():
                    self.emergency_save(self.checkpointer.stop_signal.name)
                    break
                if args.max_nonfinite_steps and self.nonfinite_streak >= args.max_nonfinite_steps:
                    self.diverged = True
                    self.emergency_save(f"{self.nonfinite_streak} steps in a row with a non-finite loss or gradient "
                                        "(the weights are those of the last good step; lower the learning rate or "
                                        "resume from an earlier checkpoint)")
                    break
            # Before end_training: a sharded save still in flight needs the process groups it destroys.
            self.checkpointer.close()  # training ends only once the last checkpoint is on disk
        except Exception as err:
            self.save_after_exception(err)
            try:
                self.checkpointer.close()
            except Exception as close_err:  # never hide the original error behind this one
                self.accelerator.print(f"closing the checkpointer failed too ({type(close_err).__name__}: {close_err})")
            raise
        finally:
            progress.close()
            self.metrics.close()
            self.accelerator.end_training()
        self.accelerator.print(self.final_report(time.perf_counter() - began, state.tokens_seen - tokens_before))
        return state

    def final_report(self, seconds: float, tokens_this_run: int) -> str:
        tensorboard = next((t.logging_dir for t in self.accelerator.trackers if t.name == "tensorboard"), None)
        ema = self.state.ema_loss
        return final_report(
            step=self.state.global_step, total_steps=self.total_steps, stopped_by=self.interrupted_by,
            seconds=seconds, tokens_seen=self.state.tokens_seen, tokens_this_run=tokens_this_run,
            ema_loss=None if ema is None else float(ema), last_eval=self.last_eval, best=self.checkpointer.best,
            latest_step=self.checkpointer.last_saved_step, output_dir=self.args.output_dir,
            metrics_file=self.metrics.path, tensorboard_dir=tensorboard)

    def save(self, reasons: list[str], metrics: dict | None = None, wait: bool = False) -> Path | None:
        """Checkpoint the current step (a collective call); ``metrics`` decide ``best``."""
        self.sync_tokens()
        metrics = {**(metrics or {}), "tokens_seen": self.state.tokens_seen}
        return self.checkpointer.save(self.state.global_step, metrics=metrics, reason=reasons, wait=wait)

    def emergency_save(self, why: str) -> None:
        """Checkpoint the current (consistent) step unless it is already saved, and say how to resume."""
        self.interrupted_by = why
        if self.checkpointer.last_saved_step != self.state.global_step:
            self.save(["emergency"], wait=True)
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
        """Yield lists of ``gradient_accumulation_steps`` micro-batches from the resumable loader; an
        epoch ends after its last whole step (the few batches left over are not used)."""
        accum, loader = self.args.gradient_accumulation_steps, self.train_loader
        while True:
            steps = loader.batches_left() // accum
            iterator = iter(loader)
            for i in range(steps):
                self._epoch_finished = i == steps - 1
                yield [next(iterator) for _ in range(accum)]
            iterator.close()
            loader.end_epoch()

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Forward/backward over the micro-batches, clip, set the step's LR and step every optimizer.

        Returns the all-process mean loss, the gradient norm, and whether the step was applied: a
        non-finite loss or gradient skips it (the one host sync per step, before the update).
        """
        accelerator, model = self.accelerator, self.model
        total, tokens = None, 0
        targets = self.targets_per_rank(micro_batches)
        for i, batch in enumerate(micro_batches):
            ids = batch["input_ids"]
            # Only the last micro-batch all-reduces gradients under DDP.
            sync = accelerator.no_sync(model) if i < len(micro_batches) - 1 else nullcontext()
            with sync:
                if targets is None:
                    out = model(input_ids=ids, labels=ids)
                    loss = loss_of(out) / len(micro_batches)
                else:  # the step's mean over every target token of every micro-batch on every rank
                    # No cache: transformers keeps packed sequences apart only without one.
                    out = model(input_ids=ids, labels=batch["labels"], position_ids=batch["position_ids"],
                                num_items_in_batch=targets, use_cache=False)
                    loss = loss_of(out)
                accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
            tokens += ids.numel()
            self.router.add(out)
            if self._block_log is not None:
                self._block_log.write(json.dumps({"step": self.state.global_step + 1,
                                                  "blocks": batch["block"].tolist()}) + "\n")
        self.parallel.reduce_gradients()  # what the engine does not reduce (e.g. the experts' data-parallel mean)
        grad_norm = None
        if self.args.max_grad_norm > 0:
            grad_norm = self.parallel.clip_grad_norm_(accelerator, model.parameters(), self.args.max_grad_norm)
        # One scalar all-reduce per step (asynchronous on GPU) so the EMA is the same on every rank.
        mean_loss = accelerator.reduce(total, reduction="mean")
        applied = True
        if accelerator.scaler is None:  # under fp16 the grad scaler skips (and rescales) overflowing steps itself
            finite = torch.isfinite(mean_loss)
            if grad_norm is not None:
                finite = finite & torch.isfinite(grad_norm)
            applied = bool(finite)
        self._consistent = False
        self._step_tokens = tokens if applied else 0
        if applied:
            self.optimizers.set_lr(self.lr_factor(self.state.global_step))
            self.optimizer.step()  # with fp16, the scaler may skip it (overflow); the LR follows the step count
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm, applied

    def targets_per_rank(self, micro_batches: list[dict]) -> torch.Tensor | None:
        """For batches with ``labels`` (chat data: targets on some tokens only): the step's target
        tokens over all micro-batches and ranks, divided by the ranks. Each micro-batch's loss is its
        sum over its targets divided by this, so the gradients (averaged over ranks by DDP) and the
        loss are the mean over every target of the step, however the targets fall into micro-batches
        or rows, packed or not (the HF Trainer's ``num_items_in_batch``). None for plain text."""
        if "labels" not in micro_batches[0]:
            return None
        local = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
        total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum")
        return total.clamp(min=1) / self.accelerator.num_processes

    def after_step(self, mean_loss: torch.Tensor, grad_norm, applied: bool, progress) -> None:
        """Advance counters; log, evaluate and save when their interval comes."""
        args, state = self.args, self.state
        state.global_step += 1
        self._unsynced_tokens += self._step_tokens
        self._consistent = True
        if applied:
            self.nonfinite_streak = 0
            ema = state.ema_loss
            state.ema_loss = mean_loss if ema is None else ema * args.ema_decay + mean_loss * (1 - args.ema_decay)
        else:
            state.nonfinite_steps += 1
            self.nonfinite_streak += 1
            self.accelerator.print(f"step {state.global_step}: the loss or the gradient is not finite; the step is "
                                   f"skipped (no update; {self.nonfinite_streak} in a row, {state.nonfinite_steps} "
                                   "in this run)")
        step, last = state.global_step, state.global_step >= self.total_steps
        progress.update(1)
        metrics, reasons = {}, []
        logging = step % args.logging_steps == 0 or last
        if logging:
            metrics.update(self.train_metrics(mean_loss, grad_norm))
        epoch_end = args.save_on_each_epoch and self._epoch_finished  # its checkpoint carries the val loss
        if (args.eval_steps and (step % args.eval_steps == 0 or last)) or epoch_end:
            metrics.update(self.evaluate())
            self.last_eval = (step, metrics["val_loss"])
        if args.eval_tasks and ((args.eval_tasks_steps and step % args.eval_tasks_steps == 0) or last):
            metrics.update(self.evaluate_tasks(step))
        if logging:
            self.show_progress(progress, metrics)
        if metrics:
            if "tokens_seen" not in metrics:  # not setdefault: its argument would all-reduce every time
                metrics["tokens_seen"] = self.sync_tokens()
            self.metrics.log(metrics, step=step)
        if args.save_steps and step % args.save_steps == 0:
            reasons.append("periodic")
        if epoch_end:
            reasons.append("epoch")
        if last:
            reasons.append("final")
        if reasons or self.checkpointer.improves_best(metrics):
            self.save(reasons, metrics)

    # ------------------------------------------------------------------------------------ helpers
    def show_progress(self, progress, metrics: dict) -> None:
        """The bar's postfix on a terminal; a plain line per logging step in a log file."""
        if not progress.disable:
            progress.set_postfix(progress_postfix(metrics))
        elif not self.args.disable_tqdm:
            self.accelerator.print(progress_line(self.state.global_step, self.total_steps, metrics))

    def train_metrics(self, mean_loss: torch.Tensor, grad_norm) -> dict:
        """The logging step's metrics: loss, LRs, progress, and the telemetry of the interval since the
        last logging step (throughput, MFU, peak memory, router balance)."""
        ema = self.state.ema_loss
        metrics = {"loss": mean_loss.item(), "ema_loss": None if ema is None else float(ema),
                   "epoch": self.epoch_progress(), "tokens_seen": self.sync_tokens()}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for name, lr in self.optimizers.lrs().items():
            metrics[f"lr/{name}"] = lr
        metrics.update(self.throughput.metrics(self.state.global_step, self.state.tokens_seen))
        metrics.update(peak_memory(self.accelerator.device))
        metrics.update(self.router.metrics(self.accelerator))
        metrics["nonfinite_steps"] = self.state.nonfinite_steps
        return metrics

    def sync_tokens(self) -> int:
        """Add every process's tokens since the last call to ``state.tokens_seen`` (a collective call)."""
        local = torch.tensor(self._unsynced_tokens, device=self.accelerator.device, dtype=torch.long)
        self.state.tokens_seen += int(self.accelerator.reduce(local, reduction="sum").item())
        self._unsynced_tokens = 0
        return self.state.tokens_seen

    def epoch_progress(self) -> float:
        loader = self.train_loader
        return loader.epoch + loader.samples_in_epoch / (self.steps_per_epoch * self.samples_per_step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Over the fixed validation subset, all processes: ``val_loss``, the mean next-token loss in
        nats (without the router's aux loss), and ``val_bpb``, bits per byte: the loss summed over the
        tokens that stand for text, divided by ln 2 and by that text's UTF-8 bytes."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)  # loss, tokens, text loss, bytes
        for batch in self.eval_loader:
            ids = batch["input_ids"]
            if "labels" in batch:  # chat data: the assistant's tokens only, each conversation on its own
                logits = logits_of(self.model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False))
                targets = batch["labels"][:, 1:].reshape(-1)
                keep = targets != -100
                logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1])[keep], targets[keep]
            else:
                logits = logits_of(self.model(input_ids=ids))
                logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            nbytes = self.token_bytes[targets]
            sums += torch.stack([loss.sum().double(), loss.new_tensor(loss.numel()).double(),
                                 (loss * (nbytes > 0)).sum().double(), nbytes.sum().double()])
        self.model.train()
        loss_sum, tokens, text_loss, text_bytes = self.accelerator.reduce(sums, reduction="sum").tolist()
        return {"val_loss": loss_sum / max(tokens, 1), "val_bpb": text_loss / (math.log(2) * max(text_bytes, 1))}

    def evaluate_tasks(self, step: int) -> dict[str, float]:
        """--eval_tasks on the main process (the others wait): ``eval/<task>/<metric>`` on every rank.

        The harness seeds the global generators itself: they are put back afterwards, so a run with
        in-loop tasks stays bitwise resumable. A failure is one line and training goes on, unless
        --eval_tasks_strict (then every rank stops with it)."""
        import random

        import numpy as np
        from accelerate.utils import broadcast_object_list

        from .evaluation import run_tasks, scalars, write_results

        acc, args = self.accelerator, self.args
        answer = [None, None]
        if acc.is_main_process:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                     torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
            model = acc.unwrap_model(self.model)
            try:
                results = run_tasks(model, self.tokenizer, args.eval_task_names, include_path=args.eval_include_path,
                                    limit=args.eval_tasks_limit, batch_size=args.per_device_eval_batch_size,
                                    device=str(acc.device))
                write_results(Path(args.output_dir), step, args.eval_task_names, results)
                answer[0] = scalars(results)
            except Exception as err:  # the harness's errors are its own kinds: all reported the same way
                first_line = str(err).splitlines()[0][:300] if str(err) else ""
                answer[1] = f"--eval_tasks at step {step} failed: {type(err).__name__}: {first_line}"
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
                if saved[3] is not None:
                    torch.cuda.set_rng_state_all(saved[3])
                self.model.train()
        if acc.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        values, problem = answer
        if problem:
            if args.eval_tasks_strict:
                raise ConfigError(problem + " (--eval_tasks_strict)")
            acc.print(f"WARNING: {problem}; training goes on")
            return {}
        return values

    def print_run_summary(self) -> None:
        a = self.args
        self.accelerator.print(
            f"accel_trainer: {self.accelerator.num_processes} process(es) [{self.accelerator.distributed_type}], "
            f"mixed_precision={self.accelerator.mixed_precision}, {self.total_steps} steps ({self.steps_per_epoch} per "
            f"epoch), "
            f"{self.samples_per_step} sequences/step, starting at step {self.state.global_step}, "
            f"output_dir={a.output_dir}")

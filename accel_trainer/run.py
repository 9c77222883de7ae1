"""Compose a run from parsed arguments: accelerator, data, model, optimizers, trainer."""

from __future__ import annotations

import gc
from pathlib import Path

from .checkpoint import CheckpointError
from .checkpoint.format import MODEL_CONFIG, RUN_CONFIG
from .checkpoint.io import read_json
from .checkpoint.weights import load_weights
from .config import ConfigError, DataArguments, ModelArguments, TrainingArguments, to_dict
from .data import build_datasets
from .models import MoEConfig, MoEForCausalLM, count_parameters
from .optim import OptimizerSettings, build_optimizers
from .trainer import Trainer, build_accelerator


def model_config_for(presets: dict[str, dict], preset: str, tokenizer) -> MoEConfig:
    """The preset's config, checked against the tokenizer's vocabulary.

    Raises:
        ConfigError: unknown ``--preset`` or a tokenizer with more ids than the model's vocabulary.
    """
    if preset not in presets:
        raise ConfigError(f"--preset={preset!r}: unknown; choose one of {', '.join(presets)}")
    config = MoEConfig(**presets[preset])
    vocab = len(tokenizer)
    if vocab > config.vocab_size:
        raise ConfigError(f"--preset={preset!r} has vocab_size={config.vocab_size} but --tokenizer_name has "
                          f"{vocab} ids; pick a preset with a larger vocabulary")
    return config


# Run-config keys that may differ on resume without comment (they say where/how, not what).
QUIET_KEYS = {"resume_from_checkpoint", "output_dir", "disable_tqdm", "report_to", "run_name", "async_save"}


def resume_policy(model, run_config: dict, print_fn=print):
    """What the trainer asks of a checkpoint before resuming it: the same architecture (the keys its
    config class lists in ``architecture_keys``), and a printed list of changed settings (the new
    values apply)."""

    def check(folder: Path) -> None:
        current = model.config.to_dict()
        saved = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else current
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
                 for k in getattr(model.config, "architecture_keys", ()) if saved.get(k) != current.get(k)]
        if diffs:
            raise CheckpointError(
                f"{folder}: the model architecture differs from this run ({'; '.join(diffs)}). "
                f"To start from its weights anyway, pass --init_from {folder} (weights only, non-strict) "
                "instead of --resume_from_checkpoint")
        saved_run = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
        changes = [f"{k}: {saved_run.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in QUIET_KEYS and saved_run.get(k) != v]
        if changes:
            print_fn("resuming with changed settings (the new values apply):\n  " + "\n  ".join(changes))

    return check


def run(presets: dict[str, dict], model_args: ModelArguments, data_args: DataArguments,
        train_args: TrainingArguments) -> Trainer:
    """Build everything and train; returns the trainer (for tests and notebooks)."""
    if model_args.preset not in presets:
        raise ConfigError(f"--preset={model_args.preset!r}: unknown; choose one of {', '.join(presets)}")
    accelerator = build_accelerator(train_args)
    with accelerator.main_process_first():
        data = build_datasets(data_args, seed=train_args.seed)
    config = model_config_for(presets, model_args.preset, data.tokenizer)
    model = MoEForCausalLM(config)
    counts = count_parameters(model, config)
    accelerator.print(f"model: preset {model_args.preset}, {counts['total'] / 1e6:.2f}M parameters "
                      f"({counts['active'] / 1e6:.2f}M active per token)")
    if train_args.init_from:
        report = load_weights(model, train_args.init_from, strict=False)
        accelerator.print(f"--init_from {train_args.init_from}: {report}")
    optimizers = build_optimizers(model, OptimizerSettings(
        muon_lr=train_args.muon_learning_rate, adamw_lr=train_args.learning_rate,
        weight_decay=train_args.weight_decay, adam_beta1=train_args.adam_beta1,
        adam_beta2=train_args.adam_beta2, adam_epsilon=train_args.adam_epsilon))
    run_config = to_dict(model_args, data_args, train_args)
    trainer = Trainer(accelerator, model, optimizers, data, train_args, run_config=run_config,
                      before_resume=resume_policy(model, run_config, accelerator.print))
    if train_args.resume_from_checkpoint:
        trainer.resume(train_args.resume_from_checkpoint, reset_optimizer=train_args.reset_optimizer)
    trainer.train()
    return trainer


def exit_code_of(job) -> int:
    """Run ``job``; turn bad input (flags, checkpoints) into one line on stderr and exit status 2,
    and a stop signal into 128 + signal number after its emergency checkpoint."""
    import sys

    from accelerate import PartialState

    try:
        trainer = job()
    except (ConfigError, CheckpointError) as err:
        if PartialState().is_main_process:
            print(f"error: {err}", file=sys.stderr)
        code = 2
    else:
        signum = trainer.checkpointer.stop_signal
        code = 128 + int(signum) if trainer.interrupted_by and signum else 0
        del trainer
    _free_process_groups(PartialState())
    return code


def _free_process_groups(state) -> None:
    """Let the process groups die now, while Python is fully alive, not during interpreter shutdown.

    ``destroy_process_group`` (Accelerate's ``end_training``) only unregisters a group: the DDP
    wrapper, the stop-flag group and the reference cycles around the trainer keep the C++ group and
    its gloo worker threads alive. Left to shutdown, a worker thread that frees the last collective's
    tensors needs the GIL after finalisation began, and the process aborts ("terminate called without
    an active exception", exit -6) after a run that finished: about 1 two-process launch in 15 here.
    Collecting the cycles drops the last reference; the group's destructor joins its (idle) threads.
    An unexpected exception skips this: its traceback holds the trainer, and the run fails anyway.
    """
    state.destroy_process_group()  # a no-op after end_training; needed when an error came before it
    gc.collect()

"""Compose a run from parsed arguments: accelerator, data, model, optimizers, trainer."""

from __future__ import annotations

import gc

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
    trainer = Trainer(accelerator, model, optimizers, data, train_args,
                      run_config=to_dict(model_args, data_args, train_args))
    if train_args.resume_from_checkpoint:
        trainer.checkpointer.resume(train_args.resume_from_checkpoint, reset_optimizer=train_args.reset_optimizer)
    trainer.train()
    return trainer


def exit_code_of(job) -> int:
    """Run ``job``; turn bad input (flags, checkpoints) into one line on stderr and exit status 2,
    and a stop signal into 128 + signal number after its emergency checkpoint."""
    import sys

    from accelerate import PartialState

    from .checkpoint.io import CheckpointError

    try:
        trainer = job()
    except (ConfigError, CheckpointError) as err:
        if PartialState().is_main_process:
            print(f"error: {err}", file=sys.stderr)
        code = 2
    else:
        code = 128 + trainer.stop.signum if trainer.interrupted_by and trainer.stop.signum else 0
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

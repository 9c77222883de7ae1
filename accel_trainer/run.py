"""Compose a run from parsed arguments: accelerator, data, model, optimizers, trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import (MODEL_CONFIG, RUN_CONFIG, CheckpointError, RemoteTier, load_weights, lock_run_dir, read_json,
                         resolve_on_main)
from .config import DataArguments, ModelArguments, TrainingArguments, to_dict
from .data import TOKENIZER_DIR, build_datasets, load_tokenizer, parse_mix, read_prepared, vocab_size_for
from .efficiency import compile_decoder_layers, enable_activation_checkpointing
from .errors import ConfigError, InputError, error_class
from .models import MoEConfig, MoEForCausalLM, count_parameters
from .models.modeling_moe import grouped_mm_works
from .optim import OptimizerSettings, build_optimizers
from .process import write_exit_status
from .telemetry import flops_per_token
from .trainer import Trainer, build_accelerator


def model_config_for(presets: dict[str, dict], preset: str, tokenizer, vocab_size: int | None = None) -> MoEConfig:
    """The preset's config with the vocabulary of this run's tokenizer (``--vocab_size`` if given).

    Raises:
        ConfigError: unknown ``--preset`` or a ``--vocab_size`` smaller than the tokenizer's ids.
    """
    if preset not in presets:
        raise ConfigError(f"--preset={preset!r}: unknown; choose one of {', '.join(presets)}")
    config = MoEConfig(**{**presets[preset], "vocab_size": vocab_size or vocab_size_for(tokenizer)})
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"--vocab_size={vocab_size}: the tokenizer has {len(tokenizer)} ids; give at least that "
                          "many (or leave --vocab_size out to follow the tokenizer)")
    return config


def run_tokenizer(args: DataArguments):
    """The tokenizer of this run, known before any data work: prepared data's own, or ``--tokenizer_name``."""
    folders = parse_mix(args.data_mix)[0] if args.data_mix else args.prepared_data
    if folders:
        return load_tokenizer(str(Path(folders[0]) / TOKENIZER_DIR)) if read_prepared(folders[0]) else None
    return load_tokenizer(args.tokenizer_name or "byte")


def block_size_for(config: MoEConfig, args: DataArguments, preset: str, defaults: dict | None) -> int:
    """``--block_size``, else the recipe's default for the preset, else the model's context.

    Raises:
        ConfigError: longer than the model's context.
    """
    block = args.block_size or (defaults or {}).get(preset, {}).get("block_size") or config.max_position_embeddings
    if block > config.max_position_embeddings:
        raise ConfigError(f"--block_size={block}: longer than the model's context (preset {preset!r}: "
                          f"max_position_embeddings={config.max_position_embeddings}); use --block_size "
                          f"{config.max_position_embeddings} or less")
    return block


# Run-config keys that may differ on resume without comment (they say where/how, not what).
QUIET_KEYS = {"resume_from_checkpoint", "output_dir", "disable_tqdm", "report_to", "run_name", "async_save",
              "reset_optimizer", "reset_data_position", "bf16", "fp16", "log_data_blocks"}
# What the saved data position means: with other values, sample k of an epoch is another text.
DATA_KEYS = ("dataset_name", "dataset_config_name", "data_files", "text_column", "tokenizer_name", "block_size",
             "validation_split_percentage", "max_corpus_bytes", "seed")


def refuse_incompatible(folder: Path, model_config, run_config: dict) -> None:
    """Refuse a checkpoint this run cannot continue: another architecture (the keys its config
    class lists in ``architecture_keys``), or other data under a saved data position.

    Raises:
        CheckpointError: naming the keys, their values, and what to do instead.
    """
    current = model_config.to_dict()
    saved = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else current
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
             for k in getattr(model_config, "architecture_keys", ()) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"{folder}: the model architecture differs from this run ({'; '.join(diffs)}). "
            f"To start from its weights anyway, pass --init_from {folder} (weights only, non-strict) "
            "instead of --resume_from_checkpoint")
    saved_run = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
    changed = [f"--{k}: {saved_run.get(k)!r} -> {run_config.get(k)!r}" for k in DATA_KEYS
               if k in saved_run and saved_run.get(k) != run_config.get(k)]
    if changed and not run_config.get("reset_data_position"):
        raise CheckpointError(
            f"{folder}: the data differs from the checkpoint's ({'; '.join(changed)}) and its data position counts "
            "samples of the old data, so resuming there would repeat or skip samples. Resume with the "
            "checkpoint's values, or pass --reset_data_position to keep weights, optimizer and counters and "
            "start this data from its beginning")


def resume_policy(model_config, run_config: dict, print_fn=print):
    """What a run checks of the checkpoint it resumes, once, before any data work:
    :func:`refuse_incompatible`, then a printed list of the settings that changed (the new values apply).
    Also usable as a Checkpointer's ``before_resume``."""

    def check(folder: Path) -> None:
        refuse_incompatible(folder, model_config, run_config)
        saved_run = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
        changes = [f"{k}: {saved_run.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in QUIET_KEYS and saved_run.get(k) != v]
        if changes:
            print_fn("resuming with changed settings (the new values apply):\n  " + "\n  ".join(changes))

    return check


def main_process_first(accelerator, work):
    """``work()`` on the main process, then on the others (which find its results, e.g. prepared data,
    on disk). Bad input found by the main process is raised on every process, so each exits with
    status 2 and the same one line, instead of the others failing in the barrier with a traceback."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except InputError as err:
            error = (type(err).__name__, str(err))
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise error_class(error[0])(error[1])
    return result if accelerator.is_main_process else work()


def apply_memory_and_speed_features(model: MoEForCausalLM, args: TrainingArguments, accelerator) -> None:
    """--gradient_checkpointing and --torch_compile (each decoder layer compiled on its own)."""
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if args.torch_compile:
        # The experts' kernel is chosen eagerly, before tracing (see MoEFeedForward.experts_kernel).
        grouped_mm_works(accelerator.device, torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
        n = compile_decoder_layers(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
        accelerator.print(f"--torch_compile: {n} decoder layers compiled one by one ({args.torch_compile_backend}); "
                          "the first steps include the compilation")


def run(presets: dict[str, dict], model_args: ModelArguments, data_args: DataArguments,
        train_args: TrainingArguments, defaults: dict | None = None) -> Trainer:
    """Build everything and train; returns the trainer (for tests and notebooks).

    Args:
        presets: model configs by name (the recipe's).
        defaults: per preset, training defaults the recipe sets (e.g. ``{"tiny": {"block_size": 128}}``).
    """
    # What can be checked without data or a model is checked before any work.
    tokenizer = run_tokenizer(data_args)
    config = model_config_for(presets, model_args.preset, tokenizer, model_args.vocab_size)
    block_size = block_size_for(config, data_args, model_args.preset, defaults)
    accelerator = build_accelerator(train_args)
    # The precision that runs (the launcher's, unless the flag says), so run_config and resumes record it.
    train_args = dataclasses.replace(train_args, mixed_precision=str(accelerator.mixed_precision))
    lock = lock_run_dir(accelerator, train_args.output_dir)  # one run per output dir
    write_exit_status(train_args.output_dir, None, "running")
    try:
        return _run(accelerator, config, block_size, model_args, data_args, train_args)
    finally:
        if lock is not None:
            lock.release()


def _run(accelerator, config: MoEConfig, block_size: int, model_args, data_args, train_args) -> Trainer:
    run_config = {**to_dict(model_args, data_args, train_args), "block_size": block_size}
    spec = train_args.resume_from_checkpoint
    # A storage URL that cannot work (no s3fs installed, an unknown scheme) is reported before tokenising.
    try:
        remote = (RemoteTier(train_args.checkpoint_upload_to, train_args.parsed_storage_options)
                  if train_args.checkpoint_upload_to else None)
    except CheckpointError as err:
        raise ConfigError(f"--checkpoint_upload_to: {err}") from None
    folder = None
    if spec:  # resolved (every checksum) and checked once, before tokenising; the resume loads this folder
        folder = resolve_on_main(accelerator, spec, train_args.output_dir, remote=remote)
        if folder is not None:
            resume_policy(config, run_config, accelerator.print)(folder)
    data = main_process_first(accelerator, lambda: build_datasets(
        data_args, train_args.seed, train_args.output_dir, block_size, progress=accelerator.is_main_process))
    model = MoEForCausalLM(config)
    counts = count_parameters(model, config)
    accelerator.print(f"model: preset {model_args.preset}, {counts['total'] / 1e6:.2f}M parameters "
                      f"({counts['active'] / 1e6:.2f}M active per token)")
    if train_args.init_from:
        report = load_weights(model, train_args.init_from, strict=False)
        accelerator.print(f"--init_from {train_args.init_from}: {report}")
    apply_memory_and_speed_features(model, train_args, accelerator)
    optimizers = build_optimizers(model, OptimizerSettings(
        muon_lr=train_args.muon_learning_rate, adamw_lr=train_args.learning_rate,
        weight_decay=train_args.weight_decay, muon_weight_decay=train_args.muon_weight_decay, adam_beta1=train_args.adam_beta1,
        adam_beta2=train_args.adam_beta2, adam_epsilon=train_args.adam_epsilon))
    trainer = Trainer(accelerator, model, optimizers, data, train_args, run_config=run_config,
                      flops_per_token=flops_per_token(counts["active"], config.num_hidden_layers,
                                                      config.num_attention_heads, config.head_dim, block_size))
    if spec:
        trainer.resume(spec, reset_optimizer=train_args.reset_optimizer,
                       reset_data_position=train_args.reset_data_position, folder=folder)
    trainer.train()
    return trainer

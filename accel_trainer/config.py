"""Typed run configuration: three dataclasses parsed by ``transformers.HfArgumentParser``.

Each field has a help string; ``__post_init__`` checks values and raises one ``ValueError`` listing
every problem with the flag that caused it, so the CLI can print one clear message and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .secrets import redact_mapping

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
# The HF Trainer's names for the same schedules (ours decay to --min_lr_ratio of the peak).
SCHEDULE_ALIASES = {"cosine_with_min_lr": "cosine", "constant_with_warmup": "constant", "warmup_stable_decay": "wsd"}
DEFAULT_WARMUP_STEPS = 10


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))


@dataclass
class ModelArguments:
    preset: str | None = field(default=None, metadata={"help": "Our MoE family: a size preset (tiny, 4090, b200, 18b; "
                                                               "recipes/moe18b.py, default tiny). Not with the Hugging "
                                                               "Face flags below."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from these Hugging Face weights: a "
                                                                           "model folder or a Hub name (continued "
                                                                           "pre-training, fine-tuning); the tokenizer "
                                                                           "defaults to the model's own."})
    config_name: str | None = field(default=None, metadata={"help": "A fresh model of this Hugging Face config: a "
                                                                    "folder with config.json or a Hub name."})
    model_type: str | None = field(default=None, metadata={"help": "A fresh model of any registered transformers "
                                                                   "architecture (llama, qwen3_moe, gpt2, mixtral, "
                                                                   "...), its config's defaults changed by "
                                                                   "--config_overrides."})
    config_overrides: str | None = field(default=None, metadata={"help": "Change config values, e.g. "
                                                                         "'hidden_size=512,num_hidden_layers=8' (as "
                                                                         "transformers' run_clm.py); every key must "
                                                                         "exist in the config."})
    vocab_size: int | None = field(default=None, metadata={"help": "Embedding rows; default: the tokenizer's ids "
                                                                   "rounded up to a multiple of 64 (128 from 16k) for "
                                                                   "fresh models, the model's own for "
                                                                   "--model_name_or_path (a larger value adds new "
                                                                   "rows, reported)."})
    strict: bool = field(default=False, metadata={"help": "Refuse to start when the starting weights and the model "
                                                          "differ (missing, unexpected, reshaped or newly initialised "
                                                          "tensors) instead of reporting them."})
    muon_params: list[str] | None = field(default=None, metadata={"help": "Regular expressions (searched in parameter "
                                                                          "names) of tensors that go to Muon, "
                                                                          "overriding the rule (hidden matrices and "
                                                                          "expert stacks to Muon; embeddings, output "
                                                                          "head, norms, biases, routers and 1D to "
                                                                          "AdamW). Matrices only."})
    adamw_params: list[str] | None = field(default=None, metadata={"help": "Regular expressions (searched in parameter "
                                                                           "names) of tensors that go to AdamW, "
                                                                           "overriding the rule."})
    freeze_params: list[str] | None = field(default=None, metadata={"help": "Regular expressions (searched in "
                                                                            "parameter names) of tensors to freeze: "
                                                                            "no gradient, no optimizer state; "
                                                                            "checkpoints store them once (linked while "
                                                                            "unchanged)."})
    experts_implementation: str | None = field(default=None, metadata={"help": "How a transformers MoE runs its "
                                                                               "experts: accel_trainer (our MoE "
                                                                               "engine: grouped GEMMs, no host sync, "
                                                                               "expert parallelism), or transformers' "
                                                                               "grouped_mm, batched_mm or eager; "
                                                                               "default: accel_trainer where the "
                                                                               "experts' layout allows, said at "
                                                                               "start."})
    lora_r: int | None = field(default=None, metadata={"help": "Fine-tune with LoRA adapters of this rank (PEFT; pip "
                                                               "install 'accel_trainer[lora]'): the base (from "
                                                               "--model_name_or_path) stays frozen, checkpoints hold "
                                                               "the adapters and their optimizer state only. See "
                                                               "docs/fine-tuning.md."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA's scale numerator (the update is "
                                                                     "alpha/r * B A); default 2 x --lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules that get adapters: names "
                                                                                  "(q_proj v_proj ...) or all-linear "
                                                                                  "(the default: every linear layer "
                                                                                  "but the output head)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, "
                                                                "CUDA GPUs only), with --lora_r."})

    def __post_init__(self):
        problems = []
        if self.lora_r is not None and self.lora_r < 1:
            problems.append(f"--lora_r={self.lora_r}: must be >= 1")
        lora_only = [f"--{n}" for n in ("lora_alpha", "lora_target_modules", "load_in_4bit") if getattr(self, n)]
        if self.lora_dropout:
            lora_only.append("--lora_dropout")
        if lora_only and self.lora_r is None:
            problems.append(f"{' and '.join(lora_only)}: only used with --lora_r (LoRA); give that too")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"--lora_alpha={self.lora_alpha}: must be > 0")
        if self.lora_r is not None and not self.model_name_or_path:
            problems.append("--lora_r: LoRA adapts pretrained weights; give them with --model_name_or_path (a folder "
                            "or a Hub name)")
        if self.lora_r is not None and self.freeze_params:
            problems.append("--lora_r and --freeze_params: with LoRA every base weight is frozen already")
        if self.vocab_size is not None and self.vocab_size < 1:
            problems.append(f"--vocab_size={self.vocab_size}: must be >= 1")
        hf = [f"--{n}" for n in ("model_name_or_path", "config_name", "model_type") if getattr(self, n)]
        if self.preset and hf:
            problems.append(f"--preset and {hf[0]}: give one (--preset is our MoE family; {hf[0]} a Hugging Face "
                            f"model)")
        if self.config_name and self.model_type:
            problems.append("--config_name and --model_type: give one (a config to start from, or an architecture)")
        if self.model_name_or_path and (self.config_name or self.model_type):
            problems.append(f"--model_name_or_path and {hf[1]}: the weights bring their config; change it with "
                            "--config_overrides")
        if self.experts_implementation not in (None, "accel_trainer", "grouped_mm", "batched_mm", "eager"):
            problems.append(f"--experts_implementation={self.experts_implementation!r}: choose accel_trainer, "
                            "grouped_mm, batched_mm or eager")
        import re

        for flag in ("muon_params", "adamw_params", "freeze_params"):
            for pattern in getattr(self, flag) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    problems.append(f"--{flag} {pattern!r}: not a regular expression ({err})")
        _raise_if(problems)

    @property
    def lora(self) -> bool:
        """Whether the run trains LoRA adapters on a frozen base."""
        return self.lora_r is not None

    @property
    def hugging_face(self) -> bool:
        """Whether the model comes from transformers (weights, a config, or an architecture name)."""
        return bool(self.model_name_or_path or self.config_name or self.model_type)


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset name for datasets.load_dataset "
                                                                     "(needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local .txt/.jsonl/.json/.parquet files (one "
                                                                         "type per run), prepared once under "
                                                                         "<output_dir>/data."})
    prepared_data: list[str] | None = field(default=None, metadata={"help": "Folders made by accel-trainer "
                                                                            "prepare-data (several: concatenated); "
                                                                            "they bring their tokenizer."})
    data_mix: list[str] | None = field(default=None, metadata={"help": "Prepared folders with weights, e.g. "
                                                                       "data/web:0.7 data/code:0.3."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in "
                                                               "--data_files/--dataset_name."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "For raw data: 'byte' (built in, the default; "
                                                                       "no download), a tokenizer folder "
                                                                       "(accel-trainer train-tokenizer) or Hub name."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per training sequence; default: the "
                                                                   "recipe's for the preset, else the model's context "
                                                                   "(at most 2048)."})
    validation_split_percentage: float = field(default=5.0, metadata={"help": "Share of packed blocks held out for "
                                                                              "validation (percent)."})
    max_corpus_bytes: int = field(default=4_000_000, metadata={"help": "Cap on the bytes read for the embedded default "
                                                                       "corpus."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes that tokenise raw data."})
    chat_data: list[str] | None = field(default=None, metadata={"help": "Chat fine-tuning: JSON-lines files whose rows "
                                                                        "hold 'messages' ([{role, content}, ...]), "
                                                                        "rendered by the tokenizer's chat template; "
                                                                        "the loss is on the assistant's tokens only "
                                                                        "(the template's {% generation %} markers). "
                                                                        "See docs/fine-tuning.md."})
    packing: bool = field(default=False, metadata={"help": "With --chat_data: place whole conversations into each "
                                                           "--block_size row (best fit, never split); positions "
                                                           "restart and attention stays within each conversation."})

    def __post_init__(self):
        problems = []
        if self.block_size is not None and self.block_size < 2:
            problems.append(f"--block_size={self.block_size}: must be >= 2")
        raw = [f"--{n}" for n in ("dataset_name", "data_files") if getattr(self, n)]
        prepared = [f"--{n}" for n in ("prepared_data", "data_mix") if getattr(self, n)]
        if raw and prepared or len(prepared) > 1:
            problems.append(f"{' and '.join(raw + prepared)}: give one source of data (--data_mix for weighted "
                            "prepared folders, --prepared_data for plain ones, or raw files/dataset)")
        if prepared and self.tokenizer_name:
            problems.append(f"--tokenizer_name with {prepared[0]}: prepared data brings its own tokenizer")
        if not 0 < self.validation_split_percentage < 50:
            problems.append(f"--validation_split_percentage={self.validation_split_percentage}: must be in (0, 50)")
        if self.dataset_name and self.data_files:
            problems.append("--dataset_name and --data_files: give one of them, not both")
        if self.chat_data and (raw or prepared):
            problems.append(f"--chat_data and {(raw + prepared)[0]}: give one source of data")
        if self.packing and not self.chat_data:
            problems.append("--packing: only used with --chat_data (plain text is always packed into full blocks)")
        if self.max_corpus_bytes <= 0:
            problems.append(f"--max_corpus_bytes={self.max_corpus_bytes}: must be > 0")
        _raise_if(problems)


@dataclass
class TrainingArguments:
    output_dir: str = field(default="runs/default", metadata={"help": "Where metrics, logs and checkpoints go."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; -1 means use --num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Total epochs (not additional ones when resuming)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per process per eval batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak LR of AdamW (embeddings, head, norms, router)."})
    muon_learning_rate: float = field(default=0.02, metadata={"help": "Peak LR of Muon (hidden matrices, experts)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay (as in the HF Trainer), "
                                                               "on its matrices (embeddings, output head, router); "
                                                               "norms are not decayed."})
    muon_weight_decay: float = field(default=0.0, metadata={"help": "Muon's decoupled weight decay (hidden matrices, "
                                                                    "experts)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine (alias cosine_with_min_lr), linear, wsd "
                                                                       "(warmup-stable-decay) or constant (alias "
                                                                       "constant_with_warmup); each decays to "
                                                                       "--min_lr_ratio of the peak."})
    warmup_steps: int | None = field(default=None, metadata={"help": f"Linear warmup steps (default "
                                                                     f"{DEFAULT_WARMUP_STEPS}, or --warmup_ratio)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warmup as a fraction of the schedule's steps "
                                                                       "(the HF Trainer's flag); instead of "
                                                                       "--warmup_steps."})
    lr_schedule_steps: int | None = field(default=None, metadata={"help": "Steps the LR schedule spans (default: the "
                                                                          "run's total steps). On a resume with a "
                                                                          "larger --max_steps, pass the old total to "
                                                                          "keep the saved schedule instead of "
                                                                          "stretching it (the extra steps train at the "
                                                                          "final LR)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final LR as a fraction of the peak."})
    decay_ratio: float = field(default=0.2, metadata={"help": "wsd: fraction of the steps spent decaying."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    expert_parallel_size: int = field(default=1, metadata={"help": "Expert parallelism for our MoE family: ranks that "
                                                                   "share one copy of every MoE layer's experts, each "
                                                                   "holding num_experts/N of them; tokens move to "
                                                                   "their experts with all_to_all. Divides the number "
                                                                   "of processes and num_experts; under DDP or FSDP2. "
                                                                   "See docs/cluster.md."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16 (fp16 needs a GPU). Default: "
                                                                        "what `accelerate launch` was configured with "
                                                                        "(e.g. accelerate_configs/*.yaml), else no."})
    full_determinism: bool = field(default=False, metadata={"help": "Deterministic kernels (the HF Trainer's flag: "
                                                                    "torch.use_deterministic_algorithms, "
                                                                    "CUBLAS_WORKSPACE_CONFIG): bit-exact runs and "
                                                                    "resumes on GPU, somewhat slower. CPU runs are "
                                                                    "deterministic without it."})
    bf16: bool = field(default=False, metadata={"help": "Same as --mixed_precision bf16 (the HF Trainer's flag)."})
    fp16: bool = field(default=False, metadata={"help": "Same as --mixed_precision fp16 (the HF Trainer's flag)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each decoder layer in the "
                                                                          "backward instead of keeping its activations "
                                                                          "(less memory, ~1/3 more compute)."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile each decoder layer with torch.compile "
                                                                 "(regional compilation)."})
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend for "
                                                                             "--torch_compile."})
    torch_compile_mode: str | None = field(default=None, metadata={"help": "torch.compile mode for --torch_compile "
                                                                           "(e.g. max-autotune)."})
    peak_tflops: float | None = field(default=None, metadata={"help": "Peak TFLOP/s of one device for MFU; default: a "
                                                                      "table of known GPUs (none on CPU)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes that read training blocks (0: the "
                                                                     "training process)."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Stop (with an emergency checkpoint) after this "
                                                                   "many steps in a row with a non-finite loss or "
                                                                   "gradient; 0 never stops."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    eval_steps: int = field(default=100, metadata={"help": "Evaluate val loss every N steps; 0 disables."})
    eval_tasks: str | None = field(default=None, metadata={"help": "lm-evaluation-harness tasks (comma-separated) to "
                                                                   "run on the main process every --eval_tasks_steps "
                                                                   "steps; results in metrics.jsonl as "
                                                                   "eval/<task>/<metric> (pip install "
                                                                   "'accel_trainer[eval]')."})
    eval_tasks_steps: int = field(default=0, metadata={"help": "Run --eval_tasks every N steps (and at the last step); "
                                                               "0: at the last step only."})
    eval_tasks_limit: float | None = field(default=None, metadata={"help": "Examples per task for --eval_tasks (a "
                                                                           "fraction below 1)."})
    eval_include_path: str | None = field(default=None, metadata={"help": "A folder of task YAML files of your own for "
                                                                          "--eval_tasks (works offline)."})
    eval_tasks_strict: bool = field(default=False, metadata={"help": "Stop the run when --eval_tasks fails (default: "
                                                                     "one line, and training goes on)."})
    max_eval_batches: int = field(default=20, metadata={"help": "Cap on eval batches per process per evaluation."})
    save_steps: int = field(default=0, metadata={"help": "Save a checkpoint every N steps; 0 disables periodic saves."})
    metric_for_best_model: str = field(default="val_loss", metadata={
        "help": "What 'best' follows (lower is better): val_loss (nats per token of this run's tokenizer) or "
                "val_bpb (bits per byte: compares runs with different tokenizers)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep the newest K checkpoints (plus latest "
                                                                         "and best); default keeps all."})
    keep_every_n_steps: int | None = field(default=None, metadata={"help": "Also keep every checkpoint whose step is a "
                                                                           "multiple of N."})
    full_state_total_limit: int | None = field(default=None, metadata={"help": "Keep the whole state (optimizer, data "
                                                                               "position, RNG) only in the newest N "
                                                                               "checkpoints and best; older kept ones "
                                                                               "become weights-only."})
    save_on_each_epoch: bool = field(default=False, metadata={"help": "Also save at the end of every epoch."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a fresh run in an --output_dir that holds another run's checkpoints: they and its "
                "metrics.jsonl are moved aside into <output_dir>/overwritten-<time>/ (delete it when sure)."})
    save_on_exception: bool = field(default=True, metadata={"help": "Save an emergency checkpoint when the loop raises "
                                                                    "(single process)."})
    save_strict: bool = field(default=False, metadata={"help": "Stop the run when a checkpoint does not fit or fails "
                                                               "(default: warn, skip it, train on)."})
    async_save: bool = field(default=False, metadata={"help": "Stage state in memory and write checkpoints in a "
                                                              "background thread (sharded FSDP2 runs: each rank's "
                                                              "shards)."})
    checkpoint_compression: str = field(default="none", metadata={"help": "none, or zstd: lossless compression of "
                                                                          "the weights and optimizer state in "
                                                                          "checkpoints (see docs/performance.md)."})
    checkpoint_compression_level: int = field(default=3, metadata={"help": "zstd level of --checkpoint_compression "
                                                                           "(1 fastest .. 22)."})
    checkpoint_upload_to: str | None = field(default=None, metadata={"help": "Also upload every complete checkpoint, "
                                                                             "in the background, to this fsspec URL "
                                                                             "(s3://bucket/prefix; pip install "
                                                                             "'accel_trainer[s3]'); "
                                                                             "--resume_from_checkpoint latest then "
                                                                             "looks there too."})
    storage_options: str | None = field(default=None, metadata={"help": "JSON options for --checkpoint_upload_to's "
                                                                        "filesystem, e.g. '{\"endpoint_url\": "
                                                                        "\"http://host:9000\"}', or @FILE (a JSON "
                                                                        "file); without it, the "
                                                                        "ACCEL_TRAINER_STORAGE_OPTIONS variable (same "
                                                                        "forms). Keep credentials off the command line "
                                                                        "(launchers print it when a run fails): AWS_* "
                                                                        "variables, a file, or that variable; any "
                                                                        "given are never saved or logged."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "latest, best, step-<N> or a path; 'latest' with no checkpoint starts fresh. A .pt file of another "
                "trainer is imported into --output_dir (weights, optimizer state, counters) and continued."})
    trust_pickled_class: list[str] | None = field(default=None, metadata={
        "help": "With --resume_from_checkpoint OLD.pt: a class the file pickles (module.Class), read as a dict of "
                "its fields after you read its code (its code never runs)."})
    init_from: str | None = field(default=None, metadata={"help": "Start from these weights only (non-strict, "
                                                                  "reported); counters and optimizer start fresh."})
    reset_optimizer: bool = field(default=False, metadata={"help": "With --resume_from_checkpoint: restore "
                                                                   "weights/counters but start the optimizer fresh."})
    reset_data_position: bool = field(default=False, metadata={"help": "With --resume_from_checkpoint: train on other "
                                                                       "data (another --block_size, files, tokenizer, "
                                                                       "seed) from its beginning; weights, optimizer "
                                                                       "and counters are kept."})
    ema_decay: float = field(default=0.98, metadata={"help": "Decay of the exponential moving average of train loss."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data split and order."})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker(s): tensorboard, wandb, all, "
                                                                    "or none."})
    run_name: str | None = field(default=None, metadata={"help": "Tracker run name; defaults to the output_dir's "
                                                                 "name."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    log_data_blocks: bool = field(default=False, metadata={"help": "Audit the data order: every rank appends the "
                                                                   "global block ids each step reads to "
                                                                   "<output_dir>/data_blocks.rank<N>.jsonl."})

    def __post_init__(self):
        problems = []
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "max_eval_batches", "expert_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name}={getattr(self, name)}: must be >= 1")
        for name in ("eval_steps", "save_steps", "warmup_steps", "max_nonfinite_steps", "dataloader_num_workers"):
            if (getattr(self, name) or 0) < 0:
                problems.append(f"--{name}={getattr(self, name)}: must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"--max_steps={self.max_steps}: must be > 0, or -1 to use --num_train_epochs")
        if self.checkpoint_compression not in ("none", "zstd"):
            problems.append(f"--checkpoint_compression={self.checkpoint_compression}: use none or zstd")
        if not 1 <= self.checkpoint_compression_level <= 22:
            problems.append(f"--checkpoint_compression_level={self.checkpoint_compression_level}: zstd levels are "
                            "1..22")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            problems.append(f"--num_train_epochs={self.num_train_epochs}: must be > 0")
        for name in ("learning_rate", "muon_learning_rate"):  # 0 freezes that optimizer's parameters
            if not getattr(self, name) >= 0:
                problems.append(f"--{name}={getattr(self, name)}: must be >= 0")
        for name in ("weight_decay", "muon_weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"--{name}={getattr(self, name)}: must be >= 0")
        problems += self._aliases()
        self._storage_options: dict = {}
        if self.storage_options or self.checkpoint_upload_to:
            from .checkpoint import parse_storage_options

            try:  # the one parse (the flag, or its environment variable): the rest reads parsed_storage_options
                self._storage_options = parse_storage_options(self.storage_options)
            except CheckpointError as err:
                problems.append(str(err))
            if self.storage_options and not self.checkpoint_upload_to:
                problems.append("--storage_options: only used with --checkpoint_upload_to; give that too")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"--mixed_precision={self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}")
        if self.lr_scheduler_type not in SCHEDULES:
            problems.append(f"--lr_scheduler_type={self.lr_scheduler_type!r}: choose one of {', '.join(SCHEDULES)} "
                            f"(or the HF names {', '.join(SCHEDULE_ALIASES)})")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            problems.append(f"--warmup_steps={self.warmup_steps} and --warmup_ratio={self.warmup_ratio}: give one")
        if self.lr_schedule_steps is not None and self.lr_schedule_steps < 1:
            problems.append(f"--lr_schedule_steps={self.lr_schedule_steps}: must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 < self.decay_ratio <= 1:
            problems.append(f"--decay_ratio={self.decay_ratio}: must be in (0, 1]")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.full_state_total_limit is not None and self.full_state_total_limit < 1:
            problems.append(f"--full_state_total_limit={self.full_state_total_limit}: must be >= 1 (omit it to keep "
                            "the whole state in every checkpoint)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(f"--save_total_limit={self.save_total_limit}: must be >= 1 (omit it to keep every "
                            f"checkpoint)")
        if self.keep_every_n_steps is not None and self.keep_every_n_steps < 1:
            problems.append(f"--keep_every_n_steps={self.keep_every_n_steps}: must be >= 1")
        if self.resume_from_checkpoint and self.init_from:
            problems.append("--resume_from_checkpoint and --init_from: give one (resume restores everything, "
                            "init_from only weights)")
        for name in ("reset_optimizer", "reset_data_position"):
            if getattr(self, name) and not self.resume_from_checkpoint:
                problems.append(f"--{name}: only meaningful with --resume_from_checkpoint")
        if self.eval_tasks_steps < 0:
            problems.append(f"--eval_tasks_steps={self.eval_tasks_steps}: must be >= 0")
        if self.eval_tasks_limit is not None and not self.eval_tasks_limit > 0:
            problems.append(f"--eval_tasks_limit={self.eval_tasks_limit}: must be > 0 (a count, or a fraction below 1)")
        for name in ("eval_tasks_steps", "eval_tasks_limit", "eval_include_path", "eval_tasks_strict"):
            if getattr(self, name) not in (None, 0, False) and not self.eval_tasks:
                problems.append(f"--{name}: only used with --eval_tasks; give that too")
        if self.metric_for_best_model not in ("val_loss", "val_bpb"):
            problems.append(f"--metric_for_best_model={self.metric_for_best_model!r}: choose val_loss or val_bpb "
                            "(lower is better)")
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            problems.append(f"--report_to={self.report_to!r}: choose tensorboard, wandb, all or none")
        _raise_if(problems)

    def _aliases(self) -> list[str]:
        """--bf16/--fp16 set --mixed_precision; --lr_scheduler_type takes the HF Trainer's names."""
        self.lr_scheduler_type = SCHEDULE_ALIASES.get(self.lr_scheduler_type, self.lr_scheduler_type)
        wanted = [name for name in ("bf16", "fp16") if getattr(self, name)]
        if len(wanted) == 2:
            return ["--bf16 and --fp16: give one"]
        if wanted and self.mixed_precision not in (None, wanted[0]):
            return [f"--{wanted[0]} and --mixed_precision={self.mixed_precision}: they disagree; give one"]
        if wanted:
            self.mixed_precision = wanted[0]
        return []

    def warmup_for(self, schedule_steps: int) -> int:
        """Warmup steps of a schedule of ``schedule_steps``: --warmup_steps, or --warmup_ratio of it."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * schedule_steps)
        return DEFAULT_WARMUP_STEPS

    def checkpoint_config(self):
        """The flags that say how to save, as the checkpoint component's own config object."""
        from .checkpoint import CheckpointConfig

        return CheckpointConfig(save_total_limit=self.save_total_limit, keep_every_n_steps=self.keep_every_n_steps,
                                full_state_total_limit=self.full_state_total_limit,
                                best_metric=self.metric_for_best_model,
                                async_save=self.async_save, save_strict=self.save_strict, handle_signals=True,
                                upload_to=self.checkpoint_upload_to,
                                storage_options=self.parsed_storage_options or None,
                                compression=(None if self.checkpoint_compression == "none"
                                             else self.checkpoint_compression),
                                compression_level=self.checkpoint_compression_level)

    @property
    def eval_task_names(self) -> list[str]:
        return [t.strip() for t in (self.eval_tasks or "").split(",") if t.strip()]

    @property
    def parsed_storage_options(self) -> dict:
        """``--storage_options`` as a dict (parsed once, when the arguments were checked)."""
        return dict(self._storage_options)

    @property
    def tracker_run_name(self) -> str:
        """--run_name, else the output dir's name (what TensorBoard and W&B show)."""
        return self.run_name or Path(self.output_dir).resolve().name


# HF Trainer flags with no counterpart here, and what to use instead (shown when one is passed).
HF_TRAINER_ADVICE = {
    "eval_strategy": "evaluation runs every --eval_steps steps (0 disables it) and at the last step",
    "evaluation_strategy": "evaluation runs every --eval_steps steps (0 disables it) and at the last step",
    "save_strategy": "save with --save_steps N and/or --save_on_each_epoch; the last step and each new best "
                     "val loss are always saved",
    "logging_strategy": "log with --logging_steps N",
    "load_best_model_at_end": "the best checkpoint is always kept as <output_dir>/checkpoints/best; load it with "
                              "load_model_for_inference('<output_dir>/checkpoints/best') or --resume_from_checkpoint "
                              "best",
    "greater_is_better": "'best' is the lowest val loss",
    "save_only_model": "checkpoints hold the whole state (that is what makes them resumable); "
                       "`accel-trainer export <checkpoint> <dir>` writes the model alone",
    "save_safetensors": "checkpoints are always safetensors (optimizer state too)",
    "push_to_hub": "export with `accel-trainer export <checkpoint> <dir>`, then `huggingface-cli upload <repo> <dir>`",
    "hub_model_id": "export with `accel-trainer export <checkpoint> <dir>`, then `huggingface-cli upload <repo> <dir>`",
    "hub_token": "export with `accel-trainer export <checkpoint> <dir>`, then `huggingface-cli upload <repo> <dir>`",
    "do_train": "the recipe always trains (and evaluates every --eval_steps)",
    "do_eval": "the recipe evaluates every --eval_steps steps",
    "deepspeed": "choose DDP, FSDP or DeepSpeed with `accelerate launch --config_file accelerate_configs/<env>.yaml`",
    "fsdp": "choose DDP, FSDP or DeepSpeed with `accelerate launch --config_file accelerate_configs/<env>.yaml`",
    "optim": "the optimizers are fixed: Muon (hidden matrices, --muon_learning_rate) + AdamW (the rest, "
             "--learning_rate)",
    "lr_scheduler_kwargs": "use --min_lr_ratio and --decay_ratio",
    "per_gpu_train_batch_size": "use --per_device_train_batch_size",
    "max_seq_length": "use --block_size",
    "dataset_text_field": "use --text_column",
    "data_seed": "--seed seeds the data order too",
    "logging_dir": "TensorBoard logs go under <output_dir>; metrics also to <output_dir>/metrics.jsonl",
    "tf32": "TF32 matmuls follow torch's defaults here",
    "gradient_checkpointing_kwargs": "--gradient_checkpointing recomputes each decoder layer (non-reentrant)",
}


# Flags of the trainers our users come from (the guides in shared/seeds: nanoGPT-style scripts, a
# vocab-25 model, a pickled-dataset trainer, the 18B MoE), keyed with dashes as underscores.
SEED_FLAG_ADVICE = {
    "epochs": "use --num_train_epochs N",
    "resume": "use --resume_from_checkpoint latest (or best, step-N, a checkpoint folder)",
    "resume_from": "use --resume_from_checkpoint latest (or best, step-N, a checkpoint folder)",
    "name": "use --run_name NAME (the folder is --output_dir)",
    "device": "accelerate launch chooses the device: GPUs when there are any, ACCELERATE_USE_CPU=1 for the CPU",
    "gpu": "accelerate launch chooses the GPUs (--num_processes N, CUDA_VISIBLE_DEVICES)",
    "config": "use --config_name (a model's config.json or folder), or --preset NAME for our MoE",
    "batch_size": "use --per_device_train_batch_size N (and --gradient_accumulation_steps K)",
    "lr": "use --learning_rate (AdamW) and --muon_learning_rate (Muon)",
    "learning_rate_muon": "use --muon_learning_rate",
    "data": "use --data_files FILE... (text, JSON lines, Parquet) or --prepared_data DIR",
    "eval_interval": "use --eval_steps N",
    "save_interval": "use --save_steps N",
    "save_every": "use --save_steps N",
    "num_layers": "use --config_overrides num_hidden_layers=N (with --model_type or --config_name)",
    "num_heads": "use --config_overrides num_attention_heads=N (with --model_type or --config_name)",
    "hidden_dim": "use --config_overrides hidden_size=N (with --model_type or --config_name)",
    "grad_accum_steps": "use --gradient_accumulation_steps N",
    "use_wandb": "use --report_to wandb",
    "use_amp": "use --mixed_precision bf16 (or fp16)",
    "amp": "use --mixed_precision bf16 (or fp16)",
    "save_dir": "use --output_dir DIR",
    "out_dir": "use --output_dir DIR",
    "checkpoint_dir": "use --output_dir DIR (checkpoints go to DIR/checkpoints)",
    "dropout": "dropout is the model's setting: --config_overrides attention_dropout=0.1 (a transformers model) "
               "or your module's config (model_config)",
    "compile": "use --torch_compile",
    "grad_clip": "use --max_grad_norm",
    "max_iters": "use --max_steps N",
    "warmup_iters": "use --warmup_steps N",
    "mode": "this command trains; evaluate with `accel-trainer eval <checkpoint>`",
}


def unknown_flags_message(unknown: list[str], known: list[str]) -> str:
    """One line per unknown flag: the HF Trainer equivalent if there is one, else the closest flags."""
    lines = []
    for item in unknown:
        if not item.startswith("-"):
            continue  # the value of an unknown flag
        flag = item.split("=", 1)[0]
        name = flag.lstrip("-")
        if name in HF_TRAINER_ADVICE:
            lines.append(f"{flag}: not a flag here (an HF Trainer flag); {HF_TRAINER_ADVICE[name]}")
            continue
        if name.replace("-", "_") in SEED_FLAG_ADVICE:
            lines.append(f"{flag}: not a flag here; {SEED_FLAG_ADVICE[name.replace('-', '_')]}")
            continue
        if f"--{name.replace('-', '_')}" in known:  # --save-steps: the dashed spelling of a flag
            lines.append(f"{flag}: use --{name.replace('-', '_')}")
            continue
        close = difflib.get_close_matches(f"--{name.replace('-', '_')}", known, n=3, cutoff=0.75)
        hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the flags"
        lines.append(f"{flag}: unknown flag; {hint}")
    if not lines:
        lines.append(f"unexpected arguments {' '.join(unknown)} (every value follows its --flag)")
    return "\n".join(lines)


def parse_args(dataclass_types, args: list[str] | None = None):
    """Parse CLI flags into the given dataclasses; on a bad flag print one message and exit 2.

    Unknown flags (with what to use instead for HF Trainer flags, or the closest flags) and values
    that fail ``__post_init__`` both exit with status 2 naming the flag, never with a traceback.
    """
    from transformers import HfArgumentParser

    # No abbreviations: --resume-from would silently be --resume_from_checkpoint, --lr ambiguous.
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if unknown:
        known = [opt for action in parser._actions for opt in action.option_strings
                 if opt.startswith("--") and "-" not in opt[2:]]  # not HfArgumentParser's dashed aliases
        print(f"error: {unknown_flags_message(unknown, known)}", file=sys.stderr)
        raise SystemExit(2)
    return tuple(parsed)


def to_dict(*configs) -> dict:
    """Flat ``{field: value}`` of the dataclasses, for trackers, checkpoints and diffs."""
    out = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    for cfg in configs:  # saved with checkpoints and sent to trackers: never credentials
        if getattr(cfg, "storage_options", None):
            out["storage_options"] = json.dumps(redact_mapping(cfg.parsed_storage_options))
    return redact_mapping(out)


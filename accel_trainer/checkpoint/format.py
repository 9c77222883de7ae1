"""The on-disk format of a checkpoint: every file name, what it holds, and the format version.

Readers and writers (the Checkpointer, verification, inspection, inference, the CLI) import these
names; no other module spells a checkpoint file name as a string.

    <output_dir>/checkpoints/
        step-<N>/                  one checkpoint; it counts only once it holds COMPLETE
        .tmp-step-<N>/             a save in progress (or left by a crash; removed by the next save)
        latest, best               pointer files holding "step-<N>", replaced atomically
"""

from __future__ import annotations

import re
from pathlib import Path

# Version 2: state saved by name through the Checkpointer component (dataloader position, named
# extra states, Accelerate's RNG file as the only one); version 1 checkpoints are still readable for
# weights (inference, export, inspection) and resume once rewritten by upgrading.py. A new version
# adds its golden checkpoint to tests/data/golden (written by the last code of the old one).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

CHECKPOINTS = "checkpoints"
RUN_LOCK = ".lock"  # in the output dir: held by the run writing it (see lock.py)
STEP_PREFIX = "step-"
STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
LATEST, BEST = "latest", "best"
POINTERS = (LATEST, BEST)

MANIFEST = "manifest.json"
# Manifest key of a checkpoint thinned by --full_state_total_limit (see thinning.py).
WEIGHTS_ONLY = "weights_only"
COMPLETE = "COMPLETE"

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
# Parameters that take no gradient (--freeze_params), apart: while their bytes do not change, each
# checkpoint links the previous one's file instead of writing it again.
FROZEN_WEIGHTS = "model.frozen.safetensors"
# The same tensors compressed (--checkpoint_compression zstd): see ztensors.py. A checkpoint holds one
# of the two names for each; readers find it with tensor_file().
COMPRESSED_SUFFIX = ".ztensors"
MODEL_WEIGHTS_Z = "model" + COMPRESSED_SUFFIX
OPTIMIZER_TENSORS_Z = "optimizer" + COMPRESSED_SUFFIX
OPTIMIZER_GROUPS = "optimizer.json"
# Named states, each ``<name>.json`` (or ``<name>.pt``): see :func:`state_file`.
SCHEDULERS = "schedulers"
DATALOADER = "dataloader"
RUN_CONFIG = "run_config.json"
# config.json of your own nn.Module: {"model_type": CUSTOM_MODEL, CUSTOM_MODEL: {"class", "config"}}
CUSTOM_MODEL = "accel_trainer_custom"
# Written by Accelerate's save_state under its own names.
SCALER = "scaler.pt"
RNG_PREFIX = "random_states_"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
# Ours for a DTensor-sharded (FSDP2) model: model + named optimizers, one DCP file per rank.
SHARDED_DIR = "sharded"
FSDP_OPTIMIZER_PREFIX = "optimizer_"
# Version 1 only (our own RNG copy, next to Accelerate's).
LEGACY_RNG_PREFIX = "rng_state_"

# A named state is ``<name>.json``, or ``<name>.pt`` when it is not plain JSON.
STATE_SUFFIXES = (".json", ".pt")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED_NAMES = {"model", "optimizer", "schedulers", "dataloader", "config", "run_config", "manifest",
                  "scaler", "COMPLETE", "latest", "best", "tokenizer", "tokenizer_config", "special_tokens_map",
                  "generation_config"}
# What a tokenizer's save_pretrained may write besides tokenizer*.json.
TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# Files pickled by torch.save (scanned for code before anything is loaded).
PICKLED_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")

ROLES = {
    MODEL_WEIGHTS: "model weights (safetensors, names as in model.state_dict(), no wrapper prefixes)",
    MODEL_CONFIG: "model config (rebuilds the model without the training script)",
    OPTIMIZER_TENSORS: "every optimizer state tensor, keyed '<parameter name>::<state key>'",
    FROZEN_WEIGHTS: "frozen parameters (--freeze_params): linked from the previous checkpoint while unchanged",
    "model.frozen" + COMPRESSED_SUFFIX: "frozen parameters (--freeze_params), zstd-compressed",
    MODEL_WEIGHTS_Z: "model weights, zstd-compressed losslessly (ztensors; `accel-trainer export` writes safetensors)",
    OPTIMIZER_TENSORS_Z: "every optimizer state tensor, keyed '<parameter name>::<state key>', zstd-compressed",
    OPTIMIZER_GROUPS: "optimizers by name: param groups with param_names and hyperparameters, scalar state",
    f"{SCHEDULERS}.json": "LR schedulers by name",
    f"{DATALOADER}.json": "data position: epoch and samples consumed in it (all processes), epoch RNG",
    RUN_CONFIG: "the run's configuration (all flags)",
    SCALER: "fp16 grad scaler state (Accelerate)",
}


def rng_file(rank: int) -> str:
    """The RNG file of one rank, as Accelerate's save_state names it."""
    return f"{RNG_PREFIX}{rank}.pkl"


def shard_files_glob(rank: int) -> str:
    """The DCP files one rank writes into ``SHARDED_DIR`` (``__<rank>_<n>.distcp``)."""
    return f"__{rank}_*"


def writer_rank(name: str) -> int:
    """The rank that wrote a checkpoint file: a DCP shard's own rank, else 0 (rank 0 writes the rest).
    Each rank uploads the files it wrote."""
    match = re.match(rf"^{SHARDED_DIR}/__(\d+)_", name)
    return int(match.group(1)) if match else 0


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def state_file(name: str, plain_json: bool = True) -> str:
    """The file of a named state (schedulers, dataloader, a loop's extras)."""
    return f"{name}{STATE_SUFFIXES[0] if plain_json else STATE_SUFFIXES[1]}"


def is_optimizer_file(name: str) -> bool:
    """A file that holds optimizer state only (not the sharded layout, whose files mix model and
    optimizer)."""
    return name in (OPTIMIZER_TENSORS, OPTIMIZER_TENSORS_Z, OPTIMIZER_GROUPS) or name.startswith(FSDP_OPTIMIZER_PREFIX)


def stored_name(name: str, compressed: bool) -> str:
    """The file a tensor file (``model.safetensors``, ``optimizer.safetensors``) is stored as."""
    return name.replace(".safetensors", COMPRESSED_SUFFIX) if compressed else name


def read_in_one_pass(name: str) -> bool:
    """A tensor file whose checksum its loader compares while it reads it (resume, inference), so a
    resume reads it once: the model's and the optimizer's files, plain or compressed (not the
    sharded layout's, which DCP reads)."""
    return name in {n for base in (MODEL_WEIGHTS, FROZEN_WEIGHTS, OPTIMIZER_TENSORS)
                    for n in (base, stored_name(base, True))}


def weight_files(folder: Path) -> list[Path]:
    """The files that hold a checkpoint's model weights (plain or compressed; trainable, then frozen)."""
    return [f for f in (tensor_file(folder, MODEL_WEIGHTS), tensor_file(folder, FROZEN_WEIGHTS)) if f is not None]


def tensor_file(folder: Path, name: str) -> Path | None:
    """The stored file of tensor file ``name`` in ``folder``: plain or compressed; None when neither is."""
    for candidate in (name, stored_name(name, True)):
        if (Path(folder) / candidate).is_file():
            return Path(folder) / candidate
    return None


def role_of(name: str) -> str:
    """What a checkpoint file holds, for the manifest and ``accel-trainer inspect``."""
    if name in ROLES:
        return ROLES[name]
    if name.startswith(RNG_PREFIX):
        return "RNG of one rank (python, numpy, torch, cuda), written by Accelerate"
    if name.startswith(LEGACY_RNG_PREFIX):
        return "RNG of one rank (format 1)"
    if name == f"{SHARDED_DIR}/.metadata":
        return "index of the sharded model and optimizer state (torch.distributed.checkpoint)"
    if name.startswith(f"{SHARDED_DIR}/"):
        return "one rank's shards of the model and optimizer state (torch.distributed.checkpoint)"
    if name.startswith(FSDP_MODEL_DIR.rsplit("_", 1)[0]):
        return "model shard (FSDP sharded state dict, torch.distributed.checkpoint)"
    if name.startswith(FSDP_OPTIMIZER_PREFIX):
        return "optimizer shard (FSDP sharded state dict, torch.distributed.checkpoint)"
    if name.startswith("tokenizer") or name in TOKENIZER_FILES:
        return "tokenizer (AutoTokenizer.from_pretrained loads it from the checkpoint folder)"
    if name.endswith(STATE_SUFFIXES) and "/" not in name:
        return f"named state '{name.rsplit('.', 1)[0]}'"
    return "written by Accelerate's save_state"

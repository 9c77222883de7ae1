"""Compose a run from parsed arguments: accelerator, data, model, optimizers, trainer."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .checkpoint import (MANIFEST, MODEL_CONFIG, RUN_CONFIG, CheckpointError, for_resume, is_optimizer_file,
                         load_weights, lock_run_dir, read_json, remote_tier, resolve_on_main, verify)
from .config import DataArguments, ModelArguments, TrainingArguments, to_dict
from .data import (DATA_IDENTITY_VERSION, TOKENIZER_DIR, build_datasets, data_contents, data_identity, file_hashes,
                   legacy_data_identity, load_tokenizer, parse_mix, read_prepared)
from .efficiency import compile_decoder_layers, enable_activation_checkpointing
from .importing import is_single_file_checkpoint
from .errors import ConfigError, InputError, error_class
from .models import CUSTOM_KEY, ModelPlan, count_parameters_of, load_auto_config, logits_of, plan_model
from .parallel import ParallelDims
from .optim import (OptimizerSettings, assign_parameters, assignment_summary, assignment_table, build_optimizers,
                    freeze_parameters)
from .process import write_exit_status
from .telemetry import flops_per_token
from .trainer import Trainer, build_accelerator


def check_shared_output_dir(accelerator, output_dir: str | Path) -> None:
    """With several processes, before any work: every rank writes a probe file into ``output_dir``
    and reads every other rank's. A checkpoint is one folder written by all ranks (each its RNG, under
    FSDP its shards) and committed by rank 0, so nodes that do not see one file system (cloud VMs with
    local disks) would commit checkpoints without their files and resume into a crash. A collective call.

    Raises:
        ConfigError: on every rank, naming ``--output_dir``, the ranks and hosts that do not see each other.
    """
    import platform
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes < 2:
        return
    nonce = [uuid.uuid4().hex[:12] if accelerator.is_main_process else None]
    broadcast_object_list(nonce, from_process=0)
    folder, rank, world = Path(output_dir), accelerator.process_index, accelerator.num_processes
    probe = folder / f".probe-{nonce[0]}-rank{rank}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(platform.node())
        problem = None
    except OSError as err:
        problem = f"rank {rank} cannot write there ({err.strerror})"
    accelerator.wait_for_everyone()
    if problem is None:
        unseen = [r for r in range(world) if not (folder / f".probe-{nonce[0]}-rank{r}").is_file()]
        if unseen:
            problem = f"rank {rank} on host {platform.node()} does not see the files of rank(s) {unseen}"
    problems = [p for p in gather_object([problem]) if p]
    accelerator.wait_for_everyone()
    probe.unlink(missing_ok=True)
    if problems:
        raise ConfigError(f"--output_dir={str(output_dir)!r} is not one file system shared by every process "
                          f"({'; '.join(problems[:4])}): checkpoints need it (all ranks write into each one, rank 0 "
                          "commits it). Use a shared file system (NFS, Lustre, GPFS, a shared volume) for "
                          "--output_dir; with node-local disks the checkpoints cannot be committed")


def run_tokenizer(args: DataArguments):
    """The tokenizer of this run, known before any data work: prepared data's own, or ``--tokenizer_name``."""
    folders = parse_mix(args.data_mix)[0] if args.data_mix else args.prepared_data
    if folders:
        return load_tokenizer(str(Path(folders[0]) / TOKENIZER_DIR)) if read_prepared(folders[0]) else None
    return load_tokenizer(args.tokenizer_name or "byte")


def block_size_for(plan: ModelPlan, args: DataArguments, preset: str | None, defaults: dict | None) -> int:
    """``--block_size``, else the recipe's default for the preset, else the model's context (at most
    :data:`DEFAULT_MAX_BLOCK` for a Hugging Face model).

    Raises:
        ConfigError: longer than the model's context, or no context to default to.
    """
    context = plan.shape.context
    table = defaults if defaults is not None else plan.family.defaults  # the recipe's, else the family's
    default = table.get(preset, {}).get("block_size") if preset else None
    default = default or (context if plan.source == "preset" else plan.default_block_size())
    block = args.block_size or default
    if block is None:
        raise ConfigError(f"--block_size: {plan.name} says no context length; give --block_size")
    if context and block > context:
        raise ConfigError(f"--block_size={block}: longer than the model's context ({plan.name}: {context} "
                          f"positions); use --block_size {context} or less")
    return block


# Run-config keys that may differ on resume without comment (they say where/how, not what).
# (The optimizer assignment: a change shows as an optimizer that does not load.)
QUIET_KEYS = {"resume_from_checkpoint", "output_dir", "disable_tqdm", "report_to", "run_name", "async_save",
              "reset_optimizer", "reset_data_position", "bf16", "fp16", "log_data_blocks",
              "optimizer_assignment", "eval_tasks", "eval_tasks_steps", "eval_tasks_limit", "eval_include_path",
              "eval_tasks_strict", "metric_for_best_model", "trust_pickled_class",
              "data_file_hashes", "data_contents", "data_identity_version"}
# Flags that name where data is: covered by the contents identity (paths are not identity).
PATH_KEYS = ("data_files", "prepared_data", "data_mix", "tokenizer_name", "chat_data")
# What the saved data position means: with other values, sample k of an epoch is another text.
DATA_KEYS = ("dataset_name", "dataset_config_name", "data_files", "prepared_data", "data_mix", "text_column",
             "tokenizer_name", "block_size", "validation_split_percentage", "max_corpus_bytes", "seed", "data_identity",
             "chat_data", "packing")


# Config keys that make another architecture when they differ (any transformers model; our MoE
# config and your own module's say theirs).
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                     "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "intermediate_size",
                     "n_inner", "moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
                     "tie_word_embeddings")


# Settings of your own module's config that shape no weight (changeable on resume, the optimizer
# state kept): dropout rates, by name.
RUNTIME_SETTING = re.compile(r"dropout|drop_rate|drop_prob", re.IGNORECASE)


def _architecture(config_json: dict, keys) -> dict:
    if CUSTOM_KEY in config_json:  # your own module: its class and every field of its config but dropout
        custom = config_json[CUSTOM_KEY]
        fields = {k: v for k, v in (custom.get("config") or {}).items() if not RUNTIME_SETTING.search(k)}
        return {"class": custom.get("class"), **fields}
    return {k: config_json.get(k) for k in keys}


def _data_change(key: str, saved_run: dict, run_config: dict) -> str:
    """One changed data setting, said as the user can act on it: the files whose contents differ."""
    if key != "data_identity":
        return f"--{key}: {saved_run.get(key)!r} -> {run_config.get(key)!r}"
    then = (saved_run.get("data_contents") or {}).get("files") or []
    now = (run_config.get("data_contents") or {}).get("files") or []
    names = sorted(run_config.get("data_file_hashes") or {})
    if then and now and len(then) == len(now):
        differ = [names[i] if i < len(names) else f"file {i + 1}" for i, (a, b) in enumerate(zip(then, now)) if a != b]
        if differ:
            return f"the data's contents (edited since: {', '.join(differ)})"
    if then and now and len(then) != len(now):
        return f"the data's contents ({len(then)} files then, {len(now)} now)"
    then_files, now_files = saved_run.get("data_file_hashes") or {}, run_config.get("data_file_hashes") or {}
    edited = sorted(f for f in set(then_files) & set(now_files) if then_files[f] != now_files[f])
    if edited:
        return f"the data's contents (edited since: {', '.join(edited)})"
    return "the data's contents (other files, another tokenizer, or other prepared shards)"


def _effective(key: str, config: dict):
    """A data setting's value as the run applies it: raw data without --tokenizer_name is tokenised
    'byte' (format-1 runs recorded that default by name, later ones as None)."""
    value = config.get(key)
    if key == "tokenizer_name" and value is None and not (config.get("prepared_data") or config.get("data_mix")):
        return "byte"
    return value


def refuse_incompatible(folder: Path, plan: ModelPlan, run_config: dict, legacy_identity: str | None = None) -> None:
    """Refuse a checkpoint this run cannot continue: another architecture (the config keys that shape
    the weights), or other data under a saved data position.

    Raises:
        CheckpointError: naming the keys, their values, and what to do instead.
    """
    current = plan.config_json()
    saved = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else current
    keys = getattr(plan.config, "architecture_keys", None) or ARCHITECTURE_KEYS
    now, then = _architecture(current, keys), _architecture(saved, keys)
    diffs = [f"{k}: checkpoint {then.get(k)!r} vs this run {now.get(k)!r}" for k in sorted(set(now) | set(then))
             if then.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(
            f"{folder}: the model architecture differs from this run ({'; '.join(diffs)}). "
            f"To start from its weights anyway, pass --init_from {folder} (weights only, non-strict) "
            "instead of --resume_from_checkpoint")
    saved_run = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
    refuse_other_adapters(folder, saved_run, run_config)
    if saved_run.get("data_identity_version", 1) >= DATA_IDENTITY_VERSION:
        # The data by contents alone: the same bytes at another path are the same data.
        keys = [k for k in DATA_KEYS if k not in PATH_KEYS]
        now_identity = run_config.get("data_identity")
    else:  # a checkpoint of an older version recorded paths in its identity: compare it the old way
        keys, now_identity = list(DATA_KEYS), legacy_identity or run_config.get("data_identity")
    changed = []
    for k in keys:
        if k not in saved_run:
            continue
        now = now_identity if k == "data_identity" else _effective(k, run_config)
        if _effective(k, saved_run) != now:
            changed.append(_data_change(k, saved_run, run_config))
    if changed and not run_config.get("reset_data_position"):
        raise CheckpointError(
            f"{folder}: the data differs from the checkpoint's ({'; '.join(changed)}) and its data position counts "
            "samples of the old data, so resuming there would repeat or skip samples. Resume with the "
            "checkpoint's values, or pass --reset_data_position to keep weights, optimizer and counters and "
            "start this data from its beginning")


# The LoRA flags that shape the adapters' tensors (--lora_alpha and --lora_dropout do not).
LORA_SHAPE_KEYS = ("lora_r", "lora_target_modules")


def refuse_other_adapters(folder: Path, saved_run: dict, run_config: dict) -> None:
    """A LoRA checkpoint resumes only as LoRA, with adapters of the same shape (and a full model's
    only without LoRA); the base itself is compared by content once it is loaded
    (:func:`check_lora_base`).

    Raises:
        CheckpointError: naming the flags and what to do.
    """
    then, now = saved_run.get("lora_r"), run_config.get("lora_r")
    if then is not None and now is None:
        raise CheckpointError(f"{folder}: holds LoRA adapters (--lora_r {then}) on the base "
                              f"{saved_run.get('model_name_or_path')!r}; resume with the same --lora_r and "
                              "--model_name_or_path")
    if then is None and now is not None:
        raise CheckpointError(f"{folder}: holds a whole model, not LoRA adapters; drop --lora_r to resume it, or "
                              f"start LoRA on its weights: export it (accel-trainer export {folder} DIR) and pass "
                              "--model_name_or_path DIR in a new --output_dir")
    diffs = [f"--{k}: checkpoint {saved_run.get(k)!r} vs this run {run_config.get(k)!r}" for k in LORA_SHAPE_KEYS
             if then is not None and saved_run.get(k) != run_config.get(k)]
    if diffs:
        raise CheckpointError(f"{folder}: its LoRA adapters have another shape ({'; '.join(diffs)}); resume with the "
                              "checkpoint's values")


def check_lora_base(folder: Path, record: dict) -> None:
    """After the base is loaded: refuse a resume whose base is not the one the adapters were
    trained on (compared by the digest of its tensors, not by path).

    Raises:
        CheckpointError: naming the base's paths and both digests.
    """
    from .models import LORA_KEY, check_same_base

    saved = read_json(folder / RUN_CONFIG).get(LORA_KEY) if (folder / RUN_CONFIG).is_file() else None
    if saved is not None:
        check_same_base(saved, record["base"]["content_xxh3_128"], record["base"]["path"], str(folder))


def resume_policy(plan: ModelPlan, run_config: dict, print_fn=print, legacy_identity: str | None = None):
    """What a run checks of the checkpoint it resumes, once, before any data work:
    :func:`refuse_incompatible`, then a printed list of the settings that changed (the new values apply).
    Also usable as a Checkpointer's ``before_resume``."""

    def check(folder: Path) -> None:
        refuse_incompatible(folder, plan, run_config, legacy_identity)
        saved_run = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
        same_data = saved_run.get("data_identity") == run_config.get("data_identity")
        changes = [f"{k}: {saved_run.get(k)!r} -> {v!r}" for k, v in run_config.items()
                   if k not in QUIET_KEYS and k in saved_run and saved_run.get(k) != v
                   and not (same_data and k in PATH_KEYS)]  # the same data at another path: not a change
        if changes:
            print_fn("resuming with changed settings (the new values apply):\n  " + "\n  ".join(changes))

    return check


def import_for_resume(spec: str, accelerator, plan: ModelPlan, model_args, train_args) -> str:
    """``--resume_from_checkpoint OLD.pt``: import the file into ``--output_dir`` as ``step-N`` and
    return what to resume. Resubmitting the same command continues from ``latest`` (the file is
    imported once); a folder holding another run's checkpoints is refused.

    Raises:
        CheckpointError: the file cannot be imported (naming why), or the folder holds another run.
    """
    from .checkpoint import hash_file, list_checkpoints
    from .importing import import_into, read_old_checkpoint

    root = Path(train_args.output_dir) / "checkpoints"
    existing = list_checkpoints(root) if root.is_dir() else []
    digest = hash_file(spec)
    for _, step_folder in reversed(existing):
        imported = (read_json(step_folder / RUN_CONFIG).get("imported_from") or {}) \
            if (step_folder / RUN_CONFIG).is_file() else {}
        if imported.get("xxh3_128") == digest:
            accelerator.print(f"--resume_from_checkpoint {spec}: already imported into {root} (as "
                              f"{step_folder.name}); continuing from latest")
            return "latest"
    if existing:
        raise CheckpointError(f"--resume_from_checkpoint {spec}: --output_dir={train_args.output_dir!r} holds the "
                              "checkpoints of another run; import into a new --output_dir")
    old = read_old_checkpoint(spec, tuple(train_args.trust_pickled_class or ()))
    folder = import_into(old, accelerator, plan, train_args.output_dir, to_dict(model_args), digest=digest,
                         muon_params=tuple(model_args.muon_params or ()),
                         adamw_params=tuple(model_args.adamw_params or ()),
                         reset_optimizer=train_args.reset_optimizer, print_fn=accelerator.print)
    return str(folder)


def adopt_optimizer_assignment(folder: Path, model_args, run_config: dict, print_fn=print):
    """A resume continues with the checkpoint's ``--muon_params``/``--adamw_params`` when none are
    given (the optimizer state is kept per optimizer: an imported Adam run stays on AdamW)."""
    if model_args.muon_params or model_args.adamw_params or not (folder / RUN_CONFIG).is_file():
        return model_args
    saved = read_json(folder / RUN_CONFIG)
    muon, adamw = saved.get("muon_params"), saved.get("adamw_params")
    if not (muon or adamw):
        return model_args
    print_fn(f"--muon_params/--adamw_params: the checkpoint's ({muon or []} / {adamw or []})")
    run_config.update(muon_params=muon, adamw_params=adamw)
    return dataclasses.replace(model_args, muon_params=muon, adamw_params=adamw)


def say_damaged_optimizer(folder: Path, print_fn=print) -> None:
    """Under --reset_optimizer, name the optimizer files of ``folder`` that do not verify (the resume
    goes on without them)."""
    files = read_json(folder / MANIFEST)["files"]
    problems = verify(folder, checksums={name for name in files if is_optimizer_file(name)})
    if problems:
        print_fn(f"WARNING: {folder}: its optimizer state is damaged ({'; '.join(problems[:3])}); --reset_optimizer "
                 "resumes its weights, counters and data position with a fresh optimizer")


def keep_abandoned_branch_aside(folder: Path, output_dir: str | Path, print_fn=print) -> Path | None:
    """Resuming an older step of this run (``step-K`` with newer checkpoints beside it) starts a new
    branch whose saves would replace the newer ``step-N`` folders: they are moved, whole, into
    ``<output_dir>/branches/abandoned-<time>/`` first (``accel-trainer list`` shows them there), and
    ``latest``/``best`` are pointed at what ``checkpoints/`` still holds. Main process only.

    Returns:
        The folder the newer checkpoints went to, or None when there were none.
    """
    import datetime
    import shutil

    from .checkpoint import MANIFEST, list_checkpoints, write_pointer

    root = Path(output_dir) / "checkpoints"
    try:
        if folder.resolve().parent != root.resolve():
            return None  # another run's checkpoint, or a file: nothing of this folder to set aside
        step = int(folder.name.split("-", 1)[1])
    except (ValueError, IndexError, OSError):
        return None
    newer = [f for s, f in list_checkpoints(root) if s > step]
    if not newer:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = Path(output_dir) / "branches" / f"abandoned-{stamp}"
    aside.mkdir(parents=True)
    for f in newer:
        shutil.move(str(f), str(aside / f.name))
    write_pointer(root, "latest", folder)
    best, best_value = None, None
    for _, f in list_checkpoints(root):  # best over what the folder holds now
        manifest = read_json(f / MANIFEST) if (f / MANIFEST).is_file() else {}
        value = (manifest.get("metrics") or {}).get("val_loss")
        if value is not None and (best_value is None or value < best_value):
            best, best_value = f, value
    if best is not None:
        write_pointer(root, "best", best)
    else:
        (root / "best").unlink(missing_ok=True)
    print_fn(f"--resume_from_checkpoint {folder.name}: the newer checkpoints of this run "
             f"({', '.join(f.name for f in newer)}) are kept aside in {aside}; this run continues from {folder.name}")
    return aside


def one_run_per_output_dir(output_dir: str | Path, overwrite: bool, print_fn=print) -> None:
    """A fresh start (no ``--resume_from_checkpoint``) in a folder that holds another run's
    checkpoints would replace its ``step-N`` folders and mix both runs in ``metrics.jsonl``: refused,
    unless ``--overwrite_output_dir`` (then that run is moved aside, never deleted).

    Raises:
        ConfigError: naming the folder and the two ways on.
    """
    import datetime
    import shutil

    from .checkpoint import list_checkpoints

    root = Path(output_dir) / "checkpoints"
    held = list_checkpoints(root) if root.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise ConfigError(f"--output_dir={str(output_dir)!r} holds the checkpoints of a run (newest "
                          f"{held[-1][1].name}); continue it with --resume_from_checkpoint latest, or start over "
                          "with --overwrite_output_dir (that run is moved aside), or choose a new --output_dir")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = Path(output_dir) / f"overwritten-{stamp}"
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "eval"):
        if (Path(output_dir) / name).exists():
            shutil.move(str(Path(output_dir) / name), str(aside / name))
    print_fn(f"--overwrite_output_dir: the previous run's checkpoints and metrics are in {aside}")


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


def apply_memory_and_speed_features(model, plan: ModelPlan, args: TrainingArguments, accelerator) -> None:
    """--gradient_checkpointing and --torch_compile, on the decoder layers (each compiled on its own)."""
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model, plan.layer_classes)
    if args.torch_compile:
        if plan.family.prepare_compile is not None:  # e.g. our MoE chooses its experts' kernel before tracing
            plan.family.prepare_compile(accelerator.device,
                                        torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32)
        n = compile_decoder_layers(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode,
                                   layer_classes=plan.layer_classes)
        accelerator.print(f"--torch_compile: {n} decoder layers compiled one by one ({args.torch_compile_backend}); "
                          "the first steps include the compilation")


def run(presets: dict[str, dict] | None, model_args: ModelArguments, data_args: DataArguments,
        train_args: TrainingArguments, defaults: dict | None = None, *, model_factory=None,
        model_config=None) -> Trainer:
    """Build everything and train; returns the trainer (for tests and notebooks).

    Args:
        presets: a recipe's own preset table (None: the registered families' presets).
        defaults: per preset, training defaults the recipe sets (e.g. ``{"tiny": {"block_size": 128}}``).
        model_factory: your own module (``model_factory(model_config)`` builds it); see
            ``examples/custom_model.py``.
        model_config: its config (a dataclass or a dict of plain JSON values).
    """
    if model_args.model_name_or_path:
        load_auto_config("model_name_or_path", model_args.model_name_or_path)  # before its tokenizer is read
        if not (data_args.tokenizer_name or data_args.prepared_data or data_args.data_mix):
            data_args = dataclasses.replace(data_args, tokenizer_name=model_args.model_name_or_path)  # the model's own
    if model_factory is None and not model_args.hugging_face and model_args.preset is None:
        model_args = dataclasses.replace(model_args, preset="tiny")  # recorded as it ran
    # What can be checked without data or a model is checked before any work.
    if train_args.eval_tasks:  # lm-eval installed, every task known
        from .evaluation import check_tasks, require_task_data, task_manager

        manager = task_manager(train_args.eval_include_path)
        check_tasks(train_args.eval_task_names, manager)
        require_task_data(train_args.eval_task_names, manager)
    check_fine_tuning(model_args, data_args)
    tokenizer = run_tokenizer(data_args)
    plan = plan_model(model_args, tokenizer, presets, model_factory, model_config)
    block_size = block_size_for(plan, data_args, model_args.preset, defaults)
    accelerator = build_accelerator(train_args)
    # The precision that runs (the launcher's, unless the flag says), so run_config and resumes record it.
    train_args = dataclasses.replace(train_args, mixed_precision=str(accelerator.mixed_precision))
    # The one owner of the mesh's sizes, checked against the model's family before any work.
    dims = ParallelDims.from_run(train_args.expert_parallel_size, accelerator.num_processes,
                                 getattr(accelerator, "parallelism_config", None), plan.family)
    if model_args.lora:
        refuse_sharded_lora(accelerator, dims)
    check_shared_output_dir(accelerator, train_args.output_dir)  # before the lock: rank 0's lock is on its disk
    lock = lock_run_dir(accelerator, train_args.output_dir)  # one run per output dir
    try:
        if not train_args.resume_from_checkpoint:  # the main process decides; a refusal reaches every rank
            main_process_first(accelerator, lambda: one_run_per_output_dir(
                train_args.output_dir, train_args.overwrite_output_dir, accelerator.print))
    except InputError:
        if lock is not None:
            lock.release()
        raise
    try:
        return _run(accelerator, plan, dims, block_size, model_args, data_args, train_args)
    finally:
        if lock is not None:
            lock.release()


def refuse_sharded_lora(accelerator, dims: ParallelDims) -> None:
    """LoRA runs on one process or under DDP: every rank holds the (small) adapters whole.

    Raises:
        ConfigError: under FSDP, DeepSpeed or expert parallelism, naming the launch.
    """
    from accelerate.utils import DistributedType

    if dims.ep > 1 or accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                           DistributedType.MULTI_GPU):
        raise ConfigError(f"--lora_r: LoRA runs on one process or under DDP here (this launch: "
                          f"{accelerator.distributed_type}, --expert_parallel_size {dims.ep}); launch without "
                          "FSDP/DeepSpeed or expert parallelism (the adapters are small: every rank holds them whole)")


def check_fine_tuning(model_args: ModelArguments, data_args: DataArguments) -> None:
    """What LoRA and chat data need, checked before any work.

    Raises:
        ConfigError: naming the flag and what to do.
    """
    if model_args.lora:
        from .models import quantization_config, require_peft

        require_peft()
        if model_args.load_in_4bit:
            quantization_config("cuda" if torch.cuda.is_available() else "cpu")
        if model_args.vocab_size is not None:
            raise ConfigError(f"--vocab_size={model_args.vocab_size} with --lora_r: new embedding rows would be "
                              "frozen at random values (LoRA trains adapters only); leave --vocab_size out")
    if data_args.chat_data and not model_args.hugging_face:
        raise ConfigError("--chat_data: chat fine-tuning trains a transformers model (--model_name_or_path, with its "
                          "tokenizer's chat template); recipes/causal_lm.py takes it")


def build_model(plan: ModelPlan, model_args: ModelArguments, train_args: TrainingArguments, accelerator,
                dims: ParallelDims | None = None):
    """The model, its parameter counts, the optimizer assignment (each said once), and the
    :class:`~accel_trainer.parallel.ParallelPlan` applied to it."""
    model = plan.build()
    counts = count_parameters_of(model, plan.shape)
    lora = None
    if model_args.lora:  # before the parallel plan and the optimizers: they see the adapters
        from .models import apply_lora, lora_config

        model, lora = apply_lora(model, lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                                                    model_args.lora_target_modules), model_args.model_name_or_path)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        accelerator.print(f"--lora_r {model_args.lora_r}: {trainable / 1e6:.3f}M adapter parameters "
                          f"({100 * trainable / max(counts['total'], 1):.2f}% of the base) on the frozen base; "
                          "checkpoints hold the adapters only")
    experts = f" ({counts['active'] / 1e6:.2f}M active per token)" if counts["active"] != counts["total"] else ""
    accelerator.print(f"model: {plan.name}, {counts['total'] / 1e6:.2f}M parameters{experts}")
    for note in plan.notes:
        accelerator.print(f"model: {note}")
    if plan.source != "preset" and plan.shape.num_experts:  # which kernel transformers chose for this model
        kernel = getattr(getattr(model, "config", None), "_experts_implementation", None) or "eager"
        accelerator.print(f"model: experts: {plan.shape.num_experts} per layer, {plan.shape.experts_per_token} per "
                          f"token, run as {kernel} (--experts_implementation to change)")
    if plan.load_report is not None:
        accelerator.print(f"--model_name_or_path {model_args.model_name_or_path}: {plan.load_report}")
    if train_args.init_from:
        report = load_weights(model, train_args.init_from, strict=model_args.strict)
        accelerator.print(f"--init_from {train_args.init_from}: {report}")
        left = report.left_as_initialised
        if Path(train_args.init_from).is_file() and (not report.loaded or left):
            # Another trainer's file that does not fill this model would train from random weights.
            raise ConfigError(f"--init_from {train_args.init_from}: {len(report.loaded)} of its tensors fit "
                              f"{plan.name} and {len(left)} of the model's are not in it ({', '.join(left[:3])}); "
                              "give the model flags of the file's model (or a model_factory)")
    dims = dims or ParallelDims(accelerator.num_processes)
    parallel = dims.plan(plan.family, accelerator.device.type)
    parallel.apply(model)  # before the optimizers: they must see the laid-out parameters
    if parallel.describe():
        accelerator.print(f"model: {parallel.describe()}")
    adamw = model_args.adamw_params or ()
    if lora is not None and not (model_args.muon_params or adamw):
        adamw = (r"\.lora_",)  # adapters train with AdamW (what LoRA is tuned for; --muon_params to change)
    try:
        frozen = freeze_parameters(model, model_args.freeze_params or ())
        assignments = assign_parameters(model, model_args.muon_params or (), adamw, rule=plan.family.parameter_rule)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    accelerator.print("optimizers (--muon_params/--adamw_params/--freeze_params change this):\n"
                      + assignment_table(assignments + frozen))
    return model, counts, assignments, parallel, lora


def check_packed_attention(model) -> None:
    """``--packing`` needs a model whose attention stays inside each packed sequence when
    ``position_ids`` restart (transformers builds that mask from them for sdpa, eager and flex;
    flash-attention reads them itself). Asked of the model itself: two sequences of 4 tokens
    packed into one row must give the logits each gives alone.

    Raises:
        ConfigError: the model lets attention cross, naming its class.
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    vocab = getattr(getattr(inner, "config", None), "vocab_size", 2) or 2
    ids = torch.arange(8).remainder(vocab).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            # use_cache=False as in training: with a cache transformers does not read packed positions
            packed = logits_of(model(input_ids=ids.to(device), position_ids=positions.to(device),
                                     use_cache=False)).float()
            alone = logits_of(model(input_ids=ids[:, 4:].to(device), use_cache=False)).float()
    finally:
        model.train(was_training)
    if not torch.allclose(packed[:, 4:], alone, atol=1e-4, rtol=1e-3):
        raise ConfigError(f"--packing: {type(inner).__name__} lets attention cross from one packed conversation into "
                          "the next (its attention does not follow restarting position_ids); drop --packing (each "
                          "conversation then has a row of its own)")


def _run(accelerator, plan: ModelPlan, dims: ParallelDims, block_size: int, model_args, data_args,
         train_args) -> Trainer:
    # data_identity: the data by content (an edited file under the same name is other data).
    run_config = {**to_dict(model_args, data_args, train_args), "block_size": block_size,
                  "data_identity": data_identity(data_args), "data_identity_version": DATA_IDENTITY_VERSION,
                  "data_contents": data_contents(data_args), "data_file_hashes": file_hashes(data_args),
                  # samples per optimizer step over all processes: a resume on another world size says so
                  "global_batch_size": train_args.per_device_train_batch_size
                  * train_args.gradient_accumulation_steps * accelerator.num_processes}
    spec = train_args.resume_from_checkpoint
    # A storage URL that cannot work (no s3fs installed, an unknown scheme) is reported before tokenising.
    try:
        remote = (remote_tier(train_args.checkpoint_upload_to, train_args.parsed_storage_options)
                  if train_args.checkpoint_upload_to else None)
    except CheckpointError as err:
        raise ConfigError(f"--checkpoint_upload_to: {err}") from None
    folder = None
    if is_single_file_checkpoint(spec):  # another trainer's .pt: imported as step-N, then resumed like ours
        spec = import_for_resume(spec, accelerator, plan, model_args, train_args)
    if spec:  # resolved and checked once, before tokenising; the resume loads this folder
        # --reset_optimizer reads no optimizer state: a checkpoint whose optimizer files are damaged
        # still gives its weights, counters and data position (said loudly below). The tensor files'
        # checksums are compared as the resume reads them (one pass; a damaged one falls back then).
        folder = resolve_on_main(accelerator, spec, train_args.output_dir, remote=remote,
                                 checksums=for_resume(reset_optimizer=train_args.reset_optimizer))
        if folder is not None and train_args.reset_optimizer and accelerator.is_main_process:
            say_damaged_optimizer(Path(folder), accelerator.print)
        if folder is not None:
            resume_policy(plan, run_config, accelerator.print, legacy_data_identity(data_args))(folder)
            if accelerator.is_main_process:
                keep_abandoned_branch_aside(Path(folder), train_args.output_dir, accelerator.print)
            accelerator.wait_for_everyone()
            model_args = adopt_optimizer_assignment(folder, model_args, run_config, accelerator.print)
    # Only now: a command refused above leaves the status of the run that ended here as it was.
    write_exit_status(train_args.output_dir, None, "running")
    data = main_process_first(accelerator, lambda: build_datasets(
        data_args, train_args.seed, train_args.output_dir, block_size, progress=accelerator.is_main_process))
    model, counts, assignments, parallel, lora = build_model(plan, model_args, train_args, accelerator, dims)
    run_config["optimizer_assignment"] = assignment_summary(assignments)
    if lora is not None:
        from .models import LORA_KEY

        run_config[LORA_KEY] = lora
        if folder is not None:
            check_lora_base(Path(folder), lora)
    if data_args.packing:
        check_packed_attention(model)
    try:
        apply_memory_and_speed_features(model, plan, train_args, accelerator)
    except ValueError as err:  # a model without decoder layers to recompute or compile
        raise ConfigError(str(err)) from None
    optimizers = build_optimizers(model, OptimizerSettings(
        muon_lr=train_args.muon_learning_rate, adamw_lr=train_args.learning_rate,
        weight_decay=train_args.weight_decay, muon_weight_decay=train_args.muon_weight_decay,
        adam_beta1=train_args.adam_beta1,
        adam_beta2=train_args.adam_beta2, adam_epsilon=train_args.adam_epsilon), assignments)
    shape = plan.shape
    trainer = Trainer(accelerator, model, optimizers, data, train_args, run_config=run_config,
                      flops_per_token=flops_per_token(counts["active"], shape.num_layers or 0, shape.num_heads or 0,
                                                      shape.head_dim or 0, block_size),
                      model_config=None if plan.source != "custom" else plan.config_json(),
                      experts_per_token=shape.experts_per_token, parallel=parallel,
                      store_frozen=lora is None)  # LoRA: the base is named by path and content, not stored
    if spec:
        trainer.resume(spec, reset_optimizer=train_args.reset_optimizer,
                       reset_data_position=train_args.reset_data_position, folder=folder)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None, *, model_factory=None, model_config=None, presets: dict | None = None,
         defaults: dict | None = None) -> int:
    """A whole recipe: parse the flags, train, and return the exit status (see :mod:`.process`).

    With ``model_factory`` and ``model_config``, the trainer builds your own module
    (``model_factory(model_config)``); see ``examples/custom_model.py``.
    """
    from .config import parse_args
    from .process import exit_code_of

    model_args, data_args, train_args = parse_args((ModelArguments, DataArguments, TrainingArguments), argv)
    return exit_code_of(lambda: run(presets, model_args, data_args, train_args, defaults, model_factory=model_factory,
                                    model_config=model_config), output_dir=train_args.output_dir)

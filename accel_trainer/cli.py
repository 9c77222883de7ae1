"""``accel-trainer``: see into checkpoints and act on them from the shell.

    accel-trainer list    <output_dir>                 every checkpoint, which is latest/best
    accel-trainer inspect <ckpt> [--json]              what is inside one checkpoint
    accel-trainer verify  <ckpt|output_dir>            completeness + checksums; exit 0 only if valid
    accel-trainer diff    <ckptA> <ckptB> [--top N]    config, architecture and weight changes
    accel-trainer export  <ckpt> <out_dir> [--dtype bf16] [--format qwen2_moe|accel_moe]   HF model folder
    accel-trainer prune   <output_dir> --keep K [--keep_every_n_steps N] [--dry_run]
    accel-trainer plot    <output_dir> [--out loss.png]   loss and LR curves from metrics.jsonl
    accel-trainer params  <config.json|model dir|ckpt> total/active parameters, the optimizer assignment
    accel-trainer eval    <ckpt|run|export> --tasks hellaswag,arc_easy [--limit N]   lm-evaluation-harness
    accel-trainer plan    --preset 18b --num_gpus 64 [--gradient_checkpointing] ...   per-GPU memory, checkpoint cost
    accel-trainer train-tokenizer --data_files ... --vocab_size 32768 --output_dir tok/   byte-level BPE
    accel-trainer train-tokenizer --alphabet ACDEFGHIKLMNPQRSTVWY --output_dir tok/   one id per character
    accel-trainer prepare-data --data_files ... --tokenizer_name tok/ --output_dir data/x   token shards
    accel-trainer import  OLD.pt --output_dir RUN [--preset|--config_name|--model_name_or_path ...]   bring a run
    accel-trainer env                                  versions and devices

<ckpt> is a step-N folder, a run's output dir (its latest), or <output_dir>/best|latest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError, InputError  # the one family of bad-input errors (light: no torch)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _checkpoint(path: str, checksums=False) -> Path:
    from .checkpoint import checkpoint_folder

    return checkpoint_folder(path, checksums=checksums)


def _storage_options(args) -> dict:
    """``--storage_options`` of the verbs that take one, parsed once for the verb."""
    from .checkpoint import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def cmd_list(args) -> int:
    from .checkpoint import list_run, storage_for

    rows = list_run(args.output_dir, args.storage_options_dict)
    code = _print_rows(rows, args.json, storage_for(args.output_dir, args.storage_options_dict).display())
    branches = Path(args.output_dir) / "branches"
    if not args.json and branches.is_dir():  # kept aside when an older step was resumed
        for branch in sorted(p for p in branches.iterdir() if p.is_dir()):
            steps = sorted((p.name for p in branch.glob("step-*")), key=lambda n: int(n[5:]))
            print(f"abandoned branch {branch}: {', '.join(steps) or 'empty'}")
    return code


def _print_rows(rows: list[dict], as_json: bool, where: str) -> int:
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints under {where}")
        return 0
    print(f"{'checkpoint':<14}{'epoch':>6}{'tokens':>14}{'val_loss':>10}{'size':>11}  tags")
    for r in rows:
        m = r["metrics"]
        val = "" if m.get("val_loss") is None else f"{m['val_loss']:.4f}"
        tags = ", ".join(r["tags"]) + ("" if r["complete"] else " INCOMPLETE")
        if r["problem"]:
            tags += f" UNREADABLE ({r['problem']})"
        print(f"{r['name']:<14}{_cell(r['epoch']):>6}{_cell(m.get('tokens_seen'), ','):>14}{val:>10}"
              f"{_fmt_bytes(r['size_bytes']):>11}  {tags.strip()}")
    return 0


def _cell(value, fmt: str = "") -> str:
    return "" if value is None else format(value, fmt)


def _parameter_line(info: dict) -> str:
    """Total (and, for a mixture of experts, active per token) parameters."""
    kind, counts = (info["model_config"] or {}).get("model_type", "unknown"), info["parameters"]
    if counts is None:
        return f"{kind}: no model weights in this checkpoint"
    active = f" ({counts['active']:,} active per token)" if "active" in counts else ""
    sharded = ", sharded (DCP: FSDP2 or expert parallel) weights" if info.get("sharded_weights") else ""
    lora = (info.get("run_config") or {}).get("lora")
    if lora:  # the weights are adapters; the base is named, not stored
        base = lora.get("base") or {}
        r = (lora.get("peft_config") or {}).get("r")
        return (f"{kind}: LoRA adapters (r={r}), {counts['total']:,} parameters, on the base {base.get('path')!r} "
                f"(content {base.get('content_xxh3_128')}, not stored here)")
    return f"{kind}: {counts['total']:,} parameters{active}{sharded}"


def cmd_inspect(args) -> int:
    from .checkpoint import fetch, inspect, is_url

    local = fetch(args.checkpoint, args.storage_options_dict) if is_url(args.checkpoint) else None
    info = inspect(local or _checkpoint(args.checkpoint))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    env, metrics, position = info["environment"], info["metrics"], info["data_position"] or {}
    trainer = info["states"].get("trainer_state") or {}
    print(f"checkpoint   {info['path']}  (format {info['format_version']}, saved because: "
          f"{', '.join(info['saved_because'])})")
    if info.get("weights_only"):
        print(f"progress     step {info['step']}, {_cell(metrics.get('tokens_seen'), ',')} tokens; weights-only "
              f"(--full_state_total_limit dropped {', '.join(info['weights_only'].get('dropped', []))}): resumes "
              "only with --reset_optimizer")
    else:
        print(f"progress     step {info['step']}, epoch {_cell(position.get('epoch'))} "
              f"(+{_cell(position.get('samples_in_epoch'))} samples), {_cell(metrics.get('tokens_seen'), ',')} tokens")
    best = info["best"] or {}
    print(f"losses       ema {_cell(trainer.get('ema_loss'), '.4f')}, best {best.get('metric', 'val_loss')} "
          f"{_cell(best.get('value'), '.4f')} at step {_cell(best.get('step'))}")
    print(f"metrics      {json.dumps(metrics)}")
    print(f"model        {_parameter_line(info)}")
    print(f"saved on     {env.get('world_size')} process(es), {env.get('distributed_type')}, mixed precision "
          f"{env.get('mixed_precision')}, {env.get('device_type')}; torch {env.get('torch')}, "
          f"accelerate {env.get('accelerate')}, accel_trainer {env.get('accel_trainer')}")
    for opt in info["optimizers"]:
        hyper = ", ".join(f"{k}={v}" for k, v in opt["hyperparameters"].items() if k in ("lr", "initial_lr",
                                                                                        "weight_decay", "betas",
                                                                                        "momentum"))
        print(f"optimizer    {opt['optimizer']}: {opt['parameters']} tensors, state {_fmt_bytes(opt['state_bytes'])}"
              f" ({hyper})")
    for name, s in info["schedulers"].items():
        print(f"scheduler    {name}: step {s['last_epoch']}, base lr {s['base_lrs']}, current lr {s['last_lr']}")
    print(f"grad scaler  {'saved' if info['grad_scaler'] else 'none (not an fp16 run)'}")
    print(f"files        {_fmt_bytes(info['total_bytes'])} in {len(info['files'])} files:")
    for name, f in info["files"].items():
        print(f"  {name:<28}{_fmt_bytes(f['size']):>11}  {f['role']}")
    return 0


def cmd_verify(args) -> int:
    from .checkpoint import verify_run

    results = verify_run(args.path, args.storage_options_dict)
    for where, problems in results:
        print(f"{'OK ' if not problems else 'BAD'} {where}")
        for problem in problems:
            print(f"    {problem}")
    return 1 if any(problems for _, problems in results) else 0


def cmd_diff(args) -> int:
    from .checkpoint import diff

    a, b = _checkpoint(args.a), _checkpoint(args.b)
    result = diff(a, b)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"A = {a}\nB = {b}")
    print("run config:" + ("".join(f"\n  {d}" for d in result["run_config"]) or " same"))
    print("model config:" + ("".join(f"\n  {d}" for d in result["model_config"]) or " same"))
    arch = result["only_in_a"] + result["only_in_b"] + result["shape_changes"]
    print("architecture:" + (" same tensors and shapes" if not arch else ""))
    for k in result["only_in_a"]:
        print(f"  only in A: {k}")
    for k in result["only_in_b"]:
        print(f"  only in B: {k}")
    for s in result["shape_changes"]:
        print(f"  shape: {s}")
    changes = result["tensor_changes"]
    print(f"weight changes (||B-A||, relative to ||A||), largest {min(args.top, len(changes))} of {len(changes)}:")
    for c in changes[: args.top]:
        print(f"  {c['tensor']:<50}{c['change_norm']:>12.4e}{c['relative']:>12.4e}")
    return 0


def cmd_export(args) -> int:
    import torch

    from . import load_model_for_inference
    from .console import quiet_library_bars
    from .export import ensure_new_folder, export_model
    from .models import family_of_model, is_lora, merged, save_adapter

    from .checkpoint import CUSTOM_MODEL, MODEL_CONFIG, read_json

    out = Path(args.out_dir)
    try:
        ensure_new_folder(out)  # before the (possibly long) load
    except FileExistsError as err:
        raise ConfigError(str(err)) from None
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    folder = _checkpoint(args.checkpoint)
    saved = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else {}
    if saved.get("model_type") == CUSTOM_MODEL:
        cls = (saved.get(CUSTOM_MODEL) or {}).get("class", "?").rpartition(":")[2]
        raise ConfigError(f"{folder}: holds your own module ({cls}), not a transformers model, so there is no Hugging "
                          f"Face folder to write; load it with load_model_for_inference(path, model_class={cls}) "
                          "(its weights are model.safetensors there)")
    quiet_library_bars("transformers")
    model, config, step = load_model_for_inference(folder, device="cpu", dtype=dtypes[args.dtype])
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    if is_lora(model) and not args.merge_lora:  # PEFT's own folder: PeftModel.from_pretrained(base, out)
        if args.format:
            raise ConfigError(f"--format={args.format}: a LoRA checkpoint exports as PEFT's adapter folder; add "
                              "--merge_lora to write the merged model in a format")
        files = save_adapter(model, out, tokenizer)
        base = model.peft_config["default"].base_model_name_or_path
        print(f"exported the LoRA adapters of step {step} ({args.dtype}) to {out}: {', '.join(files)}")
        print(f"load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r}); "
              "or --merge_lora for one merged model folder")
        return 0
    if args.merge_lora:
        if not is_lora(model):
            raise ConfigError(f"--merge_lora: {folder} holds a whole model, not LoRA adapters; leave the flag out")
        model = merged(model)
    try:
        files = export_model(model, out, args.format, tokenizer=tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    family = family_of_model(model)
    args.format = args.format or family.default_format
    print(f"exported step {step} ({args.format}, {args.dtype}) to {out}: {', '.join(files)}")
    hint = family.load_hint if args.format == family.name else ""  # the family's own class: registered first
    print(f"load with: {hint}AutoModelForCausalLM.from_pretrained({str(out)!r})"
          + (f" and AutoTokenizer.from_pretrained({str(out)!r})" if tokenizer is not None else ""))
    return 0


def _model_folder(path: str, storage_options: dict) -> Path:
    """The folder a model is read from: a checkpoint (``path`` a step-N folder, a run dir meaning its
    latest, ``<run>/best``, or ``s3://...``, downloaded to the cache), or a plain model folder (an export)."""
    from .checkpoint import CheckpointError, checkpoint_folder, fetch, is_url

    if is_url(path):
        return fetch(path, storage_options)
    try:
        return checkpoint_folder(path, checksums=True)
    except CheckpointError:
        if (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file():
            return Path(path)  # a model folder, or PEFT's adapter folder (an export of a LoRA run)
        raise


def cmd_eval(args) -> int:
    from .console import quiet_library_bars
    from .evaluation import (check_tasks, log_to_tensorboard, require_task_data, run_tasks, scalars, table,
                             task_manager, write_results)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name (e.g. --tasks hellaswag,arc_easy)")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError(f"--limit={args.limit}: must be > 0 (a count, or a fraction below 1)")
    manager = task_manager(args.include_path)  # a missing lm-eval or an unknown task fails before the load
    check_tasks(tasks, manager)
    folder = _model_folder(args.path, args.storage_options_dict)
    require_task_data(tasks, manager)
    quiet_library_bars("transformers")
    from transformers import AutoTokenizer

    from . import load_model_for_inference

    model, _, step = load_model_for_inference(folder, device=args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: no tokenizer saved there ({str(err).splitlines()[0][:200]})") from None
    results = run_tasks(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, device=args.device, manager=manager)
    print(table(results))
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    if run_dir is not None:
        path = write_results(run_dir, step, tasks, results)
        board = log_to_tensorboard(run_dir, step, scalars(results))
        print(f"wrote {path}" + (f"; TensorBoard {board} at step {step}" if board else ""))
    return 0


def cmd_prune(args) -> int:
    from .checkpoint import prune

    if args.keep < 1:
        raise ConfigError(f"--keep={args.keep}: must be >= 1 (latest and best are always kept as well)")
    report = prune(args.output_dir, keep_last=args.keep, keep_every_n_steps=args.keep_every_n_steps,
                   dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleting"
    for folder in report.doomed:
        print(f"{verb} {folder}")
    for tmp in report.temporaries:
        print(f"{verb} {tmp} (left by a crashed save)")
    print(f"{'would keep' if args.dry_run else 'kept'}: {', '.join(report.kept) or 'nothing'}")
    return 0


def cmd_upgrade(args) -> int:
    from .checkpoint import upgrade

    for result in upgrade(args.path):
        if result.action == "upgraded":
            print(f"upgraded {result.folder}: format {result.from_version} -> current (verified)")
        elif result.action == "finished":
            print(f"finished {result.folder}: an interrupted upgrade completed")
        else:
            print(f"current  {result.folder}: nothing to do")
    return 0


def cmd_plot(args) -> int:
    try:
        from .plotting import plot_metrics
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("needs matplotlib; pip install 'accel_trainer[plot]'") from None
    try:
        out = plot_metrics(args.output_dir, args.out)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"wrote {out}")
    return 0


def cmd_env(args) -> int:
    import accelerate
    import torch
    import transformers

    from . import __version__

    print(f"accel_trainer {__version__}\ntorch {torch.__version__}\naccelerate {accelerate.__version__}\n"
          f"transformers {transformers.__version__}\npython {sys.version.split()[0]}\n"
          f"cuda available: {torch.cuda.is_available()} ({torch.cuda.device_count()} device(s))")
    return 0


def _data_args(args):
    from .config import DataArguments

    return DataArguments(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                         data_files=args.data_files, text_column=args.text_column,
                         max_corpus_bytes=args.max_corpus_bytes)


def cmd_train_tokenizer(args) -> int:
    from .console import interactive
    from .data import character_tokenizer, load_raw_text, train_tokenizer

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --output_dir")
    if args.alphabet:
        tokenizer = character_tokenizer(args.alphabet)
        tokenizer.save_pretrained(out)
        print(f"a character tokenizer of {len(tokenizer)} ids ({len(args.alphabet)} characters, bos "
              f"{tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id}, unk "
              f"{tokenizer.unk_token_id}) in {out}; train with --tokenizer_name {out}")
        return 0
    raw = load_raw_text(_data_args(args))
    texts = (raw[i: i + 1000][args.text_column] for i in range(0, len(raw), 1000))
    tokenizer = train_tokenizer((t for batch in texts for t in batch), args.vocab_size, num_texts=len(raw),
                                show_progress=interactive())
    tokenizer.save_pretrained(out)
    sample = "def hello(world):\n    return 42"
    print(f"trained a byte-level BPE of {len(tokenizer):,} ids on {len(raw):,} documents into {out} "
          f"(bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id}); "
          f"{sample!r} -> {len(tokenizer(sample)['input_ids'])} tokens")
    print(f"load with: AutoTokenizer.from_pretrained({str(out)!r}); train with --tokenizer_name {out}")
    return 0


def cmd_prepare_data(args) -> int:
    from .data import load_raw_text, raw_source
    from .data import load_tokenizer
    from .data import prepare

    data_args = _data_args(args)
    data_args.tokenizer_name = args.tokenizer_name
    manifest = prepare(load_raw_text(data_args), args.text_column, load_tokenizer(args.tokenizer_name),
                       args.output_dir, raw_source(data_args), num_proc=args.num_proc)
    print(f"{args.output_dir}: {manifest['total_tokens']:,} tokens, {manifest['total_documents']:,} documents, "
          f"{len(manifest['shard_files'])} shard(s), {manifest['dtype']}; train with --prepared_data {args.output_dir}")
    return 0


def _add_text_source(p) -> None:
    p.add_argument("--data_files", nargs="+", default=None, help=".txt/.md, .json/.jsonl or .parquet files")
    p.add_argument("--dataset_name", default=None, help="a Hub dataset (needs network)")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--text_column", default="text")
    p.add_argument("--max_corpus_bytes", type=int, default=4_000_000,
                   help="without files or a dataset: bytes of the embedded corpus (the Python standard library)")
    p.add_argument("--output_dir", required=True)


def _model_config(spec: str):
    """The model config at ``spec``: a config.json, a folder holding one (a model folder, a checkpoint)
    or a run dir (its latest checkpoint)."""
    from .checkpoint import MODEL_CONFIG, resolve_path
    from .models import config_from_json

    path = Path(spec)
    if path.is_dir() and not (path / MODEL_CONFIG).is_file():  # a run dir, or a checkpoint like the other verbs
        path = resolve_path(path, flag=spec, checksums={MODEL_CONFIG}).path
    if path.is_dir():
        path = path / MODEL_CONFIG
    if not path.is_file():
        raise ConfigError(f"no {MODEL_CONFIG} at {spec}")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None
    return config_from_json(raw, str(path))


def cmd_params(args) -> int:
    from .models import ModelShape, build_on_meta, count_parameters_of, family_of
    from .optim import assign_parameters, assignment_summary, assignment_table

    config = _model_config(args.config)
    model = build_on_meta(config)
    counts = count_parameters_of(model, ModelShape.of(config))
    assignments = assign_parameters(model, rule=family_of(config).parameter_rule)
    if args.json:
        summary = {k: {"tensors": v["tensors"], "parameters": v["parameters"]} for k, v in
                   assignment_summary(assignments).items()}
        print(json.dumps({**counts, "optimizers": summary}))
        return 0
    print(f"{config.model_type}: total {counts['total']:,}  active {counts['active']:,}  routed experts "
          f"{counts['experts']:,}")
    print(assignment_table(assignments))
    return 0


def load_presets(recipe: str | None) -> dict | None:
    """The ``PRESETS`` of a recipe file, or None for the registered families' own."""
    if recipe is None:
        return None
    import importlib.util

    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"--recipe={recipe!r}: no such file; leave --recipe out for the package's presets "
                          "or pass --config path/to/config.json")
    spec = importlib.util.spec_from_file_location("_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "PRESETS", None), dict):
        raise ConfigError(f"--recipe={recipe!r}: defines no PRESETS dict")
    return module.PRESETS


def cmd_import(args) -> int:
    from .importing import main as import_main

    if not args.rest or args.rest[0].startswith("-"):
        raise ConfigError("import: give the old checkpoint first: accel-trainer import OLD.pt --output_dir RUN "
                          "[--preset NAME | --model_name_or_path X | --config_name X] (see docs/migrating.md)")
    return import_main(args.rest)


def cmd_plan(args) -> int:
    import math

    from .models import ModelShape, family_of, plan_preset
    from .planning import GIB, plan, smallest_gpu_count

    if args.config:
        config, name = _model_config(args.config), args.config
    else:
        config, name = plan_preset(args.preset, None, None, load_presets(args.recipe)).config, f"preset {args.preset}"
    context = ModelShape.of(config).context
    block = args.block_size if args.block_size is not None else context
    problems = [f"--{flag}={value}: must be {rule}" for flag, value, ok, rule in (
        ("num_gpus", args.num_gpus, args.num_gpus >= 1, ">= 1"),
        ("gpu_memory_gib", args.gpu_memory_gib, args.gpu_memory_gib > 0 and math.isfinite(args.gpu_memory_gib),
         "a number > 0"),
        ("per_device_train_batch_size", args.per_device_train_batch_size, args.per_device_train_batch_size >= 1,
         ">= 1"),
        ("block_size", block, block is not None and 1 <= block <= (context or block), f"in 1..{context} (the model's "
                                                                                      f"context)"),
        ("disk_gbps", args.disk_gbps, args.disk_gbps > 0 and math.isfinite(args.disk_gbps), "a number > 0")) if not ok]
    ep, family = args.expert_parallel_size, family_of(config)
    if ep != 1 and not family.supports("ep"):
        problems.append(f"--expert_parallel_size={ep}: expert parallelism is built for families that support it "
                        f"(our accel_moe), not {getattr(config, 'model_type', name)} ({family.name})")
    elif ep != 1 and not (ep >= 1 and args.num_gpus % ep == 0 and config.num_experts % ep == 0):
        problems.append(f"--expert_parallel_size={ep}: must divide --num_gpus ({args.num_gpus}) and the "
                        f"{config.num_experts} experts of {name}")
    if problems:
        raise ConfigError("; ".join(problems))
    options = dict(gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                   disk_gbps=args.disk_gbps)
    if ep > 1:
        return _print_expert_parallel_plan(config, name, args, block, options)
    p = plan(config, args.num_gpus, args.gpu_memory_gib, args.per_device_train_batch_size, block, **options)
    print(f"{name}: {p.counts['total'] / 1e9:.2f}B parameters; FSDP2 over {args.num_gpus} GPUs of "
          f"{args.gpu_memory_gib:g} GiB; {args.per_device_train_batch_size} x {block} tokens per GPU per micro-batch, "
          f"{args.mixed_precision}, activation checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'per GPU':<28}{'GiB':>9}")
    for label, value in (("parameters", p.parameters), ("gradients", p.gradients),
                         ("optimizer (Muon + AdamW)", p.optimizer), ("activations", p.activations),
                         ("reserve (allocator, runtime)", p.reserve)):
        print(f"  {label:<26}{value / GIB:>9.2f}")
    print(f"  {'total':<26}{p.total / GIB:>9.2f}  of {args.gpu_memory_gib:g}: "
          f"{'fits' if p.fits else 'does NOT fit'}")
    fewest = smallest_gpu_count(config, args.gpu_memory_gib, args.per_device_train_batch_size, block, **options)
    print(f"fewest GPUs of {args.gpu_memory_gib:g} GiB that fit this setup: {fewest or 'more than 4096'}")
    print(f"checkpoint   {p.checkpoint_bytes / 1e9:.1f} GB ({p.checkpoint_bytes_per_rank / 1e9:.2f} GB per rank), "
          f"~{p.save_seconds:.0f} s to write at {args.disk_gbps:g} GB/s")
    return 0


def _print_expert_parallel_plan(config, name: str, args, block: int, options: dict) -> int:
    """FSDP2 alone next to FSDP2 + expert parallelism: memory per GPU and the experts' traffic."""
    from .planning import GIB, plan

    ep, w = args.expert_parallel_size, args.num_gpus
    plans = [plan(config, w, args.gpu_memory_gib, args.per_device_train_batch_size, block, **options,
                  expert_parallel_size=size) for size in (1, ep)]
    print(f"{name}: {plans[0].counts['total'] / 1e9:.2f}B parameters ({plans[0].counts['experts'] / 1e9:.2f}B in "
          f"routed experts); {w} GPUs of {args.gpu_memory_gib:g} GiB; {args.per_device_train_batch_size} x {block} "
          f"tokens per GPU per micro-batch, {args.mixed_precision}, activation checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"expert parallel {ep}: {config.num_experts // ep} of the {config.num_experts} experts of each layer per "
          f"GPU, {w // ep} cop{'y' if w == ep else 'ies'} of the experts; the rest sharded by FSDP2 over all {w} GPUs")
    columns = ("FSDP2", f"FSDP2+EP={ep}")
    print(f"{'per GPU (GiB)':<30}{columns[0]:>10}{columns[1]:>14}")
    for label, attr in (("parameters", "parameters"), ("gradients", "gradients"),
                        ("optimizer (Muon + AdamW)", "optimizer"), ("activations", "activations"),
                        ("reserve (allocator, runtime)", "reserve"), ("total", "total")):
        a, b = (getattr(p, attr) / GIB for p in plans)
        print(f"  {label:<28}{a:>10.2f}{b:>14.2f}")
    print(f"  {'fits in ' + format(args.gpu_memory_gib, 'g') + ' GiB':<28}"
          f"{'yes' if plans[0].fits else 'NO':>10}{'yes' if plans[1].fits else 'NO':>14}")
    print("expert traffic per GPU per step of one micro-batch (GB received):")
    before, after = plans[0].traffic, plans[1].traffic
    print(f"  FSDP2      all-gather {before['all_gather'] / 1e9:8.2f}  reduce-scatter "
          f"{before['reduce_scatter'] / 1e9:8.2f}"
          f"  total {sum(before.values()) / 1e9:8.2f}")
    print(f"  EP={ep:<7} all-to-all {after['all_to_all'] / 1e9:8.2f}  all-reduce     {after['all_reduce'] / 1e9:8.2f}"
          f"  total {sum(after.values()) / 1e9:8.2f}  ({sum(before.values()) / max(sum(after.values()), 1):.1f}x less)")
    return 0


class _NoAbbrevParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations anywhere: a prefix of a flag is an unknown flag, never silently another one.
    parser = argparse.ArgumentParser(prog="accel-trainer", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_NoAbbrevParser)
    remote = ("JSON options of the remote filesystem, e.g. '{\"endpoint_url\": \"http://host:9000\"}', or @FILE; "
              "without it, the ACCEL_TRAINER_STORAGE_OPTIONS variable")
    p = sub.add_parser("list", help="every checkpoint of a run (a folder or s3://bucket/prefix)")
    p.add_argument("output_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--storage_options", help=remote)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("inspect", help="what is inside a checkpoint (remote ones are downloaded to a cache)")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--storage_options", help=remote)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="completeness and checksums (exit 0 only when valid)")
    p.add_argument("path", help="a step-N folder or a run's output dir (all its checkpoints), local or s3://...")
    p.add_argument("--storage_options", help=remote)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("diff", help="config, architecture and weight differences of two checkpoints")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--top", type=int, default=10, help="show the N most changed tensors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("export", help="a Hugging Face model folder with the weights")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--format", default=None,
                   help="one of the model family's formats; our MoE family: qwen2_moe (default; the stock transformers "
                        "architecture, same outputs, "
                        "loads without this package) or accel_moe (our own class, needs `import accel_trainer`); "
                        "any other transformers model: native (default), itself")
    p.add_argument("--merge_lora", action="store_true",
                   help="a LoRA run's checkpoint: write the base with the adapters merged into it (a plain model "
                        "folder) instead of PEFT's adapter folder")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("eval", help="standard benchmarks (lm-evaluation-harness) on a checkpoint, a run or an export")
    p.add_argument("path", help="a step-N folder, a run's output dir (its latest) or <run>/best, an export folder, "
                                "or s3://...")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (hellaswag,arc_easy,...)")
    p.add_argument("--include_path", default=None, help="a folder of task YAML files of your own (works offline)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction below 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--storage_options", help=remote)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("prune", help="apply the retention rules by hand")
    p.add_argument("output_dir")
    p.add_argument("--keep", type=int, required=True, help="keep the newest K (plus latest and best)")
    p.add_argument("--keep_every_n_steps", type=int, default=None)
    p.add_argument("--dry_run", action="store_true", help="only show what would be deleted")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("upgrade", help="rewrite checkpoints of an older format version as the current one (atomic)")
    p.add_argument("path", help="a step-N folder, or a run's output dir (every checkpoint in it)")
    p.set_defaults(func=cmd_upgrade)
    p = sub.add_parser("plot", help="PNG of loss and LR curves from metrics.jsonl")
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="PNG path (default: <output_dir>/metrics.png)")
    p.set_defaults(func=cmd_plot)
    sub.add_parser("env", help="print versions and devices").set_defaults(func=cmd_env)
    p = sub.add_parser("import", help="a .pt checkpoint of another trainer as a checkpoint here (with its optimizer "
                                      "state): OLD.pt --output_dir RUN and the recipe's model flags", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("plan", help="per-GPU memory under FSDP2 and checkpoint cost, before spending GPU hours")
    p.add_argument("--preset", default="18b", help="a preset of the recipe (default 18b)")
    p.add_argument("--recipe", default=None, help="a recipe file with its own PRESETS (default: the package's presets)")
    p.add_argument("--config", default=None, help="a model config.json instead of a preset")
    p.add_argument("--num_gpus", type=int, default=8)
    p.add_argument("--gpu_memory_gib", type=float, default=80)
    p.add_argument("--per_device_train_batch_size", type=int, default=1)
    p.add_argument("--block_size", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--disk_gbps", type=float, default=2.0, help="checkpoint storage write bandwidth, GB/s")
    p.add_argument("--expert_parallel_size", type=int, default=1,
                   help="GPUs sharing one copy of the experts: compare memory and expert traffic with FSDP2 alone")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text (tokenizers library)")
    _add_text_source(p)
    p.add_argument("--vocab_size", type=int, default=32768)
    p.add_argument("--alphabet", default=None, help="instead of training: one id per character of this string "
                   "(e.g. the 20 amino acids), then BOS/EOS/PAD/UNK")
    p.set_defaults(func=cmd_train_tokenizer)
    p = sub.add_parser("prepare-data", help="tokenise text once into token shards that training memory-maps")
    _add_text_source(p)
    p.add_argument("--tokenizer_name", default="byte", help="byte, a tokenizer folder, or a Hub name")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenising processes")
    p.set_defaults(func=cmd_prepare_data)
    p = sub.add_parser("params", help="count parameters of a model config (meta device, nothing allocated)")
    p.add_argument("config", help="config.json, a folder holding one, a checkpoint or a run dir (its latest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.storage_options_dict = _storage_options(args)
        return args.func(args)
    except InputError as err:  # bad input: one line, exit status 2
        from .secrets import redact_text

        print(f"accel-trainer {args.command}: {redact_text(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

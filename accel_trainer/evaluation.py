"""Standard benchmarks on any checkpoint, through EleutherAI's lm-evaluation-harness (``lm-eval``).

The model is the one :func:`~accel_trainer.load_model_for_inference` rebuilds (no export step) and
the harness's own Hugging Face wrapper (``HFLM``) runs it, so the numbers are the harness's: the
same as ``lm_eval --model hf --model_args pretrained=<export folder>`` on the same task. Tasks are
the harness's names, or task folders of your own (``include_path``), which work offline.

Results are written into the run as ``eval/step-N/<tasks>.json`` (atomically) and, as
``eval/<task>/<metric>`` scalars, into the run's TensorBoard at that step.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

from .errors import ConfigError

EXTRA = "pip install 'accel_trainer[eval]'"


def task_manager(include_path: str | None = None):
    """The harness's task registry (its own tasks and those under ``include_path``), indexed once per
    process (indexing reads every task file of the harness).

    Raises:
        ConfigError: lm-eval is not installed, or ``include_path`` is not a folder.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"accel-trainer eval needs EleutherAI's lm-evaluation-harness; {EXTRA}") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include_path={include_path!r}: no such folder (it holds task YAML files)")
    key = str(Path(include_path).resolve()) if include_path else None
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include_path)
    return _MANAGERS[key]


_MANAGERS: dict = {}


def check_tasks(tasks: list[str], manager) -> None:
    """Raises:
        ConfigError: a task the harness does not know, with the close names.
    """
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm_eval --tasks list shows them all)"
            raise ConfigError(f"--tasks: {task!r} is not a task of lm-evaluation-harness{hint}; a task of your own "
                              "needs --include_path <folder with its YAML>")


def require_task_data(tasks: list[str], manager) -> None:
    """The harness's own tasks read their data from the Hub: fail in seconds when it cannot be
    reached (not after the model is loaded and the datasets library's retries).

    Raises:
        ConfigError: naming ``--tasks`` and what to do.
    """
    hub_tasks = [task for task in tasks if _data_from_hub(manager.task_index.get(task))]
    if hub_tasks:
        from .hub import require_hub

        require_hub("--tasks", ",".join(hub_tasks), ConfigError)


# The datasets builders that read local files named in the task (not the Hub).
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")


def _data_from_hub(entry) -> bool:
    """Whether a harness task (or group) reads its dataset from the Hugging Face Hub: a group of the
    harness's own, or a task whose ``dataset_path`` is neither a local folder nor a local builder."""
    if entry is None:
        return False
    cfg = getattr(entry, "cfg", None) or {}
    path = cfg.get("dataset_path")
    if path is None:  # a group: its tasks are the harness's own unless its YAML is yours
        import lm_eval

        harness = Path(lm_eval.__file__).resolve().parent
        yaml = getattr(entry, "yaml_path", None)
        return yaml is not None and Path(yaml).resolve().is_relative_to(harness)
    return not (str(path) in LOCAL_BUILDERS or Path(str(path)).expanduser().exists())


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 1, device: str = "cpu", manager=None) -> dict:
    """The harness's results of ``tasks`` on ``model`` (a transformers causal LM) with ``tokenizer``.

    Raises:
        ConfigError: lm-eval missing, an unknown task, or a model the harness cannot wrap.
    """
    import lm_eval
    from transformers import PreTrainedModel

    manager = manager or task_manager(include_path)
    check_tasks(tasks, manager)
    require_task_data(tasks, manager)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters on a base
    if not isinstance(base, PreTrainedModel):
        raise ConfigError(f"{type(model).__name__} is your own module, not a transformers model: lm-evaluation-harness "
                          "runs transformers models (evaluate yours with its val_loss/val_bpb, or wrap it)")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, FileNotFoundError) as err:  # a task's data not in the cache (offline)
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise ConfigError(f"--tasks={','.join(tasks)}: a task's data could not be loaded ({first}); run once "
                          "with network to fill the Hugging Face cache, or use tasks of your own (--include_path)") \
            from None
    return {"results": results["results"], "versions": results.get("versions", {}),
            "n-shot": results.get("n-shot", {}), "config": {"limit": limit, "num_fewshot": num_fewshot,
                                                             "batch_size": batch_size}}


def scalars(results: dict) -> dict[str, float]:
    """``eval/<task>/<metric>`` -> value, for metrics.jsonl and trackers (the harness's ``acc,none``
    is ``acc``; standard errors and non-numbers are left out)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, flt = key.partition(",")
            if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            out[f"eval/{task}/{name}" + ("" if flt in ("", "none") else f"_{flt}")] = float(value)
    return out


def table(results: dict) -> str:
    """The harness's own table of the results."""
    from lm_eval.utils import make_table

    return make_table({"results": results["results"], "versions": results.get("versions", {}),
                       "n-shot": results.get("n-shot", {}), "higher_is_better": {}})


def write_results(run_dir: Path, step: int | None, tasks: list[str], results: dict) -> Path:
    """``<run_dir>/eval/step-N/<tasks>.json``, written atomically."""
    from .checkpoint import atomic_write_text

    folder = Path(run_dir) / "eval" / (f"step-{step}" if step is not None else "no-step")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{'+'.join(sorted(tasks))}.json"
    atomic_write_text(path, json.dumps({"step": step, "tasks": tasks, **results}, indent=2, default=str) + "\n")
    return path


def log_to_tensorboard(run_dir: Path, step: int | None, values: dict[str, float]) -> Path | None:
    """Add ``values`` at ``step`` to the run's TensorBoard (the folder its trackers write: the run name)."""
    from .checkpoint import CheckpointError, read_json

    if step is None:
        return None
    run_name = None
    for state_file in sorted(Path(run_dir).glob("checkpoints/step-*/trainer_state.json")):
        try:
            run_name = (read_json(state_file).get("trackers") or {}).get("run_name") or run_name
        except CheckpointError:  # a damaged state file: the output dir's name below
            continue
    folder = Path(run_dir) / (run_name or Path(run_dir).resolve().name)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:
        for name, value in values.items():
            writer.add_scalar(name, value, global_step=step)
    return folder

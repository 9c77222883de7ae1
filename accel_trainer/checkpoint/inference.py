"""Load a trained model for evaluation or generation from a checkpoint alone (no training script,
no optimizer): any ``transformers`` causal LM whose ``config.json`` the checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import torch

from .format import CUSTOM_MODEL, MANIFEST, MODEL_CONFIG, RUN_CONFIG
from .io import CheckpointError, read_json
from .layout import resolve_path
from .weights import LoadReport, adapt_linear_layout, load_state_into, read_weights

_REGISTERED: dict[str, type] = {}


def register_model(model_class: type) -> type:
    """Make your own module's checkpoints load with :func:`load_model_for_inference` without passing
    ``model_class=`` (usable as a class decorator). Only registered or given classes are ever built:
    a checkpoint names its class, but never decides which code is imported."""
    _REGISTERED[f"{model_class.__module__}:{model_class.__qualname__}"] = model_class
    _REGISTERED.setdefault(model_class.__qualname__, model_class)
    return model_class


def _build_custom(folder: Path, saved: dict, model_class):
    """Your own module from the ``config.json`` a run of it saved: ``model_class(config)``, the config
    rebuilt as ``model_class.config_class(**fields)`` when the class names one."""
    custom = saved.get(CUSTOM_MODEL) or {}
    name = custom.get("class") or "?"
    cls = model_class or _REGISTERED.get(name) or _REGISTERED.get(name.rpartition(":")[2])
    if cls is None:
        raise CheckpointError(f"{folder}: holds a {name} (your own module); pass model_class={name.rpartition(':')[2]} "
                              "or register it with accel_trainer.checkpoint.register_model")
    fields = custom.get("config") or {}
    config_class = getattr(cls, "config_class", None)
    try:
        config = config_class(**fields) if config_class is not None else fields
        return cls(config), config
    except TypeError as err:
        raise CheckpointError(f"{folder}: {cls.__name__} cannot be built from its saved config ({err})") from None

LEGACY_STEP_KEYS = ("global_step", "step", "iter_num")


def refuse_random_weights(source: Path, report: LoadReport, what: str) -> None:
    """A single file is someone else's state dict: a model it does not fill whole would answer with
    random weights. Refuse that in one line instead of returning it.

    Raises:
        CheckpointError: naming how much was left as initialised and what to pass.
    """
    left = report.left_as_initialised
    if report.loaded and not left:
        return
    first = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
    raise CheckpointError(
        f"{source}: {len(report.loaded)} of its tensors fit a {what} built from its config and {len(left)} of the "
        f"model's are not in it ({first}); the model would hold random weights. Pass model_class= (your own "
        "module) or config= (a transformers config) that describe the file's model")


def _single_file_of_your_own(target: Path, state, extras: dict, model_class, config, dtype, device, strict: bool):
    """``model_class(config)`` for an old single-file checkpoint of your own module: ``config=``, or the
    file's ``config`` dict."""
    config = config if config is not None else extras.get("config")
    if config is None:
        raise CheckpointError(f"{target}: no 'config' in the file to build {model_class.__name__} from; pass config=")
    try:
        model = model_class(config)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{target}: {model_class.__name__} cannot be built from the file's config "
                              f"({type(err).__name__}: {err}); pass config=") from None
    report = load_state_into(model, state, strict=strict)
    refuse_random_weights(target, report, model_class.__name__)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device=device).eval()
    model.load_report = report
    step = next((extras[k] for k in LEGACY_STEP_KEYS if isinstance(extras.get(k), int)), extras.get("epoch"))
    return model, config, step


# Hashed when the folder is resolved; the weight files are hashed as read_weights reads them (one pass).
READ_FOR_INFERENCE = {MODEL_CONFIG, MANIFEST}


def _config_from(folder_or_extras, source: Path, legacy_config_class):
    from transformers import AutoConfig

    if isinstance(folder_or_extras, Path):
        path = folder_or_extras / MODEL_CONFIG
        if not path.is_file():
            raise CheckpointError(f"{folder_or_extras}: no {MODEL_CONFIG}, cannot rebuild the model; "
                                  "pass config= explicitly")
        config = read_json(path)
        try:
            return AutoConfig.for_model(**config)
        except (ValueError, KeyError, TypeError) as err:
            # transformers' message lists every model type it knows (hundreds): its first sentence says it
            why = str(err).split(". ")[0]
            raise CheckpointError(f"{path}: cannot rebuild a model config from it (model_type "
                                  f"{config.get('model_type')!r}: {why}); if its model type comes from a package, "
                                  "import that package first") from None
    config = folder_or_extras.get("config")
    if isinstance(config, dict):
        if "model_type" in config:
            return AutoConfig.for_model(**config)
        if legacy_config_class is not None:
            known = {k: v for k, v in config.items() if k in legacy_config_class().to_dict() and k != "model_type"}
            try:
                return legacy_config_class(**known)
            except ValueError as err:
                raise CheckpointError(f"{source}: its 'config' does not describe a "
                                      f"{legacy_config_class.__name__} ({err}); pass config=") from None
    raise CheckpointError(f"{source}: a single-file checkpoint without a usable 'config' dict; pass config=")


def load_model_for_inference(path: str | Path, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None, strict: bool = False, config=None,
                             legacy_config_class=None, storage_options: dict | None = None, model_class=None,
                             adapters=None):
    """Rebuild the model from a checkpoint and load its weights, ready for ``model(input_ids)``.

    Args:
        path: a ``step-N`` folder, a run's output dir (its latest valid checkpoint), ``<output_dir>/best``
            (or ``/latest``), a Hugging Face model folder, or an old single-file PyTorch checkpoint
            (``{"model_state_dict", "config", "step"|"global_step", ...}``); or a remote run
            (``s3://bucket/prefix``, ``.../best``, ``.../checkpoints/step-N``), downloaded once to a cache.
        device: where to put the model (default: CUDA if available, else CPU). Checkpoints written on
            GPU or by several processes load anywhere.
        dtype: e.g. ``torch.bfloat16``; default keeps the saved dtype.
        strict: raise when weights and model differ instead of reporting and skipping.
        config: a ``PretrainedConfig`` to use instead of the checkpoint's own.
        legacy_config_class: the config class of old single-file checkpoints whose ``config`` dict
            names no ``model_type``.
        storage_options: for a remote ``path`` (s3fs: ``{"endpoint_url": ...}``).
        model_class: your own module's class, for a checkpoint of a run that trained it (or
            :func:`register_model` it once).
        adapters: ``(folder, run_config, weights, device, dtype) -> model or None``: builds the model
            of a checkpoint whose weights are not the whole model (LoRA adapters on a base named in
            its run config); None from it: an ordinary checkpoint.

    Returns:
        ``(model, config, step)`` with the model in eval mode; ``step`` is None when unknown. The
        load report is at ``model.load_report``.

    Raises:
        CheckpointError: missing/invalid checkpoint, unsafe file, or (strict) differing weights.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from .remote import fetch, is_url

    if is_url(str(path)):
        path = fetch(str(path), storage_options)
    # Every file must be present with its size; checksums are compared only for what this loads.
    target = resolve_path(path, flag=f"load_model_for_inference({str(path)!r})", checksums=READ_FOR_INFERENCE).path
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    state, extras = read_weights(target)  # optimizer files are never opened
    is_folder = target.is_dir()
    saved = read_json(target / MODEL_CONFIG) if is_folder and (target / MODEL_CONFIG).is_file() else {}
    if adapters is not None and is_folder and (target / RUN_CONFIG).is_file():
        model = adapters(target, read_json(target / RUN_CONFIG), state, device, dtype)
        if model is not None:
            step = read_json(target / MANIFEST).get("step") if (target / MANIFEST).is_file() else None
            return model, model.config, step
    if not is_folder and model_class is not None:  # your own module's .pt file: model_class(its config)
        return _single_file_of_your_own(target, state, extras, model_class, config, dtype, device, strict)
    if saved.get("model_type") == CUSTOM_MODEL:
        model, config = _build_custom(target, saved, model_class)
        report = load_state_into(model, state, strict=strict)
        if dtype is not None:
            model.to(dtype=dtype)
        model.to(device=device).eval()
        model.load_report = report
        step = read_json(target / MANIFEST).get("step") if (target / MANIFEST).is_file() else None
        return model, config, step
    if config is None:
        config = _config_from(target if is_folder else extras, target, legacy_config_class)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(f"{target}: no causal LM class is registered for model type {config.model_type!r}; "
                              "import the package that defines it first")
    if not is_folder:  # nanoGPT's GPT-2 stores nn.Linear [out, in] where transformers has Conv1D [in, out]
        with torch.device("meta"):
            skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        state, transposed = adapt_linear_layout(skeleton, state)
    else:
        transposed = []
    # transformers builds the model without a second copy of the weights, initialises what the
    # checkpoint lacks or has in another shape, and reports it.
    model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True)
    report = LoadReport(loaded=sorted(set(state) - set(info["unexpected_keys"]) - {k for k,
                                                                                   *_ in info["mismatched_keys"]}),
                        missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]),
                        mismatched=[(k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]],
                        transposed=transposed)
    if strict and not report.exact:
        raise CheckpointError(f"{target}: strict weight loading failed; differences:\n{report}")
    if not is_folder:
        refuse_random_weights(target, report, type(model).__name__)
    model.to(device=device).eval()
    model.load_report = report
    if is_folder:
        step = read_json(target / MANIFEST).get("step") if (target / MANIFEST).is_file() else None
    else:
        step = next((extras[k] for k in LEGACY_STEP_KEYS if isinstance(extras.get(k), int)), None)
    return model, config, step

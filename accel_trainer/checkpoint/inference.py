"""Load a trained model for evaluation or generation from a checkpoint alone (no recipe, no optimizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import CheckpointError, read_json
from .layout import resolve_path
from .weights import LoadReport, load_state_into, read_weights

LEGACY_STEP_KEYS = ("global_step", "step")
READ_FOR_INFERENCE = {"model.safetensors", "config.json", "trainer_state.json"}


def _config_from(folder_or_extras, source: Path):
    from ..models import MoEConfig

    if isinstance(folder_or_extras, Path):
        path = folder_or_extras / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder_or_extras}: no config.json, cannot rebuild the model; "
                                  "pass config= (a MoEConfig) explicitly")
        return MoEConfig.from_json_file(path)
    config = folder_or_extras.get("config")
    if isinstance(config, dict):
        known = {k: v for k, v in config.items() if k in MoEConfig().to_dict() and k != "model_type"}
        try:
            return MoEConfig(**known)
        except ValueError as err:
            raise CheckpointError(f"{source}: its 'config' does not describe a MoEConfig ({err}); pass config=") from None
    raise CheckpointError(f"{source}: a single-file checkpoint without a 'config' dict; pass config= (a MoEConfig)")


def load_model_for_inference(path: str | Path, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None, strict: bool = False, config=None):
    """Rebuild the model from a checkpoint and load its weights, ready for ``model(input_ids)``.

    Args:
        path: a ``step-N`` folder, a run's output dir (its latest valid checkpoint), ``<output_dir>/best``
            (or ``/latest``), a Hugging Face model folder, or an old single-file PyTorch checkpoint
            (``{"model_state_dict", "config", "step"|"global_step", ...}``).
        device: where to put the model (default: CUDA if available, else CPU). Checkpoints written on
            GPU or by several processes load anywhere.
        dtype: e.g. ``torch.bfloat16``; default keeps the saved dtype.
        strict: raise when weights and model differ instead of reporting and skipping.
        config: a ``MoEConfig`` to use instead of the checkpoint's own.

    Returns:
        ``(model, config, step)`` with the model in eval mode; ``step`` is None when unknown. The
        load report is at ``model.load_report``.

    Raises:
        CheckpointError: missing/invalid checkpoint, unsafe file, or (strict) differing weights.
    """
    from ..models import MoEForCausalLM

    # Every file must be present with its size; checksums are read only for what this loads.
    target = resolve_path(path, flag=f"load_model_for_inference({str(path)!r})", checksums=READ_FOR_INFERENCE).path
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, extras = read_weights(target)  # optimizer files are never opened
    is_folder = target.is_dir()
    if config is None:
        config = _config_from(target if is_folder else extras, target)
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    report = _materialize(model, state, strict)
    model.to(device=device, dtype=dtype).eval()
    model.load_report = report
    step = None
    if is_folder and (target / "trainer_state.json").is_file():
        step = read_json(target / "trainer_state.json").get("global_step")
    else:
        step = next((extras[k] for k in LEGACY_STEP_KEYS if isinstance(extras.get(k), int)), None)
    return model, config, step


def _materialize(model, state: dict, strict: bool) -> LoadReport:
    """Fill a meta-device model: checkpoint tensors are used in place (no second copy); anything the
    checkpoint lacks is allocated and initialised as in a fresh model."""
    own = model.state_dict()
    complete = all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in own.items())
    if complete and set(state) == set(own):
        model.load_state_dict(state, assign=True)
        return LoadReport(loaded=sorted(own))
    if strict:
        return load_state_into(model, state, strict=True)  # raises with the full list
    model.to_empty(device="cpu")
    model.apply(model._init_weights)
    return load_state_into(model, state, strict=False)

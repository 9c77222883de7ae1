"""accel_trainer: crash-proof LLM training on Hugging Face Accelerate.

Names are imported on first use (``accel-trainer list`` starts without torch). Importing
``accel_trainer.models`` registers the MoE model with transformers' Auto classes.
"""

from .lazy import lazy_names

__version__ = "0.1.0"

_WHERE = {"MoEConfig": ".models", "MoEForCausalLM": ".models", "CheckpointError": ".checkpoint",
          "Checkpointer": ".checkpoint", "LoadReport": ".checkpoint", "ResumableLoader": ".checkpoint",
          "load_weights": ".checkpoint"}

__all__ = sorted([*_WHERE, "load_model_for_inference", "__version__"])


__getattr__ = lazy_names(__name__, _WHERE)


def load_model_for_inference(path, device=None, dtype=None, strict: bool = False, config=None, model_class=None,
                             storage_options: dict | None = None):
    """The checkpoint component's ``load_model_for_inference`` with this package's model registered;
    old single-file checkpoints whose ``config`` names no model type are read as the default family's
    config (our MoE's).

    ``model, config, step = load_model_for_inference("runs/x/checkpoints/best")`` for any model the
    trainer trains: our MoE, any transformers causal LM, or your own module (``model_class=``). A
    LoRA run's checkpoint, or a PEFT adapter folder (its export), gives the PEFT model: the base
    from its recorded path (a checkpoint's checked by content) with the adapters on it."""
    from pathlib import Path

    import torch

    from .checkpoint import load_model_for_inference as load
    from .models import default_family
    from .models import adapters_of_checkpoint, is_adapter_folder, load_adapter_folder

    if "://" not in str(path) and is_adapter_folder(Path(path)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_adapter_folder(Path(path), device, dtype)
        return model, model.config, None
    return load(path, device=device, dtype=dtype, strict=strict, config=config,
                legacy_config_class=default_family().config_class,
                storage_options=storage_options, model_class=model_class, adapters=adapters_of_checkpoint)

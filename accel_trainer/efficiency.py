"""Memory and speed features applied to a model before training, under Hugging Face's names.

* Activation checkpointing (``--gradient_checkpointing``): every decoder layer is recomputed in the
  backward instead of keeping its activations, non-reentrant (what FSDP2 and torch.compile support).
  It goes through transformers' own switch, so the layers are not wrapped and checkpoint names stay
  as they are.
* Regional compilation (``--torch_compile``): each decoder layer is compiled on its own, as
  torchtitan does, instead of the whole model: the layers share one compiled graph, so compile time
  stays that of one layer, and ``Module.compile`` works in place (no ``_orig_mod.`` in saved names).
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: transformers marks them as ``GradientCheckpointingLayer``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant).

    Raises:
        ValueError: the model does not support it (``supports_gradient_checkpointing``).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """``torch.compile`` every decoder layer in place; returns how many were compiled.

    Raises:
        ValueError: the model has no decoder layers that transformers marks as such.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"--torch_compile: {type(model).__name__} has no decoder layers marked as "
                         "GradientCheckpointingLayer to compile one by one")
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    return len(layers)

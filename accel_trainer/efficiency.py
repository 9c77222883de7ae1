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


def decoder_layers(model: nn.Module, layer_classes=()) -> list[nn.Module]:
    """The model's repeated blocks: those transformers marks as ``GradientCheckpointingLayer``, or the
    modules whose class is named in ``layer_classes`` (your own module's ``_no_split_modules``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = set(layer_classes)
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) or type(m).__name__ in names]


def enable_activation_checkpointing(model, layer_classes=()) -> None:
    """Recompute each decoder layer in the backward (non-reentrant).

    Raises:
        ValueError: the model has no decoder layers to recompute.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    layers = decoder_layers(model, layer_classes)
    if not layers:
        raise ValueError(f"--gradient_checkpointing: {type(model).__name__} names no decoder layers "
                         "(give the class a _no_split_modules list of its block classes)")
    import functools

    from torch.utils.checkpoint import checkpoint

    for layer in layers:  # the forward is replaced, the module is not wrapped: names stay as they are
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                           layer_classes=()) -> int:
    """``torch.compile`` every decoder layer in place; returns how many were compiled.

    Raises:
        ValueError: the model has no decoder layers.
    """
    layers = decoder_layers(model, layer_classes)
    if not layers:
        raise ValueError(f"--torch_compile: {type(model).__name__} has no decoder layers (GradientCheckpointingLayer, "
                         "or a class named in its _no_split_modules) to compile one by one")
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    return len(layers)

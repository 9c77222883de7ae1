"""Model families: one record per family of models, the door for the next one.

A :class:`ModelFamily` says everything the rest of the house needs of a family: its config and
model classes, its presets, how a preset becomes a :class:`~.building.ModelPlan`, its parameter
rule (which tensors Muon takes, which AdamW, which matrices are fused), its export formats, which
parallelisms it supports and what planning needs of it. ``run``, ``cli``, ``planning``,
``parallel``, ``export`` and ``optim``'s callers ask the family; none of them names a model class.

Three families ship: our MoE (``accel_moe``, :mod:`.moe_family`), any transformers causal LM
(``hugging_face``) and your own ``nn.Module`` (``custom``). Adding one is one module and one
:func:`register_family` call (``tests/unit/test_model_families.py`` registers a toy family from a
test file and trains, plans and exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from ..checkpoint import CUSTOM_MODEL as CUSTOM_MODEL_TYPE  # config.json of your own module
from ..errors import ConfigError
from ..optim import GENERIC_RULE, ParameterRule
from .hf_moe import EXPERT_STACKS, engine_layers, routed_expert_parameters

#: Parallelisms a family may support, by the names :class:`accel_trainer.parallel.ParallelDims` uses.
DATA_PARALLEL = frozenset({"dp_replicate", "dp_shard"})


def _write_with_save_pretrained(model, out, max_shard_bytes: int) -> None:
    model.save_pretrained(out, max_shard_size=max_shard_bytes)


@dataclass(frozen=True)
class ModelFamily:
    """One family of models and what the house needs of it.

    Attributes:
        name: the family's name (``accel_moe``, ``hugging_face``, ``custom``, yours).
        model_type: the ``config.json`` ``model_type`` this family owns; None for the catch-all
            families (any transformers model; your own module).
        config_class, model_class: a transformers ``PretrainedConfig`` and its causal LM class;
            registered with the Auto classes, so checkpoints and exports load with
            ``AutoModelForCausalLM``.
        presets: sizes by name (``--preset NAME``), each the config's keyword arguments.
        defaults: per preset, training defaults (e.g. ``{"tiny": {"block_size": 128}}``).
        parameter_rule: which parameters Muon and AdamW take, and which matrices are fused.
        export_formats: ``accel-trainer export --format`` name -> ``write(model, out, max_shard_bytes)``;
            the first is the default.
        load_hint: what a Python session must run before ``from_pretrained`` of a native export.
        parallelisms: the mesh dimensions it supports beyond data parallelism (``{"ep"}``).
        expert_layers: ``model -> [(name, module)]`` of its MoE layers, for expert parallelism
            (each module holds stacks named in ``expert_stacks`` and takes ``expert_group``).
        expert_stacks: the expert-stack parameter names of one MoE layer.
        routed_expert_parameters: ``config -> (all layers, largest layer)`` for ``plan``.
        prepare_compile: ``(device, dtype) -> None`` before ``torch.compile`` traces it.
    """

    name: str
    model_type: str | None = None
    config_class: Any = None
    model_class: Any = None
    presets: Mapping[str, dict] = field(default_factory=dict)
    defaults: Mapping[str, dict] = field(default_factory=dict)
    parameter_rule: ParameterRule = field(default_factory=ParameterRule)
    export_formats: Mapping[str, Callable] = field(default_factory=lambda: {"native": _write_with_save_pretrained})
    load_hint: str = ""
    parallelisms: frozenset = frozenset()
    expert_layers: Callable[[nn.Module], list] | None = None
    expert_stacks: tuple[str, ...] = ()
    routed_expert_parameters: Callable[[Any], tuple[int, int]] | None = None
    prepare_compile: Callable | None = None

    def supports(self, dimension: str) -> bool:
        return dimension in DATA_PARALLEL or dimension in self.parallelisms

    @property
    def default_format(self) -> str | None:
        return next(iter(self.export_formats), None)

    def config_for_preset(self, preset: str, presets: Mapping[str, dict] | None = None, **overrides):
        """The config of ``--preset preset`` (from ``presets`` when a recipe gives its own)."""
        table = presets if presets is not None else self.presets
        if preset not in table:
            raise ConfigError(f"--preset={preset!r}: unknown; choose one of {', '.join(table)}")
        return self.config_class(**{**table[preset], **overrides})

    def build(self, config) -> nn.Module:
        return self.model_class(config)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known to the house (and its classes to transformers' Auto classes).

    Raises:
        ValueError: a preset name another family already has, or another family with this model type.
    """
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(other.presets) & set(family.presets)
        if clash:
            raise ValueError(f"family {family.name!r}: preset(s) {sorted(clash)} already belong to {other.name!r}")
        if family.model_type is not None and other.model_type == family.model_type:
            raise ValueError(f"family {family.name!r}: model_type {family.model_type!r} belongs to {other.name!r}")
    if family.config_class is not None and family.model_class is not None and family.model_type:
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        AutoModelForCausalLM.register(family.config_class, family.model_class, exist_ok=True)
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a family (tests that register their own)."""
    _FAMILIES.pop(name, None)


def families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def family_named(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model family {name!r}: unknown; registered: {', '.join(_FAMILIES)}") from None


def default_family() -> ModelFamily:
    """The family of the default preset and of old checkpoints whose config names no model type:
    the first registered family that has presets (our MoE)."""
    return next(f for f in _FAMILIES.values() if f.presets)


def family_of_preset(preset: str) -> ModelFamily:
    """The family that has ``--preset preset``.

    Raises:
        ConfigError: no family has it, naming every preset there is.
    """
    for family in _FAMILIES.values():
        if preset in family.presets:
            return family
    known = [p for f in _FAMILIES.values() for p in f.presets]
    raise ConfigError(f"--preset={preset!r}: unknown; choose one of {', '.join(known)}")


def family_of(config) -> ModelFamily:
    """The family of a config object or a ``config.json`` dict: the one owning its ``model_type``,
    else your own module's (``custom``), else any transformers model's (``hugging_face``)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in _FAMILIES.values():
        if family.model_type is not None and family.model_type == kind:
            return family
    if kind == CUSTOM_MODEL_TYPE or (config is not None and not isinstance(config, dict)
                                     and not hasattr(config, "to_dict")):
        return _FAMILIES["custom"]
    return _FAMILIES["hugging_face"]


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family of a built model (by its class, else by its config)."""
    for family in _FAMILIES.values():
        if family.model_class is not None and isinstance(model, family.model_class):
            return family
    config = getattr(model, "config", None)
    return family_of(config) if config is not None and hasattr(config, "to_dict") else _FAMILIES["custom"]


#: Any transformers causal LM (``--model_name_or_path``, ``--config_name``, ``--model_type``): written
#: as itself. A MoE's experts run on our engine (:mod:`.hf_moe`) where their layout allows, with
#: expert parallelism; its router, shared experts and balance loss stay the model's own.
HUGGING_FACE = ModelFamily(name="hugging_face", parameter_rule=GENERIC_RULE, parallelisms=frozenset({"ep"}),
                           expert_layers=engine_layers, expert_stacks=EXPERT_STACKS,
                           routed_expert_parameters=routed_expert_parameters)
#: Your own ``nn.Module`` (a ``model_factory``): saved and loaded by name, no Hugging Face folder.
CUSTOM = ModelFamily(name="custom", parameter_rule=GENERIC_RULE, export_formats={})

__all__ = ["CUSTOM", "HUGGING_FACE", "DATA_PARALLEL", "default_family", "ModelFamily", "families", "family_named",
           "family_of", "family_of_model",
           "family_of_preset", "register_family", "unregister_family"]

"""Where a run's model comes from, decided before any data work: our MoE presets, any transformers
causal LM (pretrained weights, a config, or an architecture by name), or your own ``nn.Module``.

Every way in gives the trainer the same thing, a :class:`ModelPlan`: the config, how to build the
model, its shape for telemetry and planning, and its decoder-layer classes for FSDP2, activation
checkpointing and regional compilation. Bad input is a :class:`~accel_trainer.errors.ConfigError`
naming the flag (an unknown model type with the close ones, a folder without ``config.json``, a Hub
name without network in seconds, a ``--config_overrides`` key the config does not have).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..hub import require_hub

from ..checkpoint import CUSTOM_MODEL as CUSTOM_KEY  # config.json of a checkpoint of your own nn.Module
from .family import CUSTOM, HUGGING_FACE, ModelFamily, default_family, family_named, family_of, family_of_preset
from .hf_moe import ENGINE, use_engine
DEFAULT_MAX_BLOCK = 2048  # the default --block_size of a Hugging Face model: its context, at most this


def first_attr(config, *names, default=None):
    """The first of ``names`` the config has (architectures spell the same thing differently)."""
    for name in names:
        value = getattr(config, name, None) if not isinstance(config, dict) else config.get(name)
        if value is not None:
            return value
    return default


@dataclass
class ModelShape:
    """What telemetry and planning need of any architecture."""

    num_layers: int | None
    num_heads: int | None
    head_dim: int | None
    hidden_size: int | None
    context: int | None
    num_experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def of(cls, config) -> "ModelShape":
        heads = first_attr(config, "num_attention_heads", "n_head", "n_heads")
        hidden = first_attr(config, "hidden_size", "n_embd", "d_model", "dim")
        head_dim = first_attr(config, "head_dim") or (hidden // heads if hidden and heads else None)
        return cls(num_layers=first_attr(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers"),
                   num_heads=heads, head_dim=head_dim, hidden_size=hidden,
                   context=first_attr(config, "max_position_embeddings", "n_positions", "block_size", "max_seq_len"),
                   num_experts=first_attr(config, "num_experts", "num_local_experts", "n_routed_experts",
                                          default=0) or 0,
                   experts_per_token=first_attr(config, "num_experts_per_tok", "top_k", "moe_top_k", default=0) or 0)


def count_parameters_of(model: nn.Module, shape: ModelShape) -> dict[str, int]:
    """Total and active (used per token) parameters of any model; works on the meta device. Routed
    experts are the stacked 3D weights (or parameters under an ``experts`` module)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 3 or ".experts." in f".{n}")
    inactive = 0
    if shape.num_experts and shape.experts_per_token:
        inactive = experts * (shape.num_experts - shape.experts_per_token) // shape.num_experts
    return {"total": total, "active": total - inactive, "experts": experts}


@dataclass
class ModelPlan:
    """A model to build: where from, its config, and how.

    Attributes:
        source: ``preset``, ``pretrained``, ``config`` or ``custom``.
        name: for messages, e.g. ``preset tiny`` or ``llama from ./my-model``.
        config: a transformers ``PretrainedConfig``, or your own module's config object.
        build: makes the model (weights initialised, or loaded for ``pretrained``).
        shape: layers, heads, context, experts (telemetry, planning, the default block size).
        layer_classes: the decoder-layer class names (FSDP2 wraps them; AC and compile act on them).
        notes: what the run should say at start (a resized vocabulary, the experts' kernel).
        family: the model's family (its parameter rule, parallelisms, export formats).
    """

    source: str
    name: str
    config: Any
    build: Callable[[], nn.Module]
    shape: ModelShape
    layer_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_report: Any = None
    model_class: Any = None  # your own module's class (saved in config.json to rebuild it)
    family: ModelFamily = HUGGING_FACE

    def default_block_size(self) -> int | None:
        return min(self.shape.context, DEFAULT_MAX_BLOCK) if self.shape.context else None

    def config_json(self) -> dict:
        """The config as the checkpoint stores it (``config.json``)."""
        if hasattr(self.config, "to_dict"):
            return self.config.to_dict()
        return custom_config_json(self.config, self.model_class)


# ------------------------------------------------------------------------------ Hugging Face
def check_folder_or_hub(flag: str, name: str) -> None:
    """A Hugging Face model folder with its config.json, or a Hub name that can be reached (in seconds).

    Raises:
        ConfigError: naming ``--flag`` and what to do.
    """
    path = Path(name)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"--{flag}={name!r}: the folder has no config.json (is it a Hugging Face model "
                              "folder? save one with save_pretrained)")
        return
    if name.startswith((".", "~", "/")) or name.count("/") > 1:
        raise ConfigError(f"--{flag}={name!r}: no such folder")
    require_hub(f"--{flag}", name, ConfigError)


def load_auto_config(flag: str, name: str):
    """The transformers config of a model folder or Hub name, checked (before its tokenizer is read,
    so that a broken ``config.json`` or a name missing from the offline cache names ``--flag``).

    Raises:
        ConfigError: naming ``--flag``, the name and what to do.
    """
    from transformers import AutoConfig

    from ..hub import hub_offline

    check_folder_or_hub(flag, name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        if hub_offline() and not Path(name).exists():
            raise ConfigError(f"--{flag}={name!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                              "download it on a machine with network (save_pretrained) and pass the folder, or "
                              "unset HF_HUB_OFFLINE") from None
        raise ConfigError(f"--{flag}={name!r}: not a usable model config ({str(err).splitlines()[0][:300]})") from None


def config_for_model_type(model_type: str):
    """A default config of a registered architecture.

    Raises:
        ConfigError: unknown model type, naming the close ones.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see transformers' CONFIG_MAPPING for the names"
        raise ConfigError(f"--model_type={model_type!r}: not a transformers architecture; {hint}")
    return AutoConfig.for_model(model_type)


def _rederive(config) -> None:
    """Recompute what a config's ``__init__`` derives from its settings (DeepSeek-V3's ``head_dim`` is
    its ``qk_rope_head_dim``): rebuilt from the settings that differ from the defaults, as a config
    made with the overridden values would be. Left as it is when the class cannot be rebuilt so."""
    try:
        defaults = type(config)().to_dict()
        rebuilt = type(config)(**{k: v for k, v in config.to_dict().items()
                                  if k in defaults and defaults[k] != v and not k.startswith("_")})
    except Exception:  # noqa: BLE001  a config class with other construction rules: keep the overrides as set
        return
    for key, value in rebuilt.to_dict().items():
        if not key.startswith("_") and getattr(config, key, None) != value:
            setattr(config, key, value)


def apply_overrides(config, overrides: str | None) -> None:
    """``--config_overrides k=v,k2=v2`` on a transformers config (its values' types are kept).

    Raises:
        ConfigError: a key the config does not have, or a value of the wrong kind.
    """
    if not overrides:
        return
    for item in overrides.split(","):
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--config_overrides {item!r}: expected key=value (several joined by commas)")
        if not hasattr(config, key.strip()):
            close = difflib.get_close_matches(key.strip(), list(config.to_dict()), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config_overrides: {config.model_type} configs have no key {key.strip()!r}{hint}")
    hidden, heads = first_attr(config, "hidden_size"), first_attr(config, "num_attention_heads")
    derived_head_dim = (getattr(config, "head_dim", None) is not None and bool(hidden) and bool(heads)
                        and config.head_dim == hidden // heads)
    try:
        config.update_from_string(overrides)
    except ValueError as err:
        raise ConfigError(f"--config_overrides={overrides!r}: {err}") from None
    given = {item.partition("=")[0].strip() for item in overrides.split(",")}
    _rederive(config)
    if derived_head_dim and "head_dim" not in given and given & {"hidden_size", "num_attention_heads"}:
        # head_dim was hidden_size // heads when the config was made: follow the new sizes, as a config
        # built with them would (update_from_string alone would keep the old value).
        hidden, heads = config.hidden_size, config.num_attention_heads
        if hidden % heads:
            raise ConfigError(f"--config_overrides {overrides!r}: hidden_size={hidden} is not divisible by "
                              f"num_attention_heads={heads} (use a multiple of {heads}, or give head_dim too)")
        config.head_dim = hidden // heads


def _decoder_layer_classes(config) -> list[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sorted(getattr(model, "_no_split_modules", None) or [])


def plan_hugging_face(args, tokenizer) -> ModelPlan:
    """A transformers causal LM from ``--model_name_or_path``, ``--config_name`` or ``--model_type``.

    Raises:
        ConfigError: naming the flag and what to do.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    notes = []
    if args.model_name_or_path:
        source, flag, name = "pretrained", "model_name_or_path", args.model_name_or_path
        config = load_auto_config(flag, name)
    elif args.config_name:
        source, flag, name = "config", "config_name", args.config_name
        config = load_auto_config(flag, name)
    else:
        source, flag, name = "config", "model_type", args.model_type
        config = config_for_model_type(name)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"--{flag}={name!r}: a {config.model_type} model is not a causal language model "
                          "transformers can build (AutoModelForCausalLM has no class for it)")
    apply_overrides(config, args.config_overrides)
    check_config(config, f"--{flag}={name!r}" + (f" with --config_overrides {args.config_overrides!r}"
                                                  if args.config_overrides else ""))
    overridden = {item.partition("=")[0].strip() for item in (args.config_overrides or "").split(",") if item}
    # A mixture of experts trains with its balance loss (transformers adds it to the loss only when asked).
    if hasattr(config, "output_router_logits") and "output_router_logits" not in overridden:
        config.output_router_logits = True
        notes.append("output_router_logits=True: the router's balance loss is part of the loss "
                     "(--config_overrides output_router_logits=false turns it off)")
    model_vocab = config.vocab_size
    resize_to = None
    if source == "pretrained":
        if args.vocab_size is not None and args.vocab_size < model_vocab:
            raise ConfigError(f"--vocab_size={args.vocab_size}: smaller than the model's {model_vocab} embedding rows; "
                              "leave it out (or give at least that many)")
        if args.vocab_size is not None and args.vocab_size > model_vocab:
            resize_to = args.vocab_size
        if tokenizer is not None and len(tokenizer) > (resize_to or model_vocab):
            raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but {name} has {model_vocab} embedding rows; "
                              f"pass --vocab_size {len(tokenizer)} (or more) to add rows (reported as newly "
                              f"initialised)")
    else:
        if "vocab_size" not in overridden:
            from ..data import vocab_size_for

            wanted = args.vocab_size or (vocab_size_for(tokenizer) if tokenizer is not None else config.vocab_size)
            config.vocab_size = wanted
        if tokenizer is not None and len(tokenizer) > config.vocab_size:
            raise ConfigError(f"--vocab_size={config.vocab_size}: the tokenizer has {len(tokenizer)} ids; give at "
                              "least that many (or leave --vocab_size out to follow the tokenizer)")
        if tokenizer is not None:  # generation stops at this tokenizer's EOS
            config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    if args.experts_implementation and args.experts_implementation != ENGINE:
        config._experts_implementation = args.experts_implementation
    shape = ModelShape.of(config)

    def build() -> nn.Module:
        model = (AutoModelForCausalLM.from_config(config) if source != "pretrained"
                 else _from_pretrained(name, config, resize_to, args.strict, plan,
                                       quantized=getattr(args, "load_in_4bit", False)))
        if args.experts_implementation in (None, ENGINE):  # a MoE's experts on our engine where it runs them
            why = use_engine(model)
            if why and args.experts_implementation == ENGINE:
                raise ConfigError(f"--experts_implementation={ENGINE}: {why}; choose grouped_mm, batched_mm or eager")
            if why:
                plan.notes.append(why)
        return model

    described = f"{config.model_type} " + ("from " + name if source == "pretrained" else
                                            f"from config {name}" if flag == "config_name" else "(fresh)")
    plan = ModelPlan(source, described, config, build, shape, _decoder_layer_classes(config), notes,
                     family=HUGGING_FACE)
    return plan


def _from_pretrained(name: str, config, resize_to: int | None, strict: bool, plan: ModelPlan,
                     quantized: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..checkpoint import LoadReport

    from safetensors import SafetensorError

    try:
        extra = {}
        if quantized:  # QLoRA: the frozen base in 4 bits (checked for a CUDA device before any work)
            from .lora import quantization_config

            extra = {"quantization_config": quantization_config("cuda"),
                     "device_map": {"": torch.cuda.current_device()}}
        model, info = AutoModelForCausalLM.from_pretrained(name, config=config, output_loading_info=True,
                                                           ignore_mismatched_sizes=not strict, **extra)
    except (SafetensorError, EnvironmentError, ValueError) as err:  # a truncated or damaged weights file
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        hint = ("the weights file is truncated or damaged: copy or download the model folder again"
                if isinstance(err, SafetensorError) else "check the folder's files (or the name on the Hub)")
        raise ConfigError(f"--model_name_or_path={name!r}: the model cannot be loaded ({first}); {hint}") from None
    loaded = sorted(set(model.state_dict()) - set(info["missing_keys"]) - {k for k, *_ in info["mismatched_keys"]})
    report = LoadReport(loaded=loaded, missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]),
                        mismatched=[(k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]])
    if resize_to is not None:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(resize_to, mean_resizing=False)
        report.resized = [(n, old, resize_to) for n in ("input embeddings", "output head")]
    if strict and (not report.exact or resize_to is not None):
        raise ConfigError(f"--strict: the weights of {name} and the model differ:\n{report}")
    plan.load_report = report
    return model


# ------------------------------------------------------------------------ your own nn.Module
def custom_config_json(config, model_class) -> dict:
    """``config.json`` for a checkpoint of your own module: its class and its config's fields."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    json.dumps(fields)  # must be plain JSON: raises TypeError naming the value otherwise
    qualified = f"{model_class.__module__}:{model_class.__qualname__}" if model_class is not None else None
    return {"model_type": CUSTOM_KEY, "architectures": [qualified] if qualified else [],
            CUSTOM_KEY: {"class": qualified, "config": fields}}


def override_custom_config(config, overrides: str):
    """``--config_overrides k=v,...`` on your own module's config (a dataclass or a dict): values are
    read as JSON (numbers, true/false) or else kept as text; a copy is returned.

    Raises:
        ConfigError: a key the config does not have, naming the keys it has.
    """
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    changes = {}
    for item in overrides.split(","):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ConfigError(f"--config_overrides {item!r}: expected key=value (several joined by commas)")
        if key not in fields:
            raise ConfigError(f"--config_overrides: this module's config has no key {key!r} (it has "
                              f"{', '.join(sorted(fields))})")
        try:
            changes[key] = json.loads(text)
        except ValueError:
            changes[key] = text
    return dataclasses.replace(config, **changes) if dataclasses.is_dataclass(config) else {**fields, **changes}


def plan_custom(model_factory: Callable, config, args) -> ModelPlan:
    """Your own module: ``model_factory(config)`` builds it; ``forward(input_ids, labels=None)`` returns
    the loss (a tensor, or an object or dict with ``loss``).

    Raises:
        ConfigError: Hugging Face model flags or a preset given with a module of your own.
    """
    given = [f"--{n}" for n in ("preset", "model_name_or_path", "config_name", "model_type")
             if getattr(args, n, None)]
    if given:
        raise ConfigError(f"{', '.join(given)}: this recipe trains its own module "
                          f"({getattr(model_factory, '__name__', model_factory)}); "
                          "its config is in the recipe")
    if getattr(args, "config_overrides", None):
        config = override_custom_config(config, args.config_overrides)
    try:
        custom_config_json(config, None)
    except TypeError as err:
        raise ConfigError(f"the model config of this recipe is not plain JSON ({err}); use numbers, strings, lists "
                          "and dicts in its fields") from None
    layers = list(getattr(model_factory, "no_split_modules", None) or getattr(model_factory, "_no_split_modules",
                                                                              None) or [])
    name = getattr(model_factory, "__qualname__", type(model_factory).__name__)
    return ModelPlan("custom", name, config, lambda: model_factory(config), ModelShape.of(config), layers,
                     model_class=model_factory if isinstance(model_factory, type) else None, family=CUSTOM)


def plan_model(model_args, tokenizer, presets: dict | None = None, model_factory=None,
               model_config=None) -> ModelPlan:
    """Which model this run trains, decided (and checked) before any data work: your own module
    (``model_factory`` and ``model_config``), a transformers model (``--model_name_or_path``,
    ``--config_name``, ``--model_type``), or a preset of a registered family (``--preset``; with a
    recipe's own ``presets``, of the family that has those names).

    Raises:
        ConfigError: naming the flag and what to do.
    """
    if model_factory is not None:
        return plan_custom(model_factory, model_config, model_args)
    if model_args.hugging_face:
        return plan_hugging_face(model_args, tokenizer)
    if model_args.config_overrides:
        raise ConfigError("--config_overrides: changes a Hugging Face config or your own module's; give "
                          "--model_name_or_path, --config_name or --model_type (presets are changed in "
                          "accel_trainer/models/presets.py)")
    return plan_preset(model_args.preset or "tiny", model_args.vocab_size, tokenizer, presets)


# ------------------------------------------------------------------------- a family's preset
def plan_preset(preset: str, vocab_size: int | None, tokenizer, presets: dict | None = None,
                family: ModelFamily | str | None = None) -> ModelPlan:
    """``--preset preset`` of the family that has it (or of ``family``, with a recipe's own ``presets``).

    Args:
        vocab_size: ``--vocab_size`` (None: the tokenizer's, rounded up).

    Raises:
        ConfigError: an unknown preset, or a vocabulary smaller than the tokenizer's.
    """
    if isinstance(family, str):
        family = family_named(family)
    if family is None:
        family = family_of_preset(preset) if presets is None or preset not in presets else None
        if family is None:  # a recipe's own table: the family of any of its names, else the default
            known = [family_of_preset(p) for p in presets if _has_preset(p)]
            family = known[0] if known else default_family()
    if vocab_size is None and tokenizer is not None:
        from ..data import vocab_size_for

        vocab_size = vocab_size_for(tokenizer)
    config = family.config_for_preset(preset, presets, **({"vocab_size": vocab_size} if vocab_size else {}))
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(f"--vocab_size={vocab_size}: the tokenizer has {len(tokenizer)} ids; give at "
                          "least that many (or leave --vocab_size out to follow the tokenizer)")
    check_config(config, "--preset " + preset)
    return ModelPlan("preset", f"preset {preset}", config, lambda: family.build(config), ModelShape.of(config),
                     list(getattr(family.model_class, "_no_split_modules", None) or []), family=family)


def _has_preset(name: str) -> bool:
    try:
        family_of_preset(name)
        return True
    except ConfigError:
        return False


def check_config(config, where: str) -> None:
    """What makes a config unbuildable, said before any work (not at the first step as a traceback).

    Raises:
        ConfigError: naming ``where`` (the flag), the keys and their values.
    """
    hidden = first_attr(config, "hidden_size", "n_embd", "d_model")
    heads = first_attr(config, "num_attention_heads", "n_head")
    kv = first_attr(config, "num_key_value_heads")
    explicit_head_dim = first_attr(config, "head_dim")
    problems = []
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value!r} must be a whole number >= 1")
    if not problems:
        if hidden and heads and not explicit_head_dim and hidden % heads:
            problems.append(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} (use a multiple "
                            f"of {heads}, e.g. {hidden // heads * heads or heads})")
        if heads and kv and heads % kv:
            problems.append(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")


def logits_of(output) -> torch.Tensor:
    """The logits a forward without labels returned: a tensor, or ``.logits`` / ``["logits"]``."""
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None:
        raise ConfigError(f"the model's forward(input_ids) returned {type(output).__name__} without logits; "
                          "return the logits (a tensor, or an object or dict with 'logits') when no labels are given")
    return logits


def loss_of(output) -> torch.Tensor:
    """The loss a model's forward returned: a tensor, or ``.loss`` / ``["loss"]``.

    Raises:
        ConfigError: there is none (the model must return its loss when given ``labels``).
    """
    loss = output if torch.is_tensor(output) else output.get("loss") if isinstance(output, dict) \
        else getattr(output, "loss", None)
    if torch.is_tensor(loss) and loss.ndim != 0:
        raise ConfigError(f"the model's forward(input_ids, labels) returned a tensor of shape {tuple(loss.shape)}, "
                          "not a loss; return the scalar loss (a tensor, or an object or dict with 'loss') when "
                          "labels are given")
    if loss is None:
        raise ConfigError(f"the model's forward(input_ids, labels) returned {type(output).__name__} without a loss; "
                          "return the loss (a tensor, or an object or dict with 'loss') when labels are given")
    return loss


def config_from_json(raw: dict, where: str = "config.json"):
    """A model config from a saved ``config.json``: our MoE's, any transformers architecture's.

    Raises:
        ConfigError: your own module's (its class is needed), or not a model config.
    """
    from transformers import AutoConfig

    kind = raw.get("model_type")
    if kind == CUSTOM_KEY:
        cls = (raw.get(CUSTOM_KEY) or {}).get("class", "?")
        raise ConfigError(f"{where}: describes your own module ({cls}); count it in Python with its class "
                          "(sum(p.numel() for p in model.parameters()))")
    family = default_family() if kind is None else family_of(raw)  # no type: an old checkpoint of ours
    try:
        if family.config_class is not None:
            return family.config_class.from_dict(raw)
        return AutoConfig.for_model(**raw)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where}: not a valid model config ({str(err).splitlines()[0][:200]})") from None


def build_on_meta(config) -> nn.Module:
    """The model ``config`` describes, on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    family = family_of(config)
    with torch.device("meta"):
        return family.build(config) if family.model_class is not None else AutoModelForCausalLM.from_config(config)

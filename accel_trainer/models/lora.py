"""LoRA fine-tuning through PEFT: adapters on a frozen base, and the base's identity.

A LoRA run's checkpoints hold the adapters (and their optimizer state) only: the base is named by
the path it was loaded from and a digest of its tensors as loaded, recorded in the run config under
:data:`LORA_KEY`. A resume, an export or ``load_model_for_inference`` loads the base again from that
path and refuses one whose digest differs (an edited or replaced base would silently put the adapters
on other weights). An export is what PEFT itself writes (``adapter_config.json`` +
``adapter_model.safetensors``, loaded by ``PeftModel.from_pretrained(base, folder)``) or, merged,
a plain model folder of the base's class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

#: The run config's key for ``{"base": {"path", "content_xxh3_128"}, "peft_config": {...}}``.
LORA_KEY = "lora"
#: What PEFT names an adapter folder's config (our checkpoints never hold it; exports do).
ADAPTER_CONFIG = "adapter_config.json"


def require_peft():
    """The ``peft`` package, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora_r: LoRA needs the peft package; pip install 'accel_trainer[lora]'") from None
    return peft


def quantization_config(device_type: str):
    """``--load_in_4bit``: transformers' ``BitsAndBytesConfig`` for a QLoRA base (NF4, bf16 compute).

    Raises:
        ConfigError: no CUDA device, or bitsandbytes not installed.
    """
    if device_type != "cuda":
        raise ConfigError("--load_in_4bit: QLoRA's 4-bit base runs on CUDA GPUs only (bitsandbytes); on this "
                          f"{device_type.upper()} machine drop --load_in_4bit (LoRA on the full-precision base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--load_in_4bit: needs the bitsandbytes package; pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def base_digest(model: nn.Module) -> str:
    """xxh3-128 of a model's tensors as loaded (names, dtypes, shapes, bytes; tied ones once): what
    the base *is*, wherever its files lie and whatever format they are in."""
    import xxhash

    hasher, seen = xxhash.xxh3_128(), set()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen and tensor.numel():
            continue  # a tied tensor (the output head sharing the embeddings) is one tensor
        seen.add(key)
        t = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the tensor's own memory, not a copy of it
            hasher.update(t.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def lora_config(r: int, alpha: float | None, dropout: float, targets: list[str] | None):
    """PEFT's ``LoraConfig`` for the flags (``all-linear`` when no targets are named)."""
    peft = require_peft()
    names = list(targets or ["all-linear"])
    return peft.LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                           target_modules="all-linear" if names == ["all-linear"] else names,
                           task_type="CAUSAL_LM", bias="none")


def apply_lora(model: nn.Module, config, base_path: str) -> tuple[nn.Module, dict]:
    """Wrap ``model`` (the loaded base) with fresh LoRA adapters; every base weight is frozen.

    Returns:
        ``(peft_model, record)``: the record goes into the run config under :data:`LORA_KEY`.

    Raises:
        ConfigError: a target module the model does not have (PEFT's message, naming it).
    """
    peft = require_peft()
    record = {"base": {"path": str(base_path), "content_xxh3_128": base_digest(model)},
              "peft_config": _plain(config)}
    if getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"--lora_target_modules: {str(err).splitlines()[0][:300]}") from None
    return wrapped, record


def _plain(config) -> dict:
    """A LoraConfig as JSON values (sets become sorted lists)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if hasattr(value, "value"):  # enums (task_type, peft_type)
            value = value.value
        out[key] = value
    return out


def check_same_base(saved: dict, digest: str, path: str, where: str) -> None:
    """Refuse a base whose tensors (``digest``, as loaded from ``path``) are not those the adapters of
    ``saved`` (a run config's :data:`LORA_KEY` record) were trained on.

    Raises:
        CheckpointError: naming the checkpoint, both paths and both digests.
    """
    base = saved.get("base") or {}
    if base.get("content_xxh3_128") != digest:
        raise CheckpointError(f"{where}: its LoRA adapters were trained on the base {base.get('path')!r} (content "
                              f"{base.get('content_xxh3_128')}), and the base at {path!r} has content {digest} "
                              "(changed or replaced since); put the original base back there, or start a new run "
                              "(--output_dir) to adapt this one")


def load_lora_checkpoint(folder: Path, record: dict, adapter_state: dict, device, dtype) -> nn.Module:
    """A LoRA checkpoint as a PEFT model: the base from its recorded path (checked by digest), fresh
    adapters of the recorded config, then the checkpoint's adapter tensors.

    Raises:
        CheckpointError: the base is missing or changed, or the adapters do not fit it.
    """
    peft = require_peft()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = (record.get("base") or {}).get("path")
    try:
        # The checkpoint's own config.json: the base's as the run trained it (--config_overrides included).
        config = AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None
        base = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: a LoRA checkpoint, and its base {path!r} cannot be loaded "
                              f"({str(err).splitlines()[0][:200]}); put the base back at that path") from None
    check_same_base(record, base_digest(base), path, str(folder))
    config = peft.LoraConfig(**{k: v for k, v in record["peft_config"].items()
                                if k in peft.LoraConfig.__dataclass_fields__})
    config.inference_mode = True
    model = peft.get_peft_model(base, config)
    own = dict(model.state_dict())
    missing = sorted(k for k in own if ".lora_" in k and k not in adapter_state)
    unexpected = sorted(k for k in adapter_state if k not in own)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: its adapter tensors do not fit the LoRA model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, value in adapter_state.items():
            own[name].copy_(value)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device).eval()


def adapters_of_checkpoint(folder: Path, run_config: dict, weights: dict, device, dtype) -> nn.Module | None:
    """For ``load_model_for_inference``: a LoRA checkpoint as its PEFT model; None for any other."""
    record = run_config.get(LORA_KEY)
    return None if record is None else load_lora_checkpoint(folder, record, weights, device, dtype)


def is_lora(model: nn.Module) -> bool:
    """A PEFT model (adapters on a base)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def load_adapter_folder(folder: Path, device, dtype) -> nn.Module:
    """A PEFT adapter folder (an export, or PEFT's own ``save_pretrained``) on its base."""
    peft = require_peft()
    from transformers import AutoModelForCausalLM

    base_name = peft.PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    try:
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: a LoRA adapter on the base {base_name!r}, which cannot be loaded "
                              f"({str(err).splitlines()[0][:200]})") from None
    return peft.PeftModel.from_pretrained(base, str(folder)).to(device).eval()


def is_adapter_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(model: nn.Module, out: Path, tokenizer=None) -> list[str]:
    """PEFT's adapter folder of a (loaded) LoRA model: ``PeftModel.from_pretrained(base, out)`` reads it."""
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return sorted(p.name for p in Path(out).iterdir())


def merged(model: nn.Module) -> nn.Module:
    """The base with the adapters folded into its weights (a plain transformers model)."""
    return model.merge_and_unload()

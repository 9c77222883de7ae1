"""Export trained weights as a Hugging Face model folder, in a format the model's family offers.

Each family lists its formats (:attr:`accel_trainer.models.ModelFamily.export_formats`, the first is
the default): our MoE writes the stock Qwen2-MoE architecture (``qwen2_moe``, default) or its own
class (``accel_moe``); any transformers model is written as itself (``native``, its own
``save_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import fsync_tree
from .models import SHARD_BYTES, family_of_model


def ensure_new_folder(out: Path) -> None:
    """An export never overwrites: ``out`` must not exist or be empty (raises FileExistsError)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")


def export_model(model, out: Path, fmt: str | None = None, max_shard_bytes: int = SHARD_BYTES,
                 tokenizer=None) -> list[str]:
    """Write ``model`` (already in the wanted dtype) to the new folder ``out``, with ``tokenizer`` and
    a ``generation_config.json`` of its BOS/EOS/PAD when given, so that ``AutoTokenizer`` +
    ``AutoModelForCausalLM`` on the folder generate text that stops at EOS.

    ``fmt``: one of the model family's export formats (None: its default).

    Raises:
        ValueError: unknown ``fmt``, or one that does not apply to this model.
        FileExistsError: ``out`` exists and is not empty (an export never overwrites).
    """
    family = family_of_model(model)
    if not family.export_formats:
        raise ValueError(f"a {family.name} model has no Hugging Face folder format; load it with "
                         "load_model_for_inference(path, model_class=...)")
    fmt = fmt or family.default_format
    if fmt not in family.export_formats:
        raise ValueError(f"--format={fmt!r}: a {family.name} model is written as one of "
                         f"{', '.join(family.export_formats)} (leave --format out for {family.default_format})")
    ensure_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    family.export_formats[fmt](model, out, max_shard_bytes)
    if tokenizer is not None:
        from transformers import GenerationConfig

        tokenizer.save_pretrained(out)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    fsync_tree(out)
    return sorted(p.name for p in out.iterdir())

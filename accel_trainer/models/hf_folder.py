"""Hugging Face model folders: weights in ``model.safetensors`` or numbered shards with their index,
as ``save_pretrained`` writes them (for export formats that rename or reshape tensors)."""

from __future__ import annotations

import torch

from ..checkpoint import SafetensorsFile, write_json

SHARD_BYTES = 5 * 2**30  # the Hugging Face default shard size


def shard(tensors: dict[str, torch.Tensor], max_bytes: int = SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Split into files of at most ``max_bytes`` (a bigger tensor gets a file of its own), in key order."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current] if current else shards


def write_hf_weights(out, tensors: dict[str, torch.Tensor], max_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` as HF writes them."""
    parts = shard(tensors, max_bytes)
    if len(parts) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
        write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, part in zip(names, parts) for key in part}})
    for name, part in zip(names, parts):
        SafetensorsFile(part, metadata={"format": "pt"}).write(out / name, fsync=False)  # one fsync_tree after
    return names



__all__ = ["SHARD_BYTES", "shard", "write_hf_weights"]

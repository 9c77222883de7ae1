"""Build checkpoint-shaped folders by hand, for rule tests that need no training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from accel_trainer.checkpoint.io import write_json
from accel_trainer.checkpoint.layout import write_pointer
from accel_trainer.checkpoint.manifest import write_complete_marker, write_manifest

FAKE_ACCELERATOR = SimpleNamespace(num_processes=1, distributed_type="NO", mixed_precision="no",
                                   device=SimpleNamespace(type="cpu"))


def make_checkpoint(root: Path, step: int, payload: bytes = b"weights", complete: bool = True) -> Path:
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload * 10)
    write_json(folder / "trainer_state.json", {"global_step": step})
    if complete:
        write_complete_marker(folder, write_manifest(folder, step=step, reasons=["periodic"], sequence=step,
                                                     accelerator=FAKE_ACCELERATOR))
    return folder


def make_run(tmp: Path, steps: list[int], latest: int | None = None, best: int | None = None) -> Path:
    root = tmp / "checkpoints"
    for s in steps:
        make_checkpoint(root, s)
    if latest is not None:
        write_pointer(root, "latest", root / f"step-{latest}")
    if best is not None:
        write_pointer(root, "best", root / f"step-{best}")
    return root

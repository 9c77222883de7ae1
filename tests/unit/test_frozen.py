"""--freeze_params: frozen tensors take no gradient and no optimizer state, and checkpoints store them
once: each save links the previous checkpoint's file while their bytes are unchanged (verified first),
every checkpoint still complete on its own, retention deleting one never breaking another."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from accel_trainer.checkpoint import verify
from accel_trainer.run import main as run_main

QUICK = ["--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000", "--block_size", "64",
         "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_steps", "2", "--eval_steps", "0"]
FREEZE = ["--freeze_params", r"embed_tokens"]


def steps(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def on_disk(run) -> int:
    """Bytes the run's checkpoints take: a file linked from several checkpoints counts once."""
    seen = {}
    for p in (run / "checkpoints").rglob("*"):
        if p.is_file():
            seen[p.stat().st_ino] = p.stat().st_size
    return sum(seen.values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    assert run_main([*QUICK, *FREEZE, "--max_steps", "10", "--output_dir", str(root / "frozen")]) == 0
    assert run_main([*QUICK, *FREEZE, "--max_steps", "4", "--output_dir", str(root / "resumed")]) == 0
    assert run_main([*QUICK, *FREEZE, "--max_steps", "10", "--output_dir", str(root / "resumed"),
                     "--resume_from_checkpoint", "latest"]) == 0
    assert run_main([*QUICK, "--max_steps", "10", "--output_dir", str(root / "trained")]) == 0
    return root


def test_frozen_tensors_have_no_optimizer_state_and_never_change(runs):
    root = runs / "frozen" / "checkpoints"
    groups = json.loads((root / "step-10" / "optimizer.json").read_text())["optimizers"]
    names = {n for o in groups.values() for g in o["param_groups"] for n in g["param_names"]}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    first = load_file(root / "step-2" / "model.frozen.safetensors")
    assert list(first) == ["model.embed_tokens.weight"]
    assert "model.embed_tokens.weight" not in load_file(root / "step-10" / "model.safetensors")


def test_each_checkpoint_links_the_previous_frozen_file_and_verifies_on_its_own(runs):
    root = runs / "frozen" / "checkpoints"
    files = [root / f"step-{s}" / "model.frozen.safetensors" for s in (2, 4, 6, 8, 10)]
    assert len({f.stat().st_ino for f in files}) == 1 and files[0].stat().st_nlink == 5  # stored once
    assert all(verify(f.parent) == [] for f in files)
    # Four of the five copies cost nothing; and no optimizer state for the frozen tensors either.
    apparent = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert apparent - on_disk(runs / "frozen") == 4 * files[0].stat().st_size
    assert on_disk(runs / "frozen") < on_disk(runs / "trained") - 4 * files[0].stat().st_size


def test_a_resumed_run_equals_the_uninterrupted_one_and_links_across_the_restart(runs):
    assert steps(runs / "resumed") == steps(runs / "frozen")
    root = runs / "resumed" / "checkpoints"
    assert (root / "step-4" / "model.frozen.safetensors").stat().st_ino == \
        (root / "step-10" / "model.frozen.safetensors").stat().st_ino
    for name in ("model.safetensors", "optimizer.safetensors", "model.frozen.safetensors"):
        a, b = (r / "checkpoints" / "step-10" / name for r in (runs / "frozen", runs / "resumed"))
        assert a.read_bytes() == b.read_bytes(), name


def test_retention_deleting_older_checkpoints_never_breaks_the_newer(runs, tmp_path):
    import shutil

    from accel_trainer.checkpoint import prune

    run = tmp_path / "run"
    shutil.copytree(runs / "frozen", run)  # copytree copies: relink as a run would have them
    prune(run, keep_last=1)
    left = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert left == ["step-10"] and verify(run / "checkpoints" / "step-10") == []


def test_a_damaged_previous_frozen_file_is_written_afresh_not_linked(runs, tmp_path):
    """A link would carry bit rot into every new checkpoint: the previous file is checked first."""
    import shutil

    from safetensors.torch import load_file as read

    from accel_trainer.checkpoint.strategies import CONTENT_KEY, unchanged_in_previous
    from accel_trainer.checkpoint.stored_tensors import stored_metadata
    from accel_trainer.checkpoint.tensor_files import SafetensorsFile

    root = tmp_path / "checkpoints"
    shutil.copytree(runs / "frozen" / "checkpoints", root)
    latest = root / "step-10" / "model.frozen.safetensors"
    content = SafetensorsFile(read(latest)).digest()
    assert stored_metadata(latest)[CONTENT_KEY] == content
    assert unchanged_in_previous(root, "model.frozen.safetensors", content)[0] == latest
    assert unchanged_in_previous(root, "model.frozen.safetensors", "another content") is None
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0x01  # bit rot in the stored copy: same size, same header
    latest.unlink()  # (a file of its own: the others keep their intact copy)
    latest.write_bytes(bytes(data))
    assert unchanged_in_previous(root, "model.frozen.safetensors", content) is None


def test_compressed_frozen_files_are_linked_too_and_load(tmp_path):
    from accel_trainer.checkpoint import load_model_for_inference

    run = tmp_path / "run"
    assert run_main([*QUICK, *FREEZE, "--checkpoint_compression", "zstd", "--max_steps", "4",
                     "--output_dir", str(run)]) == 0
    a, b = (run / "checkpoints" / f"step-{s}" / "model.frozen.ztensors" for s in (2, 4))
    assert a.stat().st_ino == b.stat().st_ino and verify(b.parent) == []
    model, _, step = load_model_for_inference(run, device="cpu")
    assert step == 4 and not model.model.embed_tokens.weight.isnan().any()

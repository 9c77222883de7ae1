"""Level 1: the rules, on small hand-made folders (no training)."""

import pytest
from accel_trainer.checkpoint.io import CheckpointError, atomic_write_text
from accel_trainer.checkpoint.layout import (apply_retention, list_checkpoints, remove_stale_temporaries, resolve,
                                             resolve_path, select_for_deletion)
from accel_trainer.checkpoint.manifest import verify
from helpers_ckpt import make_checkpoint, make_run


def test_retention_keeps_newest_k_plus_protected_plus_multiples():
    steps = [10, 20, 30, 40, 50, 60]
    assert select_for_deletion(steps, keep_last=2, protected={20}) == [10, 30, 40]
    assert select_for_deletion(steps, keep_last=2, protected={20}, keep_every_n_steps=30) == [10, 40]
    assert select_for_deletion(steps, keep_last=None, protected=set()) == []


def test_retention_on_disk_never_deletes_latest_or_best(tmp_path):
    root = make_run(tmp_path, [1, 2, 3, 4, 5], latest=3, best=1)  # latest deliberately not the newest
    deleted = apply_retention(root, keep_last=1, keep_every_n_steps=None)
    assert sorted(p.name for p in deleted) == ["step-2", "step-4"]
    assert [s for s, _ in list_checkpoints(root)] == [1, 3, 5]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_incomplete_folders_are_not_checkpoints_and_temporaries_are_cleaned(tmp_path):
    root = make_run(tmp_path, [1])
    make_checkpoint(root, 2, complete=False)
    (root / ".tmp-step-3").mkdir()
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert resolve("latest", tmp_path).path.name == "step-1"
    assert [p.name for p in remove_stale_temporaries(root)] == [".tmp-step-3"]


def test_latest_follows_pointer_and_falls_back_past_a_corrupt_one_with_a_warning(tmp_path):
    root = make_run(tmp_path, [1, 2, 3], latest=3)
    assert resolve("latest", tmp_path).path.name == "step-3"
    weights = root / "step-3" / "model.safetensors"
    weights.write_bytes(b"X" + weights.read_bytes()[1:])  # same size, different bytes
    with pytest.warns(UserWarning, match="falls back to step-2.*step-3.*model.safetensors: checksum mismatch"):
        assert resolve("latest", tmp_path).path.name == "step-2"


def test_latest_without_checkpoints_means_fresh_start(tmp_path):
    assert resolve("latest", tmp_path).path is None


def test_named_step_or_best_that_does_not_exist_lists_what_exists(tmp_path):
    make_run(tmp_path, [5, 10], latest=10)
    with pytest.raises(CheckpointError, match=r"--resume_from_checkpoint='step-7': no such checkpoint; "
                                              r"available under .*: step-5, step-10 \(latest -> step-10\)"):
        resolve("step-7", tmp_path)
    with pytest.raises(CheckpointError, match="'best'.*no such checkpoint"):
        resolve("best", tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(str(tmp_path / "elsewhere"), tmp_path)


def test_paths_resolve_output_dir_best_and_step_folder(tmp_path):
    make_run(tmp_path, [5, 10], latest=10, best=5)
    assert resolve_path(tmp_path).path.name == "step-10"
    assert resolve_path(tmp_path / "best").path.name == "step-5"
    assert resolve_path(tmp_path / "checkpoints" / "best").path.name == "step-5"
    assert resolve_path(tmp_path / "checkpoints" / "step-5").path.name == "step-5"


def test_verify_names_the_missing_or_changed_file(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    assert verify(folder) == []
    (folder / "trainer_state.json").write_text("{}")
    assert "trainer_state.json: size" in verify(folder)[0]
    (folder / "model.safetensors").unlink()
    assert any("model.safetensors: missing" in p for p in verify(folder))


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step-1\n")
    atomic_write_text(target, "step-2\n")
    assert target.read_text() == "step-2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]

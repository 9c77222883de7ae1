"""What a fault-injection campaign found broken, one test each (issue: reliability): two runs in one
output dir, metadata that cannot be decoded, a manifest that was edited, a failure after the commit,
resume targets that are not checkpoints, another --block_size on resume, a context longer than the
model's, and a 'latest' pointer that is skipped without a word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from accel_trainer import load_model_for_inference
from accel_trainer.checkpoint import CheckpointError, verify
from accel_trainer.checkpoint.inspection import list_run
from accel_trainer.checkpoint.layout import read_pointer, resolve, resolve_latest_valid
from accel_trainer.checkpoint.lock import RunLock
from accel_trainer.cli import main as cli_main
from launching import TINY
from accel_trainer.faults import failing_disk
from helpers_ckpt import make_run
from loops import Loop

HOLD = """
import sys, time
from accel_trainer.checkpoint.lock import RunLock
RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def hold(folder):
    """Another process holding ``folder``'s run lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def held_dir(tmp_path_factory):
    """A run dir whose lock another process holds (killed with kill -9 at the end)."""
    folder = tmp_path_factory.mktemp("held")
    make_run(folder, [1, 2, 3], latest=3)
    proc = hold(folder)
    yield folder, proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ 1. two runs in one output dir
def test_a_second_run_refuses_before_any_work_naming_the_holder(held_dir, recipe_module, capsys):
    folder, holder = held_dir
    code = recipe_module.main([*TINY, "--max_steps", "2", "--output_dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {folder} is in use by another run (pid {holder.pid} on host" in err
    assert "tokenising" not in err and not (folder / "metrics.jsonl").exists()  # refused before any work
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]


def test_a_lock_left_by_a_killed_run_never_blocks(tmp_path):
    holder = hold(tmp_path)
    with pytest.raises(CheckpointError, match="is in use by another run"):
        RunLock.acquire(tmp_path)
    holder.kill()  # kill -9: no chance to clean up
    holder.wait()
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_readers_take_no_lock_and_prune_waits_for_the_run(held_dir, capsys):
    folder, _ = held_dir
    assert [r["name"] for r in list_run(folder)] == ["step-1", "step-2", "step-3"]
    assert cli_main(["verify", str(folder)]) == 0
    assert cli_main(["prune", str(folder), "--keep", "1"]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert (folder / "checkpoints" / "step-1").exists()


# --------------------------------------------------------- 2. metadata that cannot be decoded
@pytest.mark.parametrize("damage", ["manifest_bytes", "manifest_dir", "marker_bytes", "pointer_bytes", "pointer_dir",
                                    "pointer_outside", "pointer_missing_step"])
def test_undecodable_metadata_makes_a_candidate_invalid_never_a_traceback(tmp_path, damage):
    root = make_run(tmp_path, [1, 2], latest=2)
    newest = root / "step-2"
    if damage == "manifest_bytes":
        (newest / "manifest.json").write_bytes(b"\xff\xfe{not utf-8")
    elif damage == "manifest_dir":
        (newest / "manifest.json").unlink()
        (newest / "manifest.json").mkdir()
    elif damage == "marker_bytes":
        (newest / "COMPLETE").write_bytes(b"\x80\x81")
    elif damage == "pointer_bytes":
        (root / "latest").write_bytes(b"step-\xff2")
    elif damage == "pointer_dir":
        (root / "latest").unlink()
        (root / "latest").mkdir()
    elif damage == "pointer_outside":
        (root / "latest").write_text("../../../etc\n")
    elif damage == "pointer_missing_step":
        (root / "latest").write_text("step-999\n")
    if damage.startswith("pointer"):  # every checkpoint is fine: the newest is used, the pointer is named
        with pytest.warns(UserWarning, match=r"'latest' falls back to step-2: skipped .*latest"):
            assert resolve("latest", tmp_path).path == newest
        return
    assert verify(newest) and verify(root / "step-1") == []
    with pytest.warns(UserWarning, match=r"falls back to step-1: skipped step-2: "):
        assert resolve("latest", tmp_path).path == root / "step-1"
    assert list_run(tmp_path)[-1]["problem"] or damage == "marker_bytes"


def test_inspect_and_inference_of_damaged_metadata_fall_back_or_say_one_line(loop_pair, capsys):
    out, first, second = loop_pair
    (second / "manifest.json").write_bytes(b"\xff" * 10)
    assert cli_main(["inspect", str(second)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8" in err and "manifest.json" in err
    with pytest.warns(UserWarning, match="falls back to step-2"):
        _, _, step = load_model_for_inference(out, device="cpu")
    assert step == 2


@pytest.fixture
def loop_pair(tmp_path):
    """A real tiny transformers run with checkpoints at steps 2 and 4."""
    loop = Loop(tmp_path)
    loop.train(2)
    first = loop.ckpt.save(2)
    loop.train(2)
    second = loop.ckpt.save(4)
    loop.ckpt.close()
    return tmp_path, first, second


# --------------------------------------------------------------- 3. the manifest is verified too
@pytest.mark.parametrize("edit", ["empty_file_list", "one_entry_dropped", "marker_count"])
def test_an_edited_manifest_or_marker_invalidates_the_checkpoint(loop_pair, edit):
    out, _, folder = loop_pair
    manifest = json.loads((folder / "manifest.json").read_text())
    if edit == "marker_count":
        marker = json.loads((folder / "COMPLETE").read_text())
        (folder / "COMPLETE").write_text(json.dumps({**marker, "files": marker["files"] - 1}))
    else:
        manifest["files"] = {} if edit == "empty_file_list" else dict(list(manifest["files"].items())[1:])
        (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "model.safetensors").write_bytes(b"\0" * (folder / "model.safetensors").stat().st_size)  # corrupt weights
    problems = verify(folder)
    assert problems and ("manifest" in problems[0] or "COMPLETE" in problems[0]), problems
    with pytest.warns(UserWarning, match="falls back to step-2"):
        assert resolve_latest_valid(out / "checkpoints").path.name == "step-2"


# ------------------------------------------------------------- 5. a failure after the commit
def test_a_pointer_that_cannot_move_is_reported_as_saved_and_latest_still_finds_it(loop, tmp_path):
    a = loop()
    a.ckpt.save(1, metrics={"val_loss": 2.0})
    with failing_disk(f".tmp-latest-{os.getpid()}"), pytest.warns(UserWarning) as warned:
        folder = a.ckpt.save(2, metrics={"val_loss": 1.0})
    message = str(warned[-1].message)
    assert folder == tmp_path / "checkpoints" / "step-2"
    assert "is saved, but moving 'latest' to step-2 failed (No space left on device)" in message
    assert "still finds it" in message
    root = tmp_path / "checkpoints"
    assert read_pointer(root, "latest").name == "step-1" and read_pointer(root, "best").name == "step-2"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]
    with pytest.warns(UserWarning, match="'latest' pointer names the older step-1"):
        assert resolve("latest", tmp_path).path == folder
    a.ckpt.save(3)
    assert read_pointer(root, "latest").name == "step-3"  # the next save moves it


# ------------------------------------------ 6, 7, 9. what a resume is given, checked before work
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, recipe_module):
    out = tmp_path_factory.mktemp("tiny_run")
    assert recipe_module.main([*TINY, "--max_steps", "3", "--save_steps", "3", "--eval_steps", "0",
                               "--output_dir", str(out)]) == 0
    return out


def resume_with(recipe_module, capsys, out, *extra):
    code = recipe_module.main([*TINY, "--max_steps", "4", "--eval_steps", "0", "--output_dir", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("target", ["a_file", "a_plain_folder", "a_missing_path"])
def test_resume_from_something_that_is_not_a_checkpoint_is_one_line_before_any_work(
        tiny_run, tmp_path, recipe_module, capsys, target):
    path = tmp_path / target
    if target == "a_file":
        path.write_text("weights?")
    elif target == "a_plain_folder":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    code, _, err = resume_with(recipe_module, capsys, tmp_path / "out", "--resume_from_checkpoint", str(path))
    assert code == 2 and "tokenising" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume_from_checkpoint=")
    expect = {"a_file": "is a file, not a checkpoint folder (no manifest.json/COMPLETE)",
              "a_plain_folder": "is a folder, not a checkpoint folder (no manifest.json/COMPLETE)",
              "a_missing_path": "does not exist"}[target]
    assert expect in lines[0]


def test_resume_with_another_block_size_is_refused_unless_the_data_position_is_reset(tiny_run, recipe_module, capsys):
    code, _, err = resume_with(recipe_module, capsys, tiny_run, "--resume_from_checkpoint", "latest", "--block_size",
                               "32")
    assert code == 2 and "tokenising" not in err
    assert "--block_size: 64 -> 32" in err and "--reset_data_position" in err
    code, out, _ = resume_with(recipe_module, capsys, tiny_run, "--resume_from_checkpoint", "latest", "--block_size",
                               "32", "--reset_data_position")
    assert code == 0 and "--reset_data_position: the data starts from its beginning" in out
    position = json.loads((tiny_run / "checkpoints" / "step-4" / "dataloader.json").read_text())
    assert (position["epoch"], position["samples_in_epoch"]) == (0, 4)  # one step of the new data


def test_a_block_size_longer_than_the_models_context_is_refused_at_once(recipe_module, capsys, tmp_path):
    code = recipe_module.main([*TINY, "--block_size", "100000", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "tokenising" not in err
    assert "--block_size=100000: longer than the model's context (preset tiny: 1024 positions)" in err


# ------------------------------------------------------ 10. no pointer is skipped without a word
def test_a_latest_pointer_to_an_incomplete_folder_is_named_with_the_one_used(tmp_path):
    root = make_run(tmp_path, [1, 2], latest=2)
    (root / "step-3").mkdir()  # a save that never finished
    (root / "latest").write_text("step-3\n")
    with pytest.warns(UserWarning, match=r"'latest' falls back to step-2: skipped .*latest names step-3, which is not "
                                         r"a complete checkpoint"):
        assert resolve("latest", tmp_path).path.name == "step-2"


def test_the_lock_file_says_who_holds_it(held_dir):
    folder, holder = held_dir
    info = json.loads((folder / ".lock").read_text())
    assert info["pid"] == holder.pid and "-c" in info["command"] and info["started_unix"] <= time.time()


def test_a_damaged_config_of_the_newest_checkpoint_falls_back_before_any_work(tmp_path, recipe_module, capsys):
    """Found by the fault campaign: the check made before tokenising read config files that only
    their size had vouched for; a flipped byte there ended the run instead of falling back."""
    assert recipe_module.main([*TINY, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "0",
                               "--output_dir", str(tmp_path)]) == 0
    path = tmp_path / "checkpoints" / "step-4" / "run_config.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    code, out, err = resume_with(recipe_module, capsys, tmp_path, "--resume_from_checkpoint", "latest", "--max_steps",
                                 "5")
    assert code == 0, err
    assert "checkpoints/step-2: step 2" in out  # resumed from the older, intact checkpoint

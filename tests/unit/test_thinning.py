"""--full_state_total_limit: weights-only history. The newest checkpoints and best keep everything,
older ones keep their weights (bitwise), verify on their own, are listed as weights-only and resume
only with --reset_optimizer; a kill between the rewrite's renames is finished by the next save."""

from __future__ import annotations

import json
import os

import pytest

from accel_trainer.checkpoint import verify
from accel_trainer.cli import main as cli_main
from accel_trainer.run import main as run_main

QUICK = ["--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000", "--block_size", "64",
         "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_steps", "2", "--eval_steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinning")
    assert run_main([*QUICK, "--max_steps", "8", "--output_dir", str(root / "full")]) == 0
    assert run_main([*QUICK, "--max_steps", "8", "--full_state_total_limit", "1", "--output_dir",
                     str(root / "thin")]) == 0
    return root


def files(folder):
    return set(json.loads((folder / "manifest.json").read_text())["files"])


def test_older_checkpoints_become_weights_only_keeping_their_weights_bitwise(runs, capsys):
    thin, full = runs / "thin" / "checkpoints", runs / "full" / "checkpoints"
    best = (thin / "best").read_text().strip()
    for step in (2, 4, 6, 8):
        name = f"step-{step}"
        assert verify(thin / name) == [], name
        assert (thin / name / "model.safetensors").read_bytes() == (full / name / "model.safetensors").read_bytes()
        manifest = json.loads((thin / name / "manifest.json").read_text())
        if name in ("step-8", best):  # latest and best keep the whole state
            assert files(thin / name) == files(full / name) and "weights_only" not in manifest
        else:
            assert "optimizer.safetensors" not in files(thin / name) and not (thin / name / "optimizer.json").exists()
            assert not (thin / name / "dataloader.json").exists() and not list((thin / name).glob("random_states_*"))
            assert {"model.safetensors", "config.json", "trainer_state.json"} <= files(thin / name)
            assert "optimizer.safetensors" in manifest["weights_only"]["dropped"]
    capsys.readouterr()
    assert cli_main(["list", str(runs / "thin")]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    thinned = [n for n in ("step-2", "step-4", "step-6") if n != best]
    assert all("weights-only" in rows[n] for n in thinned) and "weights-only" not in rows["step-8"]
    assert cli_main(["inspect", str(thin / thinned[0])]) == 0
    assert "weights-only (--full_state_total_limit dropped" in capsys.readouterr().out
    size = sum(p.stat().st_size for p in thin.rglob("*") if p.is_file())
    assert size < 0.75 * sum(p.stat().st_size for p in full.rglob("*") if p.is_file())


def test_a_weights_only_checkpoint_resumes_only_with_reset_optimizer(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "thin", run)
    best = (run / "checkpoints" / "best").read_text().strip()
    thinned = next(n for n in ("step-2", "step-4", "step-6") if n != best)
    capsys.readouterr()
    code = run_main([*QUICK, "--max_steps", "10", "--output_dir", str(run), "--resume_from_checkpoint", thinned])
    err = capsys.readouterr().err
    assert code == 2 and "is weights-only" in err and "--reset_optimizer" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    code = run_main([*QUICK, "--max_steps", "10", "--output_dir", str(run), "--resume_from_checkpoint", thinned,
                     "--reset_optimizer"])
    out = capsys.readouterr().out
    assert code == 0 and "is weights-only: loading its weights and counters" in out
    assert f"continuing at step {int(thinned[5:]) + 1}" in out


def test_a_kill_between_the_rewrites_renames_is_finished_by_the_next_save(runs, tmp_path, monkeypatch):
    import shutil

    import accel_trainer.checkpoint.rewrite as rewrite
    from accel_trainer.checkpoint.thinning import thin_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    root = run / "checkpoints"
    real_rename, calls = os.rename, []

    def dies_after_the_first(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends here
        real_rename(src, dst)

    monkeypatch.setattr(rewrite.os, "rename", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        thin_checkpoint(root / "step-2")
    monkeypatch.setattr(rewrite.os, "rename", real_rename)
    assert not (root / "step-2").exists() and (root / ".rewritten-step-2").is_dir()
    # The next run's first save finishes the rewrite (and thins on by its own limit).
    assert run_main([*QUICK, "--max_steps", "10", "--output_dir", str(run), "--resume_from_checkpoint", "latest",
                     "--full_state_total_limit", "2"]) == 0
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("step-")) == ["best", "latest"]
    for step in (2, 4, 6, 8, 10):
        assert verify(root / f"step-{step}") == [], step
    assert "weights_only" in json.loads((root / "step-2" / "manifest.json").read_text())
    assert "weights_only" not in json.loads((root / "step-10" / "manifest.json").read_text())

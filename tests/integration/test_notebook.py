"""notebooks/load_and_generate.ipynb runs end to end against a checkpoint this test makes."""


import pytest

from launching import REPO, TINY, launch_here



def test_notebook_finds_the_demo_run_generates_and_plots_without_writing_into_it(tmp_path, monkeypatch):
    """Started from notebooks/ (as `jupyter lab` in that folder would), with no variable set, it finds
    ../runs/demo; model.generate continues both prompts of a left-padded batch; the run is unchanged."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = tmp_path / "runs" / "demo"
    launch_here([*TINY, "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "1",
            "--output_dir", str(run)])
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv("ACCEL_TRAINER_RUN", raising=False)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    notebook = nbformat.read(REPO / "notebooks" / "load_and_generate.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    data = [o.get("data", {}) for c in notebook.cells for o in c.get("outputs", [])]
    assert "step 6, device" in text and "eval mode: True" in text
    assert "loaded 29 tensors by name" in text
    generated = [line for line in text.splitlines() if line.startswith("GENERATED: ")]
    assert len(generated) == 2 and "'def main(" in generated[0] and "'import " in generated[1], generated
    assert all(len(line) > len("GENERATED: 'import '") + 10 for line in generated)  # it did generate
    assert any("image/png" in d for d in data)
    assert any("accel_moe" in d.get("text/plain", "") for d in data)  # the config is displayed
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_plot_command_writes_png(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("matplotlib")
    launch_here([*TINY, "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path)])
    proc = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "plot", str(tmp_path), "--out",
                           str(tmp_path / "curves.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "accel_trainer.cli", "plot", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_resumed_run_continues_the_same_tensorboard_run(tmp_path):
    """Crash after step 6 with the last checkpoint at 4: the resumed run logs into the same folder and
    steps 5-6 are replaced, not duplicated."""
    import json
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*TINY, "--max_steps", "6", "--save_steps", "4", "--eval_steps", "0", "--logging_steps", "1",
            "--report_to", "tensorboard", "--run_name", "exp1", "--output_dir", str(tmp_path)]
    launch_here(args)
    shutil.rmtree(tmp_path / "checkpoints" / "step-6")
    (tmp_path / "checkpoints" / "latest").write_text("step-4\n")
    launch_here([*args[:-4], "--run_name", "other", "--output_dir", str(tmp_path),
                 "--resume_from_checkpoint", "latest"])
    state = json.loads((tmp_path / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["trackers"]["run_name"] == "exp1"
    runs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name not in ("checkpoints", "data")]
    assert [p.name for p in runs] == ["exp1"]
    assert len(list((tmp_path / "exp1").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tmp_path / "exp1"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """W&B (offline, as CI has no network): the run id is saved in the checkpoint and a resumed run
    re-opens that same run."""
    import json

    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
           "WANDB_ERROR_REPORTING": "false"}
    (tmp_path / "wb").mkdir()
    args = [*TINY, "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "1", "--report_to", "wandb",
            "--output_dir", str(tmp_path / "run")]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    launch_here([*args, "--max_steps", "4"])
    launch_here([*args, "--max_steps", "6", "--resume_from_checkpoint", "latest"])
    saved = [json.loads((tmp_path / "run" / "checkpoints" / f"step-{s}" / "trainer_state.json").read_text())
             for s in (4, 6)]
    run_id = saved[0]["trackers"]["wandb_run_id"]
    assert run_id and saved[1]["trackers"]["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs

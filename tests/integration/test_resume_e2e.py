"""Level 3: bit-exact resume in fresh processes, real kill -9, real SIGTERM, and the resume options."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accel_trainer.checkpoint.layout import read_pointer
from accel_trainer.checkpoint.manifest import MANIFEST, write_complete_marker
from accel_trainer.checkpoint.io import write_json
from accel_trainer.checkpoint.checksums import HASH, hash_file
from launching import (REPO, RUN, STEPS, TINY, assert_same_final_state, launch, launch_here, popen_launch, popen_recipe,
                       read_jsonl, run_pids, wait_for)



def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    launch_here([*RUN, "--output_dir", str(out), "--save_total_limit", "2", "--keep_every_n_steps", "12"])
    return out


def test_straight_run_layout_retention_and_pointers(straight):
    root = straight / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in root.glob("step-*"))
    best = read_pointer(root, "best")
    assert read_pointer(root, "latest").name == f"step-{STEPS}"
    assert steps == sorted({21, 24, 12, int(best.name[5:])})  # newest 2, multiples of 12, best
    files = set(json.loads((root / f"step-{STEPS}" / MANIFEST).read_text())["files"])
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json", "dataloader.json",
            "config.json", "run_config.json", "random_states_0.pkl"} <= files
    # Named state only: Accelerate's positional optimizer file and a second copy of the RNG are not written.
    assert not files & {"optimizer.bin", "scheduler.bin", "rng_state_0.pt", "pytorch_model.bin"}
    assert not list(root.glob(".tmp-*"))


def test_kill_9_during_training_then_resume_is_bit_exact(straight, tmp_path):
    proc = popen_recipe(RUN, tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-6" / "COMPLETE", proc)
    time.sleep(0.15)  # land somewhere in the next steps or the next save
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert latest is not None and (latest / "COMPLETE").exists()
    resumed = launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert f"resumed from {latest}" in resumed.stdout
    assert_same_final_state(straight, tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_async_save_kill_9_then_resume_is_bit_exact(straight, tmp_path):
    """Background writes, compressed (zstd in the writer thread): killed at any moment, 'latest' is
    complete; the result equals uncompressed sync saves, tensor for tensor."""
    run = [*RUN, "--async_save", "--checkpoint_compression", "zstd"]
    proc = popen_recipe(run, tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-9" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert latest is not None and (latest / "COMPLETE").exists() and (latest / "model.ztensors").is_file()
    launch_here([*run, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert_same_final_state(straight, tmp_path)


def test_sigterm_saves_emergency_checkpoint_and_exits_cleanly(straight, tmp_path):
    proc = popen_recipe(RUN, tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-3" / "COMPLETE", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "Traceback" not in output
    assert "training stopped by SIGTERM" in output and "--resume_from_checkpoint latest" in output
    stopped_at = int(re.search(r"training stopped by SIGTERM at step (\d+)", output).group(1))
    assert 3 <= stopped_at < STEPS
    # The step it stopped at is saved: as an emergency checkpoint, or already by a periodic/best save.
    assert read_pointer(tmp_path / "checkpoints", "latest").name == f"step-{stopped_at}"
    assert f"stopped at step {stopped_at} of {STEPS} by SIGTERM" in output  # the run's report
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["exit_code"] == 143 and status["step"] == stopped_at and status["reason"] == "SIGTERM"
    launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert_same_final_state(straight, tmp_path)


def test_corrupt_newest_checkpoint_is_skipped_for_latest(straight, tmp_path):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "checkpoints" / f"step-{STEPS}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert "falls back to step-21" in proc.stderr and "model.safetensors: checksum mismatch" in proc.stderr
    assert_same_final_state(straight, tmp_path)


def _copy_checkpoint(straight: Path, dest: Path, step: int) -> Path:
    folder = dest / "checkpoints" / f"step-{step}"
    shutil.copytree(straight / "checkpoints" / f"step-{step}", folder)
    (dest / "checkpoints" / "latest").write_text(f"step-{step}\n")
    return folder


def _reseal(folder: Path, name: str) -> None:
    """Rewrite a file's manifest entry and the marker, as an attacker who knows the format would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name].update({"size": (folder / name).stat().st_size, HASH: hash_file(folder / name)})
    write_json(folder / MANIFEST, manifest)
    write_complete_marker(folder, manifest)


def test_malicious_state_file_is_refused_and_runs_nothing(straight, tmp_path):
    folder = _copy_checkpoint(straight, tmp_path, 12)
    marker = tmp_path / "pwned"
    payload = f"import os, torch\nclass E:\n    def __reduce__(self): return (os.system, ('touch {marker}',))\n" \
              f"torch.save({{'torch_manual_seed': E()}}, '{folder / 'random_states_0.pkl'}')\n"
    subprocess.run([sys.executable, "-c", payload], check=True)
    _reseal(folder, "random_states_0.pkl")
    proc = launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode == 2
    assert "random_states_0.pkl: refused: its pickle references ['posix.system']" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_architecture_change_is_an_error_and_init_from_loads_weights_only(straight, tmp_path):
    folder = _copy_checkpoint(straight, tmp_path / "other", 12)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    _reseal(folder, "config.json")
    proc = launch_here([*RUN, "--output_dir", str(tmp_path / "other"), "--resume_from_checkpoint", "latest"],
                       check=False)
    assert proc.returncode == 2
    assert "num_experts: checkpoint 8 vs this run 4" in proc.stderr and f"--init_from {folder}" in proc.stderr
    fresh = launch_here([*TINY, "--max_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path / "new"),
                    "--init_from", str(straight / "checkpoints" / "step-12")])
    assert "loaded" in fresh.stdout and "starting at step 0" in fresh.stdout


def test_lower_learning_rate_on_resume_is_reported_and_applied(straight, tmp_path):
    _copy_checkpoint(straight, tmp_path, 12)
    shutil.copy(straight / "metrics.jsonl", tmp_path / "metrics.jsonl")
    proc = launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "step-12",
                   "--learning_rate", "0.001", "--muon_learning_rate", "0.01"])
    assert "learning_rate: 0.003 -> 0.001" in proc.stdout and "muon_learning_rate: 0.02 -> 0.01" in proc.stdout
    old = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl")}
    new = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert new[12] == old[12]  # history before the resume point is kept as it was
    for step in (13, 20, 24):
        assert new[step]["lr/adamw"] == pytest.approx(old[step]["lr/adamw"] / 3)
        assert new[step]["lr/muon"] == pytest.approx(old[step]["lr/muon"] / 2)


def test_more_steps_on_resume_restretch_the_schedule_unless_the_saved_one_is_kept(straight, tmp_path):
    """--max_steps 24 -> 36 from step 12: said loudly (the LR jumps); with --lr_schedule_steps 24 the
    LR follows the saved schedule exactly and the extra steps train at its final LR."""
    old = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl")}
    more = [*RUN[:-2], "--max_steps", "36", "--save_steps", "0", "--eval_steps", "0"]
    _copy_checkpoint(straight, tmp_path / "stretched", 12)
    proc = launch_here([*more, "--output_dir", str(tmp_path / "stretched"), "--resume_from_checkpoint", "latest"])
    assert "the LR schedule now spans 36 steps instead of the checkpoint's 24" in proc.stdout
    assert "pass --lr_schedule_steps 24" in proc.stdout and "--lr_scheduler_type wsd" in proc.stdout
    stretched = {r["step"]: r for r in read_jsonl(tmp_path / "stretched" / "metrics.jsonl")}
    assert stretched[13]["lr/muon"] > old[13]["lr/muon"]  # the jump the message warns about
    _copy_checkpoint(straight, tmp_path / "kept", 12)
    proc = launch_here([*more, "--output_dir", str(tmp_path / "kept"), "--resume_from_checkpoint", "latest",
                   "--lr_schedule_steps", "24"])
    assert "the LR schedule now spans" not in proc.stdout
    kept = {r["step"]: r for r in read_jsonl(tmp_path / "kept" / "metrics.jsonl")}
    assert [kept[s]["lr/muon"] for s in range(13, 25)] == [old[s]["lr/muon"] for s in range(13, 25)]
    assert [kept[s]["lr/muon"] for s in range(25, 37)] == pytest.approx([0.02 * 0.1] * 12)  # the final LR


def test_more_epochs_and_missing_names(straight, tmp_path):
    _copy_checkpoint(straight, tmp_path, 12)
    proc = launch_here([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "step-7"], check=False)
    assert proc.returncode == 2
    assert "--resume_from_checkpoint='step-7': no such checkpoint; available under" in proc.stderr
    assert "step-12" in proc.stderr
    empty = launch_here([*TINY, "--max_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path / "empty"),
                    "--resume_from_checkpoint", "latest"])
    assert "no checkpoint under" in empty.stdout and "starting fresh" in empty.stdout


def test_exception_in_loop_saves_emergency_checkpoint(tmp_path):
    script = (
        "import sys; sys.argv[0] = 'moe18b.py'\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from accel_trainer.trainer import Trainer\n"
        "original = Trainer.train_step\n"
        "def failing(self, batches):\n"
        "    if self.state.global_step == 4:\n"
        "        raise RuntimeError('simulated data error')\n"
        "    return original(self, batches)\n"
        "Trainer.train_step = failing\n"
        "from recipes.moe18b import main\n"
        f"main({[*TINY, '--max_steps', '10', '--eval_steps', '0', '--output_dir', str(tmp_path)]!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0 and "simulated data error" in proc.stderr
    assert "training stopped by RuntimeError: simulated data error at step 4" in proc.stdout
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert latest.name == "step-4"
    assert json.loads((latest / MANIFEST).read_text())["reasons"] == ["emergency"]


# ------------------------------------------------------------------------------------ two processes
def test_two_process_sigterm_to_one_rank_then_resume_is_bit_exact(straight_2proc, tmp_path):
    proc = popen_launch([*RUN, "--output_dir", str(tmp_path)])
    wait_for(tmp_path / "checkpoints" / "step-3" / "COMPLETE", proc)
    ranks = {rank: pid for pid, rank in run_pids(tmp_path).items() if rank >= 0}
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 must stop at the same step
    output, _ = proc.communicate(timeout=180)
    assert "training stopped by SIGTERM" in output, output[-3000:]
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert int(latest.name[5:]) < STEPS
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(json.loads((latest / MANIFEST).read_text())["files"])
    launch([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"], num_processes=2)
    assert_same_final_state(straight_2proc, tmp_path, ranks=2)


def test_two_process_checkpoint_loads_for_inference_on_cpu(straight_2proc):
    from accel_trainer import load_model_for_inference

    model, config, step = load_model_for_inference(straight_2proc, device="cpu")
    assert step == STEPS and model.load_report.exact and not model.training
    keys = load_file(straight_2proc / "checkpoints" / f"step-{STEPS}" / "model.safetensors").keys()
    assert not any(k.startswith("module.") for k in keys)


def test_add_more_epochs_with_a_larger_batch_and_fresh_optimizer(tmp_path):
    # A small corpus: 1 epoch is a handful of steps. num_train_epochs is a total, not "more".
    small = [*TINY, "--max_corpus_bytes", "8000", "--eval_steps", "0", "--logging_steps", "1"]
    first = launch_here([*small, "--num_train_epochs", "1", "--output_dir", str(tmp_path)])
    steps_per_epoch = int(re.search(r"\((\d+) per epoch\)", first.stdout).group(1))
    state = json.loads((read_pointer(tmp_path / "checkpoints", "latest") / "trainer_state.json").read_text())
    assert state["global_step"] == steps_per_epoch
    more = launch_here([*small, "--num_train_epochs", "3", "--output_dir", str(tmp_path), "--resume_from_checkpoint",
                   "latest", "--per_device_train_batch_size", "8", "--reset_optimizer"])
    assert "per_device_train_batch_size: 4 -> 8" in more.stdout
    assert "optimizer state starts fresh" in more.stdout
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    final = json.loads((latest / "trainer_state.json").read_text())
    # Epoch 1 was done with batch 4; epochs 2 and 3 with batch 8 take half the steps each.
    assert final["global_step"] == steps_per_epoch + 2 * (steps_per_epoch // 2)
    assert json.loads((latest / "dataloader.json").read_text())["epoch"] == 2
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, final["global_step"] + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_resume_is_bit_exact_with_full_determinism(tmp_path, precision):
    """On a GPU, index_add_/scatter backward use atomics: --full_determinism makes the kernels
    deterministic, and then a resume repeats the uninterrupted run bit for bit (fp16: the grad
    scaler's state round-trips too)."""
    args = [*TINY, "--mixed_precision", precision, "--full_determinism", "--max_steps", "6", "--save_steps", "3",
            "--eval_steps", "0", "--logging_steps", "1"]
    launch([*args, "--output_dir", str(tmp_path / "a")])
    folder = tmp_path / "a" / "checkpoints" / "step-3"
    if precision == "fp16":
        assert "scaler.pt" in json.loads((folder / MANIFEST).read_text())["files"]
    shutil.copytree(folder, tmp_path / "b" / "checkpoints" / "step-3")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-3\n")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    launch([*args, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    if precision == "fp16":
        final_a = torch.load(tmp_path / "a" / "checkpoints" / "step-6" / "scaler.pt", weights_only=True)
        final_b = torch.load(tmp_path / "b" / "checkpoints" / "step-6" / "scaler.pt", weights_only=True)
        assert final_a == final_b and final_a["scale"] > 0

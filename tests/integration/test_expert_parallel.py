"""Expert parallelism on CPU ranks (gloo): ``--expert_parallel_size 2`` trains as ``1`` does (to fp32
rounding), its checkpoints resume under any EP size, world size or in one process, a kill -9 during an
async sharded save leaves ``latest`` valid, and Accelerate's FSDP2 leaves the experts to EP."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from accel_trainer import load_model_for_inference
from accel_trainer.cli import main as cli_main
from accel_trainer.checkpoint import verify_run
from accel_trainer.checkpoint.layout import read_pointer
from launching import REPO, TINY, launch, launch_here, popen_launch, read_jsonl, step_losses, torchrun, wait_for

STEPS = 12
ARGS = [*TINY, "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "2", "--max_steps", str(STEPS)]
EP2 = [*ARGS, "--expert_parallel_size", "2", "--async_save"]
WORKER = REPO / "tests" / "integration" / "ep_fsdp2_worker.py"
# Measured: EP=2 and EP=1 on 2 ranks agree to ~1e-7 relative over 12 steps (grouped GEMMs over other
# row counts round differently); one process sums the same global batch in another order, and its
# balance loss is over the whole batch instead of each rank's half (~1e-5).
SAME_WORLD, ONE_PROCESS = 1e-6, 1e-4


def losses(out):
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}


def continue_from(src, step, dest):
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step}", dest / "checkpoints" / f"step-{step}")
    (dest / "checkpoints" / "latest").write_text(f"step-{step}\n")
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                (src / "metrics.jsonl").read_text().splitlines()[:step]))


def assert_close(reference, other, steps, rel):
    for step in steps:
        assert other[step] == pytest.approx(reference[step], rel=rel), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ep")
    launch([*ARGS, "--output_dir", str(base / "ep1")], num_processes=2)
    out = launch([*EP2, "--output_dir", str(base / "ep2")], num_processes=2)
    return base / "ep1", base / "ep2", out.stdout


def test_ep2_trains_as_ep1_with_its_experts_split_over_the_ranks(runs):
    ep1, ep2, stdout = runs
    assert ("expert parallel: 2 ranks per expert group x 1 data-parallel groups; 2 experts of each MoE layer per "
            "rank") in stdout
    assert sorted(losses(ep2)) == list(range(1, STEPS + 1))
    assert_close(losses(ep1), losses(ep2), range(1, STEPS + 1), SAME_WORLD)
    # The router and its telemetry are computed before the exchange: the same on both.
    last1, last2 = read_jsonl(ep1 / "metrics.jsonl")[-1], read_jsonl(ep2 / "metrics.jsonl")[-1]
    assert last2["router/imbalance_max"] == last1["router/imbalance_max"]
    assert last2["grad_norm"] == pytest.approx(last1["grad_norm"], rel=1e-5)
    # Sharded checkpoints: every rank wrote its own experts, all verified.
    assert (ep2 / "checkpoints" / f"step-{STEPS}" / "sharded" / "__1_0.distcp").is_file()
    assert all(not problems for _, problems in verify_run(ep2))  # every checksum of every checkpoint


def test_an_ep2_checkpoint_resumes_in_one_process_and_loads_whole(runs, tmp_path):
    ep1, ep2, _ = runs
    continue_from(ep2, 6, tmp_path)
    proc = launch_here([*ARGS, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path),
                        "--resume_from_checkpoint", "latest"])
    assert "expert_parallel_size: 2 -> 1" in proc.stdout
    assert_close(losses(ep1), losses(tmp_path), range(7, STEPS + 1), ONE_PROCESS)
    # Notebook and export: the experts come back as whole stacks, equal to the EP=1 run's weights.
    model, _, step = load_model_for_inference(ep2, device="cpu")
    reference, _, _ = load_model_for_inference(ep1, device="cpu")
    assert step == STEPS and model.load_report.exact
    gate = model.model.layers[0].mlp.gate_proj
    assert type(gate.data) is torch.Tensor and gate.shape[0] == 4
    torch.testing.assert_close(gate, reference.model.layers[0].mlp.gate_proj, rtol=1e-4, atol=1e-6)
    # export writes the whole experts too (stock Qwen2-MoE, one tensor per expert: all 4 of them)
    assert cli_main(["export", str(ep2), str(tmp_path / "hf"), "--format", "qwen2_moe"]) == 0
    from safetensors import safe_open

    with safe_open(next((tmp_path / "hf").glob("*.safetensors")), "pt") as f:
        experts = {k.split(".experts.")[1].split(".")[0] for k in f.keys() if "layers.0.mlp.experts." in k}
    assert experts == {"0", "1", "2", "3"}


def test_an_ep1_checkpoint_resumes_under_ep2(runs, tmp_path):
    ep1, _, _ = runs
    continue_from(ep1, 6, tmp_path)  # our own tensor files (DDP): each rank takes its experts' slice
    launch([*EP2, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"], num_processes=2)
    assert_close(losses(ep1), losses(tmp_path), range(7, STEPS + 1), SAME_WORLD)


def test_kill_9_during_an_async_sharded_save_under_ep_leaves_latest_valid(runs, tmp_path):
    _, ep2, _ = runs
    proc = popen_launch([*EP2, "--output_dir", str(tmp_path)])
    wait_for(tmp_path / "checkpoints" / "step-4" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # lands in the next steps or the next background save
    proc.wait()
    latest = read_pointer(tmp_path / "checkpoints", "latest")
    assert latest is not None and (latest / "COMPLETE").is_file()
    launch([*EP2, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"], num_processes=2)
    assert losses(tmp_path) == losses(ep2)  # bitwise: the same computation, resumed
    assert all(not problems for _, problems in verify_run(tmp_path))


def test_fsdp2_as_accelerate_prepares_it_leaves_the_experts_to_ep(tmp_path):
    """Accelerate's own fsdp2_prepare_model shards the rest; Muon orthogonalises each rank's experts."""
    out = tmp_path / "ep2"
    ep1 = torchrun(2, WORKER, str(tmp_path / "ep1"), "--expert_parallel_size", "1").stdout
    ep2 = torchrun(2, WORKER, str(out), "--expert_parallel_size", "2", "--save_at", "2").stdout
    reference = step_losses(ep1)
    assert sorted(step_losses(ep2)) == [1, 2, 3, 4]
    assert_close(reference, step_losses(ep2), range(1, 5), SAME_WORLD)
    assert "FSDP2's cpu_ram_efficient_loading is off for this run" in ep2
    # Each rank holds 2 of the 4 experts and orthogonalises them where they are (their momentum is
    # that rank's slice: nothing gathered).
    assert ep2.count("expert momentum per rank [(2, 16, 32), (2, 32, 16)]") == 2, ep2
    # The EP=2 checkpoint of step 2 continues on 2 ranks without EP, and in one process.
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
    again = step_losses(torchrun(2, WORKER, str(out), "--resume").stdout)
    assert_close(reference, again, (3, 4), SAME_WORLD)
    alone = step_losses(torchrun(1, WORKER, str(out), "--resume", "--ranks_of_data", "2").stdout)
    assert_close(reference, alone, (3, 4), ONE_PROCESS)


def test_ep2_times_dp2_on_4_ranks_trains_as_fsdp2_alone(tmp_path):
    """Two copies of every expert (dp = 2): their gradients are summed between the copies."""
    reference = step_losses(torchrun(4, WORKER, str(tmp_path / "ep1"), "--expert_parallel_size", "1").stdout)
    out = torchrun(4, WORKER, str(tmp_path / "ep2"), "--expert_parallel_size", "2").stdout
    assert sorted(reference) == [1, 2, 3, 4]
    assert_close(reference, step_losses(out), range(1, 5), SAME_WORLD)
    assert out.count("expert momentum per rank [(2, 16, 32), (2, 32, 16)]") == 4, out

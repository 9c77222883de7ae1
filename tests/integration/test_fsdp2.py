"""FSDP2 on CPU ranks (gloo), through torch's fully_shard and torch.distributed.checkpoint.

Accelerate builds FSDP only on GPUs (on a CPU machine it silently falls back to DDP), so the full
trainer-under-FSDP path is the GPU test at the end; what runs here are the two parts that make it
work and that CPU can check exactly: Muon on sharded DTensors, and sharded checkpoints that load on
another world size and consolidate for inference.
"""

import re
import subprocess
import sys

import pytest
import torch

from accel_trainer import load_model_for_inference
from accel_trainer.checkpoint.weights import read_weights
from launching import REPO, TINY, free_port
from launching import torchrun as run_ranks

WORKER = REPO / "tests" / "integration" / "fsdp2_muon_worker.py"


def torchrun(n: int, *args) -> str:
    return run_ranks(n, WORKER, *args).stdout


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2") / "dcp"
    return folder, torchrun(2, "save", str(folder))


def test_muon_adamw_on_fsdp2_shards_equals_full_model(sharded_checkpoint):
    _, out = sharded_checkpoint
    assert out.count("max_param_diff 0.000e+00") == 2, out
    # Experts are sharded on the expert dim: each rank holds and orthogonalises 2 whole experts.
    assert out.count("expert_shard (2, 16, 32) momentum DTensor (2, 16, 32)") == 2, out
    # No redundant Newton-Schulz: every matrix is orthogonalised by exactly one rank, in even shares.
    counts = [(int(a), int(b)) for a, b in re.findall(r"ns_matrices (\d+) of (\d+)", out)]
    assert len(counts) == 2 and sum(a for a, _ in counts) == counts[0][1], out
    assert abs(counts[0][0] - counts[1][0]) <= 2, counts


def test_sharded_checkpoint_from_2_ranks_resumes_on_3(sharded_checkpoint):
    folder, _ = sharded_checkpoint
    out = torchrun(3, "load", str(folder))
    diffs = [float(d) for d in re.findall(r"resumed_step_diff (\S+?e[-+]\d+)", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-6, out


def test_sharded_checkpoint_consolidates_for_inference_in_one_process(sharded_checkpoint):
    folder, _ = sharded_checkpoint
    reference = torch.load(str(folder) + ".saved.pt", weights_only=True)
    state, _ = read_weights(folder)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    from accel_trainer.models import MoEConfig

    config = MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                       shared_expert_intermediate_size=8)
    config.to_json_file(folder / "config.json")
    model, _, _ = load_model_for_inference(folder, device="cpu")
    assert model.load_report.exact


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="Accelerate builds FSDP only on CUDA; needs >= 2 GPUs")
def test_trainer_under_accelerate_fsdp2_resumes_on_another_world_size(tmp_path):
    cfg = "accelerate_configs/container_multigpu.yaml"
    args = [*TINY, "--max_steps", "6", "--save_steps", "3", "--eval_steps", "0", "--logging_steps", "1",
            "--output_dir", str(tmp_path)]
    for n in (2, 1) if torch.cuda.device_count() >= 2 else ():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / cfg),
               "--num_processes", str(n), "--main_process_port", str(free_port()), str(REPO / "recipes/moe18b.py"),
               *args, *(["--resume_from_checkpoint", "step-3", "--max_steps", "9"] if n == 1 else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
    model, _, step = load_model_for_inference(tmp_path, device="cpu")
    assert step == 9 and model.load_report.exact


def test_malicious_sharded_metadata_is_refused_and_runs_nothing(sharded_checkpoint, tmp_path):
    """torch.distributed.checkpoint reads .metadata with plain pickle.load; we check it first."""
    import os
    import pickle
    import shutil

    from accel_trainer import CheckpointError

    folder, _ = sharded_checkpoint
    evil = tmp_path / "dcp"
    shutil.copytree(folder, evil)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: global posix.system is not allowed"):
        read_weights(evil)
    assert not marker.exists()


def test_diff_and_parameter_counts_read_sharded_weights(sharded_checkpoint, tmp_path):
    """`accel-trainer diff`/`inspect` on FSDP checkpoints: shapes from the DCP metadata alone, and
    change norms against a one-file copy of the same weights (zero) and a changed copy."""
    from safetensors.torch import save_file

    from accel_trainer.checkpoint.inspection import _tensor_count, diff

    folder, _ = sharded_checkpoint
    reference = torch.load(str(folder) + ".saved.pt", weights_only=True)
    counts = _tensor_count(folder, {"num_experts": 4, "num_experts_per_tok": 2})
    assert counts["total"] == sum(t.numel() for t in reference.values()) and counts["tensors"] == len(reference)
    assert counts["active"] < counts["total"]
    (tmp_path / "same").mkdir()
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "same" / "model.safetensors")
    same = diff(folder, tmp_path / "same")
    assert not same["only_in_a"] and not same["only_in_b"] and not same["shape_changes"]
    assert len(same["tensor_changes"]) == len(reference)
    assert all(c["change_norm"] == 0 for c in same["tensor_changes"])
    (tmp_path / "changed").mkdir()
    changed = {k: v.clone().contiguous() for k, v in reference.items()}
    name = sorted(changed)[0]
    changed[name] += 1
    save_file(changed, tmp_path / "changed" / "model.safetensors")
    assert diff(tmp_path / "changed", folder)["tensor_changes"][0]["tensor"] == name

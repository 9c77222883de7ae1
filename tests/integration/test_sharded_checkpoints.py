"""Sharded (FSDP2) checkpoints through the Checkpointer, on CPU ranks (gloo) with ``fully_shard``:
async saves that training does not wait for, committed only once every rank's shards are on disk;
a kill -9 in the middle of one; resume on another world size; and the same checkpoint in one
process without a process group (a notebook, a smaller machine)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from accel_trainer.checkpoint import Checkpointer, load_model_for_inference, verify
from accel_trainer.checkpoint.layout import read_pointer, resolve
from launching import REPO, step_losses
from launching import torchrun as run_ranks

WORKER = REPO / "tests" / "integration" / "sharded_ckpt_worker.py"


def torchrun(n: int, *args, expect_killed: bool = False) -> dict[int, float]:
    return step_losses(run_ranks(n, WORKER, *args, expect_killed=expect_killed).stdout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two ranks, six steps, a synchronous sharded save every two."""
    out = tmp_path_factory.mktemp("sharded") / "reference"
    return out, torchrun(2, str(out))


def test_sync_sharded_checkpoint_holds_every_ranks_shards_with_checksums(reference):
    out, losses = reference
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    folder = read_pointer(out / "checkpoints", "latest")
    assert folder.name == "step-6" and verify(folder) == []
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(files)
    assert all(files[f]["xxh3_128"] for f in files)
    assert not (folder / "model.safetensors").exists()  # the model never went through one process


def test_kill_9_during_an_async_sharded_save_leaves_latest_valid_and_resume_on_3_ranks_is_exact(reference, tmp_path):
    _, expected = reference
    out = tmp_path / "run"
    # Compressed (DCP's zstd extension) here, the reference not: the same losses, smaller shards.
    before = torchrun(2, str(out), "--async_save", "--compression", "zstd", "--die_after_save", "4",
                      expect_killed=True)
    assert before == {s: expected[s] for s in range(1, 5)}
    root = out / "checkpoints"
    # Killed with its shards staged and being written: never committed, latest stays on step-2.
    assert read_pointer(root, "latest").name == "step-2" and not (root / "step-4").exists()
    assert (root / ".tmp-step-4").is_dir()
    assert resolve("latest", out).path.name == "step-2"
    after = torchrun(3, str(out), "--async_save", "--compression", "zstd", "--resume")
    assert sorted(after) == [3, 4, 5, 6]
    for step, loss in after.items():  # the same batches: the same losses on 3 ranks as on 2
        assert loss == pytest.approx(expected[step], abs=1e-6), step
    assert read_pointer(root, "latest").name == "step-6" and verify(root / "step-6") == []
    assert not (root / ".tmp-step-4").exists()  # the next save cleaned the dead one's leftovers
    plain = reference[0] / "checkpoints" / "step-6" / "sharded"
    size = sum(p.stat().st_size for p in (root / "step-6" / "sharded").glob("*.distcp"))
    assert size < sum(p.stat().st_size for p in plain.glob("*.distcp"))


def test_a_corrupt_shard_is_detected_and_latest_falls_back(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    shard = out / "checkpoints" / "step-6" / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("__1_0.distcp: checksum mismatch" in p for p in verify(out / "checkpoints" / "step-6"))
    assert resolve("latest", out).path.name == "step-4"


def test_sharded_checkpoint_resumes_in_one_process_without_a_process_group(reference, tmp_path):
    """A smaller machine (or CPU) continues the FSDP run: same losses as the sharded run's."""
    from accelerate import Accelerator

    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.optim import OptimizerSettings, build_optimizers

    out, expected = reference
    run = tmp_path / "single"
    shutil.copytree(out / "checkpoints" / "step-4", run / "checkpoints" / "step-4")
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    model = MoEForCausalLM(MoEConfig(**json.loads((run / "checkpoints" / "step-4" / "config.json").read_text())))
    container = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3))

    class Loop:
        step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    ckpt = Checkpointer(accelerator, run, model=model, optimizer=container.optimizers, extra={"loop": Loop()})
    try:
        assert not ckpt.sharded and ckpt.resume("latest") == 4
        for step in (5, 6):
            ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            container.step()
            container.zero_grad()
            assert loss.item() == pytest.approx(expected[step], abs=1e-6), step
    finally:
        ckpt.close()
    inference, _, step = load_model_for_inference(out, device="cpu")
    assert step == 6 and inference.load_report.exact


def test_a_thinned_sharded_checkpoint_holds_the_stitched_model_and_loads_as_the_shards_do(reference, tmp_path):
    """--full_state_total_limit on an FSDP2 run: the shards (model and optimizer together) become one
    model.safetensors, equal tensor for tensor to the shards stitched, and the same model loads."""
    from accel_trainer.checkpoint import read_tensor_file
    from accel_trainer.checkpoint.thinning import apply_thinning, is_weights_only
    from accel_trainer.checkpoint.weights import consolidate_sharded
    from accel_trainer.models import MoEConfig  # noqa: F401  registers the model type the config names

    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    root = out / "checkpoints"
    before, _, _ = load_model_for_inference(root / "step-4", device="cpu")
    stitched = consolidate_sharded(root / "step-4" / "sharded")
    assert apply_thinning(root, 1) == [root / "step-2", root / "step-4"]  # latest (step-6) keeps everything
    folder = root / "step-4"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert is_weights_only(manifest) and verify(folder) == [] and not (folder / "sharded").exists()
    assert "sharded/__1_0.distcp" in manifest["weights_only"]["dropped"]
    stored = read_tensor_file(folder / "model.safetensors")
    assert stored.keys() == stitched.keys() and all(torch.equal(stored[k], stitched[k]) for k in stitched)
    after, _, step = load_model_for_inference(folder, device="cpu")
    assert step == 4 and after.load_report.exact
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(before(ids).logits, after(ids).logits)
    assert (root / "step-6" / "sharded" / ".metadata").is_file()

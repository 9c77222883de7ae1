"""--checkpoint_compression zstd: lossless (resume bitwise, exports byte-equal to an uncompressed
run's), and every reader takes it: verify, inspect, diff, list, export, load_model_for_inference,
--init_from."""

from __future__ import annotations

import json

import pytest
import torch

from accel_trainer.checkpoint import inspect, load_model_for_inference, verify
from accel_trainer.cli import main as cli_main
from accel_trainer.run import main as run_main

QUICK = ["--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000", "--block_size", "64",
         "--per_device_train_batch_size", "4", "--eval_steps", "3", "--logging_steps", "1", "--save_steps", "3"]
ZSTD = ["--checkpoint_compression", "zstd"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    assert run_main([*QUICK, *ZSTD, "--max_steps", "6", "--output_dir", str(root / "zstd")]) == 0
    assert run_main([*QUICK, "--max_steps", "6", "--output_dir", str(root / "plain")]) == 0
    assert run_main([*QUICK, *ZSTD, "--max_steps", "3", "--output_dir", str(root / "resumed")]) == 0
    assert run_main([*QUICK, *ZSTD, "--max_steps", "6", "--output_dir", str(root / "resumed"),
                     "--resume_from_checkpoint", "latest"]) == 0
    return root


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_compressed_checkpoints_hold_ztensors_that_verify_and_are_smaller(runs):
    z, plain = runs / "zstd" / "checkpoints" / "step-6", runs / "plain" / "checkpoints" / "step-6"
    assert sorted(p.name for p in z.glob("*.ztensors")) == ["model.ztensors", "optimizer.ztensors"]
    assert not list(z.glob("*.safetensors")) and verify(z) == []
    for name in ("model", "optimizer"):
        assert (z / f"{name}.ztensors").stat().st_size < (plain / f"{name}.safetensors").stat().st_size
    roles = json.loads((z / "manifest.json").read_text())["files"]
    assert "zstd" in roles["model.ztensors"]["role"]


def test_training_is_the_same_and_a_compressed_resume_is_bitwise(runs):
    assert losses(runs / "zstd") == losses(runs / "plain") == losses(runs / "resumed")
    a, b = (runs / r / "checkpoints" / "step-6" for r in ("zstd", "resumed"))
    for name in ("model.ztensors", "optimizer.ztensors", "optimizer.json", "dataloader.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_exports_equal_an_uncompressed_runs_byte_for_byte(runs, tmp_path):
    for run in ("zstd", "plain"):
        assert cli_main(["export", str(runs / run), str(tmp_path / run)]) == 0
    exported = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("zstd", "plain")]
    assert exported[0] == exported[1]


def test_readers_take_compressed_checkpoints(runs, tmp_path, capsys):
    z, plain = runs / "zstd" / "checkpoints" / "step-6", runs / "plain" / "checkpoints" / "step-6"
    info = inspect(z)
    assert info["parameters"] == inspect(plain)["parameters"] and not info["sharded_weights"]
    assert [o["state_bytes"] for o in info["optimizers"]] == [o["state_bytes"] for o in inspect(plain)["optimizers"]]
    capsys.readouterr()
    assert cli_main(["diff", str(z), str(plain), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["shape_changes"] and all(c["change_norm"] == 0 for c in result["tensor_changes"])
    model, _, step = load_model_for_inference(z, device="cpu")
    reference, _, _ = load_model_for_inference(plain, device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert step == 6 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                              reference.state_dict().values()))
    # The same weights; CPU kernels may sum in another order for memory aligned otherwise (the plain
    # file's tensors are views of its mapping), so the logits agree to rounding.
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-6, atol=1e-6)
    assert run_main([*QUICK, "--max_steps", "1", "--init_from", str(z), "--output_dir", str(tmp_path / "init")]) == 0
    assert cli_main(["verify", str(runs / "zstd")]) == 0

"""Every checkpoint format version this project has written, as that version wrote it
(``tests/data/golden``): loaded, exported, upgraded and resumed by the current code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accel_trainer.checkpoint import load_model_for_inference, upgrade, verify
from accel_trainer.cli import main as cli_main
from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from accel_trainer.errors import CheckpointError
from accel_trainer.run import run

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
PRESETS = {"micro": dict(vocab_size=259, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         shared_expert_intermediate_size=16, max_position_embeddings=64)}
PROMPT = list(b"golden checkpoints")
VERSIONS = ("format-1", "format-2")


def golden_copy(tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(GOLDEN / name, run_dir)
    shutil.copy(GOLDEN / "corpus.txt", tmp_path / "corpus.txt")
    return run_dir


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def expected(name: str) -> torch.Tensor:
    return load_file(str(GOLDEN / name / "expected_logits.safetensors"))["logits"]


@pytest.mark.parametrize("name", VERSIONS)
def test_a_golden_checkpoint_loads_with_the_logits_its_own_version_computed(name):
    folder = GOLDEN / name / "checkpoints" / "step-6"
    assert verify(folder) == []
    model, _, step = load_model_for_inference(folder)
    assert step == 6
    torch.testing.assert_close(logits_of(model), expected(name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VERSIONS)
def test_a_golden_checkpoint_exports_as_a_transformers_model_with_the_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert cli_main(["export", str(GOLDEN / name / "checkpoints" / "step-6"), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits_of(model), expected(name), rtol=1e-5, atol=1e-5)


def train(run_dir: Path, max_steps: int, *extra: str):
    flags = ["--preset", "micro", "--vocab_size", "259", "--data_files", "corpus.txt", "--block_size", "32",
             "--per_device_train_batch_size", "4", "--max_steps", str(max_steps), "--save_steps", "6",
             "--eval_steps", "3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm",
             "--output_dir", run_dir.name,
             "--resume_from_checkpoint", "latest", *extra]
    model_args, data_args, train_args = parse_args((ModelArguments, DataArguments, TrainingArguments), flags)
    return run(PRESETS, model_args, data_args, train_args)


def resumed_state_is_the_checkpoints(trainer, folder: Path) -> None:
    """Weights and every optimizer tensor, by name, bitwise as the checkpoint holds them."""
    weights = load_file(str(folder / "model.safetensors"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    saved = load_file(str(folder / "optimizer.safetensors"))
    names = dict(model.named_parameters())
    found = 0
    for opt in trainer.optimizers.optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                pname = next(n for n, q in names.items() if q is p)
                for key, value in opt.state[p].items():
                    if torch.is_tensor(value):
                        assert torch.equal(value, saved[f"{pname}::{key}"]), f"{pname}::{key}"
                        found += 1
    assert found == len(saved)


@pytest.mark.parametrize("name", VERSIONS)
def test_a_golden_run_resumes_with_its_state_bitwise_then_trains_on(name, tmp_path, monkeypatch, capsys):
    run_dir = golden_copy(tmp_path, name)
    monkeypatch.chdir(tmp_path)  # the run recorded --data_files corpus.txt, relative
    step6 = run_dir / "checkpoints" / "step-6"
    if name == "format-1":
        with pytest.raises(CheckpointError, match="accel-trainer upgrade"):
            train(run_dir, 6)
        assert cli_main(["upgrade", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "upgraded" in out and "step-3" in out and "step-6" in out
        assert verify(step6) == [] and verify(run_dir / "checkpoints" / "step-3") == []
        assert json.loads((step6 / "manifest.json").read_text())["upgraded_from"]["format_version"] == 1
    trainer = train(run_dir, 6)  # at step 6 already: restores, trains nothing
    resumed_state_is_the_checkpoints(trainer, GOLDEN / name / "checkpoints" / "step-6")
    assert trainer.state.global_step == 6 and trainer.checkpointer.best["step"] == 6
    assert trainer.train_loader.samples_in_epoch == 24
    trainer = train(run_dir, 8)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in rows if "loss" in r]
    assert trained[-2:] == [7, 8] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert verify(run_dir / "checkpoints" / "step-8") == []


def test_upgrade_says_when_there_is_nothing_to_do_and_refuses_a_damaged_checkpoint_untouched(tmp_path, capsys):
    run_dir = golden_copy(tmp_path, "format-2")
    assert cli_main(["upgrade", str(run_dir / "checkpoints" / "step-6")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    old = golden_copy(tmp_path, "format-1")
    step6 = old / "checkpoints" / "step-6"
    with open(step6 / "optimizer.json", "r+b") as f:
        f.seek(10)
        f.write(b"X")
    before = {p.name: p.read_bytes() for p in step6.iterdir()}
    assert cli_main(["upgrade", str(step6)]) == 2
    err = capsys.readouterr().err
    assert "does not verify" in err and "optimizer.json" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in step6.iterdir()} == before
    assert sorted(p.name for p in step6.parent.iterdir()) == ["best", "latest", "step-3", "step-6"]


def test_an_upgrade_killed_between_its_two_renames_is_finished_by_the_next(tmp_path, monkeypatch):
    import accel_trainer.checkpoint.rewrite as module

    run_dir = golden_copy(tmp_path, "format-1")
    real_rename, calls = os.rename, []

    def dies_after_the_first(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends here: the old folder aside, the new one not in place
        real_rename(src, dst)

    monkeypatch.setattr(module.os, "rename", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        upgrade(run_dir / "checkpoints" / "step-6")
    monkeypatch.setattr(module.os, "rename", real_rename)
    root = run_dir / "checkpoints"
    assert not (root / "step-6").exists() and (root / ".rewritten-step-6").is_dir()
    results = upgrade(run_dir)
    assert [r.action for r in results] == ["finished", "upgraded", "current"]
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-3", "step-6"]
    assert verify(root / "step-6") == []
    assert json.loads((root / "step-6" / "manifest.json").read_text())["format_version"] == 2


def test_an_upgrade_that_fails_while_building_leaves_the_original_as_it_was(tmp_path, monkeypatch):
    import accel_trainer.checkpoint.upgrading as module

    run_dir = golden_copy(tmp_path, "format-1")
    step6 = run_dir / "checkpoints" / "step-6"
    before = {p.name: p.read_bytes() for p in step6.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_complete_marker", full_disk)
    with pytest.raises(OSError):
        upgrade(step6)
    assert {p.name: p.read_bytes() for p in step6.iterdir()} == before
    assert sorted(p.name for p in step6.parent.iterdir()) == ["best", "latest", "step-3", "step-6"]

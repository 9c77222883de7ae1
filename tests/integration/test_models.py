"""One trainer for every model: Hugging Face models (Llama, Qwen3-MoE, GPT-2, built from configs and
saved with save_pretrained, as a Hub download would give them) and your own nn.Module (the
vocabulary-25 GPT of examples/custom_model.py), with the same guarantees: a short run learns, kill -9
then resume is bitwise the uninterrupted run, the starting weights round-trip exactly, 2 processes
and FSDP2 on CPU ranks."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from accel_trainer.checkpoint import LocalStorage
from launching import (REPO, assert_same_final_state, kill_9_then_resume, launch, launch_here, read_jsonl,
                       step_losses, torchrun)

CAUSAL_LM = REPO / "recipes" / "causal_lm.py"
CUSTOM = REPO / "examples" / "custom_model.py"
COMMON = ["--report_to", "none", "--disable_tqdm", "--per_device_train_batch_size", "4", "--block_size", "32",
          "--logging_steps", "1", "--eval_steps", "4", "--max_eval_batches", "2", "--save_steps", "2",
          "--max_steps", "8"]
SHAPES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models of three Hub architectures saved with their tokenizer, and the custom model's data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from accel_trainer.config import DataArguments
    from accel_trainer.data import character_tokenizer, load_raw_text, train_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(load_raw_text(DataArguments(max_corpus_bytes=100_000))["text"], 320,
                                show_progress=False)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    for kind, shape in SHAPES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=320, **shape, **ids))
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    character_tokenizer("ACDEFGHIKLMNPQRSTVWY").save_pretrained(root / "aa")
    rng = random.Random(0)
    motifs = ["".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(6)) for _ in range(12)]
    with open(root / "proteins.jsonl", "w") as f:
        for _ in range(600):
            f.write(json.dumps({"text": "M" + "".join(rng.choice(motifs) for _ in range(rng.randint(4, 12)))}) + "\n")
    return root


def how_to_run(kind: str, models: Path) -> tuple[Path, list[str]]:
    if kind == "custom":
        return CUSTOM, ["--data_files", str(models / "proteins.jsonl"), "--tokenizer_name", str(models / "aa"), *COMMON]
    return CAUSAL_LM, ["--model_name_or_path", str(models / kind), "--max_corpus_bytes", "60000", *COMMON]


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "gpt2", "custom"])
def test_a_short_run_learns_and_kill_9_then_resume_is_bitwise(models, tmp_path, kind):
    script, args = how_to_run(kind, models)
    straight = tmp_path / "straight"
    proc = launch_here([*args, "--output_dir", str(straight)], script=script)
    assert "optimizers (--muon_params/--adamw_params/--freeze_params change this)" in proc.stdout
    losses = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0]  # it learns
    killed = tmp_path / "killed"
    kill_9_then_resume(args, killed, at_step=4, script=script)
    assert_same_final_state(straight, killed, step=8)


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "gpt2"])
def test_with_learning_rates_0_the_export_is_the_starting_weights_bitwise(models, tmp_path, kind):
    """Proves the pretrained weights were loaded (not initialised) and round-trip through the
    checkpoint and export; plain transformers loads the export into the same architecture."""
    from transformers import AutoModelForCausalLM

    from accel_trainer.cli import main as cli_main
    from accel_trainer.run import main

    args = ["--model_name_or_path", str(models / kind), "--max_corpus_bytes", "60000", *COMMON[:-2],
            "--max_steps", "2", "--learning_rate", "0", "--muon_learning_rate", "0", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    assert cli_main(["export", str(tmp_path), str(tmp_path / "export")]) == 0
    # Both through plain transformers (it may store a MoE's experts per expert on disk, fused in memory).
    start = AutoModelForCausalLM.from_pretrained(models / kind)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(again) is type(start)
    a, b = start.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "export" / "tokenizer.json").is_file()


def test_the_custom_module_rebuilds_from_its_checkpoint_alone(models, tmp_path, capsys):
    from accel_trainer import load_model_for_inference
    from accel_trainer.cli import main as cli_main

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from custom_model import GPTConfig, TinyGPT
    finally:
        sys.path.pop(0)
    script, args = how_to_run("custom", models)
    launch_here([*args[:-2], "--max_steps", "4", "--output_dir", str(tmp_path)], script=script)
    latest = LocalStorage(tmp_path / "checkpoints").read_pointer("latest")
    config = json.loads((tmp_path / "checkpoints" / latest / "config.json").read_text())
    assert config["model_type"] == "accel_trainer_custom"
    assert config["accel_trainer_custom"]["config"]["vocab_size"] == 25
    model, loaded_config, step = load_model_for_inference(tmp_path, model_class=TinyGPT, device="cpu")
    assert isinstance(loaded_config, GPTConfig) and step == 4 and model.load_report.exact
    logits = model(torch.tensor([[10, 8, 17]]))
    assert logits.shape == (1, 3, 25)
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out")]) == 2  # no Hugging Face folder to write
    assert "load_model_for_inference(path, model_class=TinyGPT)" in capsys.readouterr().err


def test_two_processes_on_a_hub_architecture_resume_bitwise(models, tmp_path):
    script, args = how_to_run("llama", models)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch([*args, "--output_dir", str(straight)], num_processes=2, script=script)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    (resumed / "checkpoints" / "latest").write_text("step-4\n")
    (resumed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text())
    launch([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], num_processes=2, script=script)
    assert_same_final_state(straight, resumed, step=8, ranks=2)


def test_fsdp2_on_cpu_ranks_trains_a_hub_moe_and_resumes_on_one_rank(tmp_path):
    worker = REPO / "tests" / "integration" / "sharded_ckpt_worker.py"
    out = tmp_path / "run"
    full = step_losses(torchrun(2, worker, str(out), "--model", "qwen3_moe", "--steps", "4").stdout)
    assert sorted(full) == [1, 2, 3, 4]
    (out / "checkpoints" / "latest").write_text("step-2\n")  # continue from the middle, on one rank
    shutil.rmtree(out / "checkpoints" / "step-4")
    again = step_losses(torchrun(1, worker, str(out), "--model", "qwen3_moe", "--steps", "4", "--resume").stdout)
    assert sorted(again) == [3, 4]
    for step, loss in again.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step

"""Edges a newcomer hit, each at the entry point they used (the recipe's main, the accel-trainer
command), in-process: one line and exit 2 naming the right flag, never a traceback; the parameter
rule on stock architectures; the crash handler when the process group never started."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from accel_trainer.cli import main as cli_main
from accel_trainer.models import build_on_meta
from accel_trainer.optim import Muon, assign_parameters, zeropower_via_newtonschulz
from accel_trainer.run import main as run_main

QUICK = ["--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000"]


def recipe(capsys, *args):
    capsys.readouterr()  # what fixtures printed
    try:
        code = run_main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_missing_data_file_is_one_line(capsys, tmp_path):
    code, err = recipe(capsys, "--data_files", "/nonexistent/x.txt", "--output_dir", str(tmp_path), *QUICK)
    assert code == 2 and one_line(err) == "error: --data_files: /nonexistent/x.txt: no such file"
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 2


@pytest.fixture
def llama_folder(tmp_path):
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_weights_file_is_one_line(capsys, tmp_path, llama_folder, damage):
    weights = llama_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[:5000]) if damage == "truncated" else bytes(data[:8]) + b"X" * 16 + bytes(data[24:]))
    code, err = recipe(capsys, "--model_name_or_path", str(llama_folder), "--tokenizer_name", "byte",
                       "--output_dir", str(tmp_path / "run"), *QUICK)
    line = one_line(err)
    assert code == 2 and line.startswith(f"error: --model_name_or_path={str(llama_folder)!r}: the model cannot be "
                                         f"loaded")
    assert "truncated or damaged" in line


def test_a_config_json_that_is_not_json_names_the_model_not_the_tokenizer(capsys, tmp_path, llama_folder):
    (llama_folder / "config.json").write_text("{not json")
    code, err = recipe(capsys, "--model_name_or_path", str(llama_folder), "--output_dir", str(tmp_path / "r"), *QUICK)
    line = one_line(err)
    assert code == 2 and f"--model_name_or_path={str(llama_folder)!r}: not a usable model config" in line
    assert "tokenizer" not in line


def test_a_hub_name_offline_names_the_model_flag(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = recipe(capsys, "--model_name_or_path", "someone/not-cached-model", "--output_dir", str(tmp_path),
                       *QUICK)
    line = one_line(err)
    assert code == 2 and "--model_name_or_path='someone/not-cached-model': not in the local Hugging Face cache" in line


def test_a_config_override_that_cannot_build_is_refused_before_any_work(capsys, tmp_path):
    code, err = recipe(capsys, "--model_type", "llama", "--config_overrides", "hidden_size=30", "--output_dir",
                       str(tmp_path), *QUICK)
    line = one_line(err)
    assert code == 2 and "hidden_size=30 is not divisible by num_attention_heads=32" in line
    assert "--config_overrides 'hidden_size=30'" in line
    assert not (tmp_path / "checkpoints").exists()  # no emergency step-0 left as latest


@pytest.mark.parametrize("flag", ["--muon_params", "--adamw_params"])
def test_a_parameter_pattern_that_matches_nothing_is_refused(capsys, tmp_path, flag):
    code, err = recipe(capsys, flag, "no_such_layer", "--max_steps", "1", "--output_dir", str(tmp_path), *QUICK)
    line = one_line(err)
    assert code == 2 and f"{flag} 'no_such_layer': matches no trainable parameter" in line


@pytest.mark.parametrize("flag,advice", [
    ("--lr", "use --learning_rate (AdamW) and --muon_learning_rate (Muon)"),
    ("--resume", "use --resume_from_checkpoint latest"),
    ("--resume-from", "use --resume_from_checkpoint latest"),
    ("--data", "use --data_files FILE..."),
    ("--config", "use --config_name"),
    ("--batch-size", "use --per_device_train_batch_size N"),
    ("--dropout", "dropout is the model's setting: --config_overrides attention_dropout=0.1"),
    ("--epochs", "use --num_train_epochs N"),
])
def test_the_seeds_flags_get_one_line_with_the_right_suggestion(capsys, tmp_path, flag, advice):
    code, err = recipe(capsys, flag, "1", "--output_dir", str(tmp_path))
    assert code == 2 and one_line(err) == f"error: {flag}: not a flag here; {advice}" + one_line(err).split(advice)[1]


def test_no_flag_is_taken_by_a_prefix_of_it(capsys, tmp_path):
    code, err = recipe(capsys, "--max_step", "3", "--output_dir", str(tmp_path))
    assert code == 2 and one_line(err) == "error: --max_step: unknown flag; did you mean --max_steps?"
    with pytest.raises(SystemExit) as exit_:  # accel-trainer's verbs too
        cli_main(["plan", "--pres", "18b"])
    assert exit_.value.code == 2 and "unrecognized arguments: --pres 18b" in capsys.readouterr().err


def test_a_refused_resume_keeps_the_finished_runs_status(capsys, tmp_path):
    assert recipe(capsys, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path), *QUICK)[0] == 0
    finished = json.loads((tmp_path / "exit_status.json").read_text())
    assert finished["exit_code"] == 0
    code, err = recipe(capsys, "--resume_from_checkpoint", "latest", "--vocab_size", "512", "--max_steps", "4",
                       "--output_dir", str(tmp_path), *QUICK)
    assert code == 2 and "the model architecture differs" in one_line(err)
    assert json.loads((tmp_path / "exit_status.json").read_text()) == finished


def test_the_crash_handler_survives_a_process_group_that_never_started(tmp_path, monkeypatch):
    """A restarted rank that cannot reach the others leaves Accelerate's state half built."""
    from accelerate import PartialState

    from accel_trainer.process import exit_code_of

    monkeypatch.setattr(PartialState, "_shared_state", {"backend": "gloo"})  # as a failed init leaves it
    with pytest.raises(AttributeError):
        PartialState().is_main_process
    monkeypatch.delenv("RANK", raising=False)

    def job():
        raise RuntimeError("Connection refused: the old rendezvous")

    with pytest.raises(RuntimeError, match="Connection refused"):
        exit_code_of(job, output_dir=str(tmp_path))
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["exit_code"] == 1 and "Connection refused" in status["reason"]


def test_eval_of_hub_tasks_without_network_fails_in_seconds_naming_the_tasks(capsys, llama_folder, monkeypatch):
    import accel_trainer.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    code = cli_main(["eval", str(llama_folder), "--tasks", "hellaswag,arc_easy"])
    err = capsys.readouterr().err
    assert code == 2 and "--tasks='hellaswag,arc_easy': the Hugging Face Hub is not reachable" in err


def test_the_redactor_keeps_placeholder_words():
    from accel_trainer.secrets import redact_text

    assert redact_text("--storage_options: expected key=value") == "--storage_options: expected key=value"
    assert redact_text("key=AbC123xyz secret=hunter2") == "key=*** secret=***"


def test_storage_options_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args

    options = tmp_path / "store.json"
    options.write_text('{"endpoint_url": "http://127.0.0.1:9000", "secret": "s3cr3t"}')
    base = ["--output_dir", str(tmp_path), "--checkpoint_upload_to", "s3://bucket/run"]
    *_, args = parse_args((ModelArguments, DataArguments, TrainingArguments), [*base, "--storage_options",
                                                                               f"@{options}"])
    assert args.parsed_storage_options["secret"] == "s3cr3t"
    monkeypatch.setenv("ACCEL_TRAINER_STORAGE_OPTIONS", f"@{options}")
    *_, args = parse_args((ModelArguments, DataArguments, TrainingArguments), base)
    assert args.parsed_storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    monkeypatch.setenv("ACCEL_TRAINER_STORAGE_OPTIONS", "@/nonexistent/store.json")
    with pytest.raises(SystemExit) as exit_:
        parse_args((ModelArguments, DataArguments, TrainingArguments), base)
    assert exit_.value.code == 2


def test_qwen2_moe_shared_expert_gate_goes_to_adamw():
    config = AutoConfig.for_model("qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    found = {a.name: a for a in assign_parameters(build_on_meta(config))}
    gate = found["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.optimizer == "adamw" and gate.reason == "shared-expert gate"
    assert found["model.layers.0.mlp.gate.weight"].optimizer == "adamw"
    assert found["model.layers.0.mlp.shared_expert.gate_proj.weight"].optimizer == "muon"


def test_gpt_neox_fused_qkv_is_orthogonalised_per_projection_across_heads():
    """NeoX lays its query_key_value out [heads, (q, k, v), head_dim]: Muon's q is every head's q rows."""
    heads, head_dim, hidden = 4, 8, 32
    config = AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=hidden, num_hidden_layers=1,
                                  num_attention_heads=heads, intermediate_size=64)
    model = build_on_meta(config)
    qkv = {a.name: a for a in assign_parameters(model)}["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert qkv.layout.parts == (-2, (head_dim,) * 3, heads)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3 * hidden, hidden))
    group = {"params": [weight], "param_names": ["qkv"], **qkv.layout.group_keys()}
    opt = Muon([group], lr=1.0, momentum=0.0, nesterov=False)
    weight.grad = torch.randn_like(weight)
    opt.step()
    by_head = weight.grad.view(heads, 3, head_dim, hidden)
    for part in range(3):  # each projection's rows of every head, as one matrix
        rows = by_head[:, part].reshape(heads * head_dim, hidden)
        expected = -zeropower_via_newtonschulz(rows) * math.sqrt(max(1.0, rows.shape[0] / rows.shape[1]))
        torch.testing.assert_close(weight.detach().view(heads, 3, head_dim, hidden)[:, part].reshape(-1, hidden),
                                   expected)


def test_a_fresh_start_in_a_folder_of_another_run_is_refused_unless_overwritten(capsys, tmp_path):
    assert recipe(capsys, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path), *QUICK)[0] == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    code, err = recipe(capsys, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path), *QUICK)
    assert code == 2 and "holds the checkpoints of a run (newest step-2); continue it with --resume_from_checkpoint " \
                         "latest, or start over with --overwrite_output_dir" in one_line(err)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    code, _ = recipe(capsys, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path),
                     "--overwrite_output_dir", *QUICK)
    assert code == 0
    aside = next(tmp_path.glob("overwritten-*"))
    assert (aside / "checkpoints" / "step-2" / "COMPLETE").is_file() and (aside / "metrics.jsonl").read_text() == before


def test_an_epoch_end_checkpoint_carries_the_validation_loss(capsys, tmp_path):
    """Seed 004's habit: a checkpoint per epoch, each with its validation loss, whatever --eval_steps is."""
    code, _ = recipe(capsys, "--save_on_each_epoch", "--eval_steps", "0", "--num_train_epochs", "1",
                     "--block_size", "128", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), *QUICK)
    assert code == 0
    epoch_ends = [json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "checkpoints").glob("step-*")]
    epoch_ends = [m for m in epoch_ends if "epoch" in m["reasons"]]
    assert epoch_ends and all("val_loss" in m["metrics"] for m in epoch_ends)
    # Seed 004 resumes "from epoch N", counted from 1.
    from accel_trainer.checkpoint import resolve

    assert resolve("epoch-1", tmp_path).path.name == f"step-{epoch_ends[0]['step']}"
    # ... and `list` counts epochs as they do, naming the epoch-end checkpoint as the flag takes it.
    from accel_trainer.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["list", str(tmp_path)]) == 0
    first = f"step-{epoch_ends[0]['step']} "
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(first))
    assert row.split()[1] == "1" and "epoch-1" in row
    code, err = recipe(capsys, "--resume_from_checkpoint", "epoch-5", "--output_dir", str(tmp_path), *QUICK)
    assert code == 2 and "no checkpoint saved at the end of epoch 5 (epochs count from 1" in one_line(err)


def test_resuming_an_older_step_keeps_the_abandoned_branch_aside(capsys, tmp_path):
    """Seed 001's "continue from step 25000 with a lower LR": the newer checkpoints are not replaced."""
    from accel_trainer.checkpoint import resolve

    run = ["--save_steps", "2", "--eval_steps", "2", "--output_dir", str(tmp_path), *QUICK]
    assert recipe(capsys, "--max_steps", "6", *run)[0] == 0
    abandoned = {n: (tmp_path / "checkpoints" / n / "model.safetensors").read_bytes() for n in ("step-4", "step-6")}
    assert recipe(capsys, "--max_steps", "6", "--resume_from_checkpoint", "step-2", "--learning_rate", "1e-4",
                  *run)[0] == 0
    branch = next((tmp_path / "branches").glob("abandoned-*"))
    assert {n: (branch / n / "model.safetensors").read_bytes() for n in abandoned} == abandoned
    assert resolve("latest", tmp_path).path.name == "step-6"  # the new branch's
    assert cli_main(["list", str(tmp_path)]) == 0
    assert f"abandoned branch {branch}: step-4, step-6" in capsys.readouterr().out


def test_reset_optimizer_resumes_past_damaged_optimizer_files_saying_so(capsys, tmp_path):
    """#27: the only checkpoint's optimizer state is damaged (no intact older one): --reset_optimizer
    still continues from its weights, counters and data position, and says what it lost."""
    import shutil

    def run(out):
        return ["--save_steps", "4", "--eval_steps", "0", "--logging_steps", "1", "--output_dir", str(out), *QUICK]

    damaged_run, intact_run = tmp_path / "damaged", tmp_path / "intact"
    assert recipe(capsys, "--max_steps", "4", *run(damaged_run))[0] == 0
    shutil.copytree(damaged_run, intact_run)
    damaged = damaged_run / "checkpoints" / "step-4" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated: a size the manifest does not have
    resume = ["--max_steps", "6", "--resume_from_checkpoint", "latest"]
    code, err = recipe(capsys, *resume, *run(damaged_run))
    assert code == 2 and "optimizer.safetensors" in one_line(err)  # without the flag: refused, nothing loaded
    capsys.readouterr()
    assert run_main([*resume, "--reset_optimizer", *run(damaged_run)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "its optimizer state is damaged" in out and "optimizer.safetensors: size" in out
    assert "continuing at step 5" in out
    # Weights, counters, data position and RNG as an intact checkpoint resumed with a fresh optimizer gives.
    assert run_main([*resume, "--reset_optimizer", *run(intact_run)]) == 0
    assert "damaged" not in capsys.readouterr().out

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > 4}

    assert losses(damaged_run) == losses(intact_run) and sorted(losses(damaged_run)) == [5, 6]

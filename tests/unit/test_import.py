"""Bring your run: the four checkpoint formats of the guides users wrote (shared/seeds), each written
by a plain training loop as those guides' code does, imported as an ordinary checkpoint whose
weights and optimizer tensors equal the file's by name, that verifies, and that resumes at N+1."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from accel_trainer.checkpoint import verify
from accel_trainer.cli import main as cli_main
from accel_trainer.data import load_tokenizer, vocab_size_for
from accel_trainer.importing import main as import_main
from accel_trainer.models import ACCEL_MOE, MoEConfig, MoEForCausalLM
from accel_trainer.optim import Muon, assign_parameters
from accel_trainer.run import main as run_main

VOCAB = vocab_size_for(load_tokenizer("byte"))
QUICK = ["--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000", "--per_device_train_batch_size",
         "2", "--block_size", "32", "--logging_steps", "1"]


def train_a_little(model, optimizers, steps=3, vocab=VOCAB, scaler=None):
    """The guides' loop: forward, loss, backward, step (several optimizers as seed 001 has them)."""
    torch.manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 16))
        out = model(input_ids=ids, labels=ids)
        loss = out.loss if hasattr(out, "loss") else out
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


class Vocab25(nn.Module):
    """Seed 004's small vocab-25 model (its config a plain dict)."""

    def __init__(self, config):
        super().__init__()
        d = config["d_model"]
        self.embed = nn.Embedding(config["vocab_size"], d)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.dropout = nn.Dropout(config.get("dropout", 0.0))
        self.head = nn.Linear(d, config["vocab_size"])

    def forward(self, input_ids, labels=None):
        logits = self.head(self.dropout(self.block(self.embed(input_ids))))
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


@dataclasses.dataclass
class MoERunConfig:
    """Seed 001 pickled its config dataclass into the file."""

    preset: str = "tiny"
    lr: float = 0.02


def optimizer_tensors(folder):
    return load_file(str(folder / "optimizer.safetensors"))


def assert_imported(folder, model_state, named_states, step):
    assert not verify(folder), verify(folder)
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == model_state.keys()
    assert all(torch.equal(weights[k], v) for k, v in model_state.items())
    saved = optimizer_tensors(folder)
    for name, state in named_states.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                assert torch.equal(saved[f"{name}::{key}"], value), f"{name}::{key}"
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step


def test_seed_004_an_adam_run_of_your_own_module_saved_from_data_parallel(tmp_path):
    config = {"vocab_size": 25, "d_model": 16}
    model = Vocab25(config)
    wrapped = nn.DataParallel(model)  # its state_dict keys start with module.
    opt = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    train_a_little(wrapped, [opt], vocab=25)
    scheduler.step()
    scheduler.step()
    old = tmp_path / "my_experiment_epoch2.pt"
    torch.save({"epoch": 2, "model_state_dict": wrapped.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(), "best_val_loss": 2.5, "val_loss": 2.75,
                "config": config}, old)
    assert import_main([str(old), "--output_dir", str(tmp_path / "run")], model_factory=Vocab25,
                       model_config=config) == 0
    folder = tmp_path / "run" / "checkpoints" / "step-2"
    names = [n for n, _ in model.named_parameters()]
    states = {n: opt.state[p] for n, p in zip(names, model.parameters())}
    assert_imported(folder, model.state_dict(), states, step=2)
    assert json.loads((folder / "dataloader.json").read_text())["epoch"] == 2  # the next epoch, from its start
    run_config = json.loads((folder / "run_config.json").read_text())
    assert run_config["imported_from"]["config"] == config and run_config["adamw_params"] == ["."]
    assert run_config["imported_from"]["schedulers"][0]["last_epoch"] == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["best"]["value"] == 2.5 and manifest["metrics"] == {"val_loss": 2.75}


def llama_folder(tmp_path):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    config.save_pretrained(tmp_path / "llama")
    return config


def test_seed_002_a_compiled_adamw_run_with_a_scaler_imports_and_resumes_at_n_plus_1(tmp_path, capsys):
    config = llama_folder(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    compiled = torch.compile(model, backend="eager")  # its state_dict keys start with _orig_mod.
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    train_a_little(compiled, [opt])
    old = tmp_path / "best_model.pt"
    torch.save({"epoch": 1, "global_step": 3, "model_state_dict": compiled.state_dict(),
                "optimizer_state_dict": opt.state_dict(), "scheduler_state_dict": None,
                "scaler_state_dict": scaler.state_dict(), "best_val_loss": 3.0, "val_loss": 3.0,
                "train_ema_loss": 3.25, "config": config.to_dict()}, old)
    out = tmp_path / "run"
    # The guide's "resume" as users type it, in our flags: the file is imported, then trained on.
    args = ["--config_name", str(tmp_path / "llama"), "--output_dir", str(out), "--max_steps", "5",
            "--resume_from_checkpoint", str(old), *QUICK]
    assert run_main(args) == 0
    folder = out / "checkpoints" / "step-3"
    states = {n: opt.state[p] for n, p in model.named_parameters()}
    assert_imported(folder, model.state_dict(), states, step=3)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["ema_loss"] == 3.25
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "\"loss\"" in line]
    assert steps[0] == 4 and steps[-1] == 5  # N+1 onwards
    assert "imported" in capsys.readouterr().out
    # Resubmitting the same command continues from latest; it does not import again.
    assert run_main([a if a != "5" else "6" for a in args]) == 0
    assert "already imported" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-6").is_dir()


def test_seed_001_muon_and_adamw_of_our_moe_with_a_pickled_config_dataclass(tmp_path, capsys):
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**{**ACCEL_MOE.presets["tiny"], "vocab_size": VOCAB}))
    assignments = assign_parameters(model, rule=ACCEL_MOE.parameter_rule)
    params = dict(model.named_parameters())
    muon_names = [a.name for a in assignments if a.optimizer == "muon"]
    adamw_names = [a.name for a in assignments if a.optimizer == "adamw"]
    muon = Muon([params[n] for n in muon_names], lr=0.02)
    adamw = torch.optim.AdamW([params[n] for n in adamw_names], lr=1e-3)
    train_a_little(model, [muon, adamw], steps=2)
    old = tmp_path / "checkpoint_step_2.pt"
    torch.save({"step": 2, "model_state_dict": model.state_dict(),
                "optimizer_states": [muon.state_dict(), adamw.state_dict()], "scheduler_states": [],
                "config": MoERunConfig(), "metrics": {"val_loss": 5.0}, "tokens_seen": 64}, old)
    out = tmp_path / "run"
    assert cli_main(["import", str(old), "--output_dir", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"holds a pickled class {__name__}.MoERunConfig" in err
    assert f"--trust_pickled_class {__name__}.MoERunConfig" in err and "Traceback" not in err
    assert cli_main(["import", str(old), "--output_dir", str(out), "--preset", "tiny",
                     "--trust_pickled_class", f"{__name__}.MoERunConfig"]) == 0
    folder = out / "checkpoints" / "step-2"
    states = {n: muon.state[params[n]] for n in muon_names} | {n: adamw.state[params[n]] for n in adamw_names}
    assert_imported(folder, model.state_dict(), states, step=2)
    run_config = json.loads((folder / "run_config.json").read_text())
    assert run_config["imported_from"]["config"] == {"preset": "tiny", "lr": 0.02}
    assert json.loads((folder / "trainer_state.json").read_text())["tokens_seen"] == 64


def test_seed_003_gpt2_in_nanogpts_decay_groups_and_a_mismatch_named(tmp_path, capsys):
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    config.save_pretrained(tmp_path / "gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    train_a_little(model, [opt], steps=2)
    old = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2, "scheduler": None,
                "val_metrics": {"val_loss": 5.5}, "config": config.to_dict(), "version": "1.0"}, old)
    out = tmp_path / "run"
    assert cli_main(["import", str(old), "--output_dir", str(out), "--config_name", str(tmp_path / "gpt2")]) == 0
    folder = out / "checkpoints" / "step-2"
    states = {n: opt.state[p] for n, p in named}
    assert_imported(folder, {k: v for k, v in model.state_dict().items() if k in load_file(
        str(folder / "model.safetensors"))}, states, step=2)
    assert json.loads((folder / "run_config.json").read_text())["imported_from"]["other"]["version"] == "1.0"
    # Another model's flags: refused in one line naming the first difference.
    capsys.readouterr()
    assert cli_main(["import", str(old), "--output_dir", str(tmp_path / "other"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit preset tiny" in err and "Traceback" not in err
    # Weights and counters only.
    assert cli_main(["import", str(old), "--output_dir", str(tmp_path / "fresh"), "--config_name",
                     str(tmp_path / "gpt2"), "--reset_optimizer"]) == 0
    assert not optimizer_tensors(tmp_path / "fresh" / "checkpoints" / "step-2")


@pytest.mark.parametrize("bad", ["short", "shape"])
def test_an_optimizer_that_does_not_fit_is_refused_naming_the_first_mismatch(tmp_path, capsys, bad):
    config = {"vocab_size": 25, "d_model": 16}
    model = Vocab25(config)
    params = list(model.parameters())
    opt = torch.optim.Adam(params[:-1] if bad == "short" else params, lr=1e-3)
    train_a_little(model, [opt], vocab=25)
    state = opt.state_dict()
    if bad == "shape":
        state["state"][1]["exp_avg"] = torch.zeros(3, 3)
    old = tmp_path / "old.pt"
    torch.save({"epoch": 1, "model_state_dict": model.state_dict(), "optimizer_state_dict": state}, old)
    assert import_main([str(old), "--output_dir", str(tmp_path / "run")], model_factory=Vocab25,
                       model_config=config) == 2
    err = capsys.readouterr().err
    assert "optimizer does not fit this model" in err
    assert ("holds 8 parameters, the model's share is 9" in err if bad == "short"
            else "position 1 (exp_avg [3, 3]) is not" in err)


def test_a_single_file_never_loads_into_random_weights_silently(tmp_path):
    """Seed 004's file names no model type: without model_class= it is refused, with it it loads."""
    from accel_trainer import load_model_for_inference
    from accel_trainer.checkpoint import CheckpointError

    config = {"vocab_size": 25, "d_model": 16}
    torch.manual_seed(0)
    model = Vocab25(config).eval()
    old = tmp_path / "best_model.pt"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "config": config}, old)
    with pytest.raises(CheckpointError, match="0 of its tensors fit a MoEForCausalLM built from its config and .* "
                                              "the model would hold random weights. Pass model_class="):
        load_model_for_inference(old, device="cpu")
    loaded, loaded_config, step = load_model_for_inference(old, device="cpu", model_class=Vocab25)
    ids = torch.randint(0, 25, (1, 8))
    assert torch.equal(loaded(ids), model(ids)) and loaded_config == config and step == 3


def test_nanogpt_linear_layout_is_converted_into_gpt2s_conv1d(tmp_path):
    """nanoGPT keeps nn.Linear [out, in]; transformers' GPT-2 has Conv1D [in, out]. The square
    attn.c_proj cannot show its layout: the file's non-square matrices decide for all of them."""
    from accel_trainer import load_model_for_inference

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    nanogpt = {k: (v.t().contiguous() if k.endswith(conv) else v) for k, v in reference.state_dict().items()}
    old = tmp_path / "ckpt.pt"
    torch.save({"model": nanogpt, "config": config.to_dict(), "iter_num": 100}, old)
    model, _, _ = load_model_for_inference(old, device="cpu")
    assert len(model.load_report.transposed) == 8 and not model.load_report.mismatched
    ids = torch.randint(0, 64, (1, 10))
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_pickled_dataset_of_texts_or_token_ids_becomes_shards_and_a_pickled_object_is_refused(tmp_path, capsys):
    """Seed 002's dataset.pkl: read without running code (only lists, strings and numbers are built)."""
    import pickle

    from accel_trainer.data import read_prepared

    texts = [f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]
    (tmp_path / "texts.pkl").write_bytes(pickle.dumps(texts))
    assert cli_main(["prepare-data", "--data_files", str(tmp_path / "texts.pkl"), "--tokenizer_name", "byte",
                     "--output_dir", str(tmp_path / "texts")]) == 0
    ids = [[(i * 7 + j) % 200 for j in range(5 + i % 3)] for i in range(30)]
    (tmp_path / "ids.pkl").write_bytes(pickle.dumps(ids))
    assert cli_main(["prepare-data", "--data_files", str(tmp_path / "ids.pkl"), "--tokenizer_name", "byte",
                     "--output_dir", str(tmp_path / "ids")]) == 0
    manifest = read_prepared(tmp_path / "ids")
    assert manifest["total_tokens"] == sum(len(d) + 1 for d in ids)  # the ids as they are, each + EOS
    import numpy as np

    eos = load_tokenizer("byte").eos_token_id
    tokens = np.fromfile(tmp_path / "ids" / "shard-00000.bin", dtype=manifest.get("dtype", "uint16"))
    assert tokens.tolist() == [t for d in ids for t in [*d, eos]]
    (tmp_path / "object.pkl").write_bytes(pickle.dumps({"documents": MoERunConfig()}))
    capsys.readouterr()
    assert cli_main(["prepare-data", "--data_files", str(tmp_path / "object.pkl"), "--tokenizer_name", "byte",
                     "--output_dir", str(tmp_path / "object")]) == 2
    err = capsys.readouterr().err
    assert f"pickles {__name__}.MoERunConfig, which could run code when loaded" in err and "corpus.jsonl" in err
    assert "Traceback" not in err


def test_dropout_of_your_own_module_changes_on_resume_keeping_the_optimizer_state(tmp_path, capsys):
    """Seeds 002/004 fine-tune "with a different dropout": a setting, not an architecture change."""
    config = {"vocab_size": VOCAB, "d_model": 16, "dropout": 0.0}
    run = ["--output_dir", str(tmp_path), "--save_steps", "2", *QUICK]
    assert run_main([*run, "--max_steps", "2"], model_factory=Vocab25, model_config=config) == 0
    capsys.readouterr()
    assert run_main([*run, "--max_steps", "4", "--resume_from_checkpoint", "latest", "--config_overrides",
                     "dropout=0.25"], model_factory=Vocab25, model_config=config) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "--reset_optimizer" not in out
    saved = json.loads((tmp_path / "checkpoints" / "step-4" / "config.json").read_text())
    assert saved["accel_trainer_custom"]["config"]["dropout"] == 0.25
    code = run_main([*run, "--max_steps", "6", "--resume_from_checkpoint", "latest", "--config_overrides",
                     "d_model=32"], model_factory=Vocab25, model_config=config)
    assert code == 2 and "the model architecture differs" in capsys.readouterr().err

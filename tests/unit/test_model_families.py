"""The door for a new model family: a toy family registered from this file alone (its config and
model classes, a preset, a parameter rule of its own, an export format of its own) trains, plans
and exports through the same entry points as ours, with no edit anywhere else in the package."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from accel_trainer import load_model_for_inference
from accel_trainer.cli import main as cli_main
from accel_trainer.models import ModelFamily, family_of, register_family, unregister_family
from accel_trainer.optim import ParameterRule
from accel_trainer.run import main as run_main


class ToyConfig(PretrainedConfig):
    model_type = "toy_lm"

    def __init__(self, vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=128, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.max_position_embeddings = num_attention_heads, max_position_embeddings
        super().__init__(**kwargs)


class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.mix_gate = nn.Linear(d, d, bias=False)  # a gate: the family's rule sends it to AdamW

    def forward(self, x):
        h = self.norm(x)
        return x + self.mix(h) * torch.sigmoid(self.mix_gate(h))


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    _no_split_modules = ["ToyBlock"]

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, labels=None, **kwargs):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def write_flat(model, out, max_shard_bytes):
    """The toy family's own export format: one safetensors file and a note."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "toy.safetensors"))


TOY = ModelFamily(
    name="toy", model_type="toy_lm", config_class=ToyConfig, model_class=ToyForCausalLM,
    presets={"toy-small": dict(hidden_size=32, num_hidden_layers=2)}, defaults={"toy-small": {"block_size": 32}},
    parameter_rule=ParameterRule(adamw=((r"\.mix_gate\.weight$", "toy gate"),)),
    export_formats={"native": lambda m, out, n: m.save_pretrained(out), "toy_flat": write_flat},
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    register_family(TOY)
    out = tmp_path_factory.mktemp("toy")
    code = run_main(["--preset", "toy-small", "--max_steps", "3", "--save_steps", "3", "--output_dir", str(out),
                     "--report_to", "none", "--disable_tqdm", "--max_corpus_bytes", "20000",
                     "--per_device_train_batch_size", "2", "--logging_steps", "1"])
    yield code, out
    unregister_family("toy")


def test_a_registered_family_trains_with_its_own_parameter_rule(toy_run):
    code, out = toy_run
    assert code == 0
    step = out / "checkpoints" / "step-3"
    assert (step / "COMPLETE").is_file()
    config = json.loads((step / "config.json").read_text())
    assert config["model_type"] == "toy_lm" and family_of(config).name == "toy"
    run_config = json.loads((step / "run_config.json").read_text())
    assignment = run_config["optimizer_assignment"]
    assert "blocks.0.mix_gate.weight" in assignment["adamw"]["names"]  # the family's own rule
    assert "blocks.0.mix.weight" in assignment["muon"]["names"]
    assert {"embed.weight", "head.weight"} <= set(assignment["adamw"]["names"])
    assert run_config["block_size"] == 32  # the family's defaults for its preset


def test_a_registered_family_plans(toy_run, capsys):
    assert cli_main(["plan", "--preset", "toy-small", "--num_gpus", "1", "--gpu_memory_gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "preset toy-small" in out and "fits" in out


def test_a_registered_family_exports_in_its_formats(toy_run, tmp_path, capsys):
    _, out = toy_run
    model, _, step = load_model_for_inference(out / "checkpoints" / "step-3")
    assert isinstance(model, ToyForCausalLM) and step == 3
    ids = torch.tensor([[1, 2, 3, 4]])
    assert cli_main(["export", str(out), str(tmp_path / "native")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert isinstance(exported, ToyForCausalLM)
    torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert cli_main(["export", str(out), str(tmp_path / "flat"), "--format", "toy_flat"]) == 0
    flat = load_file(str(tmp_path / "flat" / "toy.safetensors"))
    assert torch.equal(flat["head.weight"], model.head.weight)
    assert cli_main(["export", str(out), str(tmp_path / "bad"), "--format", "qwen2_moe"]) == 2
    assert "--format='qwen2_moe': a toy model is written as one of native, toy_flat" in capsys.readouterr().err


def test_a_family_cannot_take_another_familys_preset():
    with pytest.raises(ValueError, match="preset\\(s\\) \\['tiny'\\] already belong to 'accel_moe'"):
        register_family(ModelFamily(name="copycat", presets={"tiny": {}}))

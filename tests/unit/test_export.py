"""Export to stock Qwen2-MoE: same logits for every shape of our model, sharded like HF writes it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from accel_trainer.export import export_model
from accel_trainer.models import MoEConfig, MoEForCausalLM


@pytest.mark.parametrize("shared,tied,norm_topk", [(16, False, True), (0, False, False), (16, True, True)])
def test_qwen2_moe_export_computes_the_same_function(tmp_path, shared, tied, norm_topk):
    torch.manual_seed(0)
    config = MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk,
                       shared_expert_intermediate_size=shared, tie_word_embeddings=tied)
    ours = MoEForCausalLM(config).eval()
    files = export_model(ours, tmp_path / "hf", max_shard_bytes=20_000)  # small shards: the index path
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.startswith("model-")} and len(files) > 3
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]  # the published layout
    assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]  # zeros, for readers that expect them

    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    assert not any(info.values()), info
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(MoEForCausalLM(MoEConfig()), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"

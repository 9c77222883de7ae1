"""Your own nn.Module through the whole trainer: a small GPT over a vocabulary of 25 (20 amino acids
and the specials), with crash-proof checkpoints, exact resume, Muon + AdamW, FSDP2 and every flag.

    accel-trainer train-tokenizer --alphabet ACDEFGHIKLMNPQRSTVWY --output_dir runs/aa-tok
    accelerate launch examples/custom_model.py --data_files proteins.jsonl --tokenizer_name runs/aa-tok \\
        --output_dir runs/gpt25 --max_steps 200 --block_size 128

The trainer needs a factory (here the class) and a config; forward(input_ids, labels) returns the
loss. Every checkpoint stores the config, so a notebook rebuilds the model from the folder alone:
``load_model_for_inference("runs/gpt25/checkpoints/best", model_class=TinyGPT)``.
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from accel_trainer.run import main


@dataclass
class GPTConfig:
    vocab_size: int = 25
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    block_size: int = 256  # the context: --block_size may not exceed it
    dropout: float = 0.1


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = nn.MultiheadAttention(c.d_model, c.n_head, dropout=c.dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model),
                                 nn.Dropout(c.dropout))

    def forward(self, x):
        causal = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    config_class = GPTConfig      # how a checkpoint's config.json becomes the config again
    _no_split_modules = ["Block"]  # what FSDP2 shards, --gradient_checkpointing recomputes, --torch_compile compiles

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tok, self.pos = nn.Embedding(config.vocab_size, config.d_model), nn.Embedding(config.block_size,
                                                                                           config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln, self.head = nn.LayerNorm(config.d_model), nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids, labels=None):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.size(1), device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


if __name__ == "__main__":
    sys.exit(main(model_factory=TinyGPT, model_config=GPTConfig()))

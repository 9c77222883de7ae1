"""Flagship recipe: an ~18B-parameter mixture-of-experts LM trained with Muon + AdamW.

    accelerate launch recipes/moe18b.py --preset tiny --max_steps 200 --output_dir runs/demo
    accelerate launch --config_file accelerate_configs/<env>.yaml recipes/moe18b.py --preset 18b ...

The presets below are the whole model definition; everything else is a flag (see ``--help``).
"""

from __future__ import annotations

import sys

from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from accel_trainer.run import exit_code_of, run

PRESETS = {
    # ~18.0e9 total / ~2.6e9 active parameters: 28 layers, 64 experts (6 routed + 1 shared per token).
    "18b": dict(vocab_size=65536, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=4, moe_intermediate_size=1536, num_experts=64, num_experts_per_tok=6,
                shared_expert_intermediate_size=2816, max_position_embeddings=4096),
    # Same family for one B200 (180 GB): ~7.5e9 total, bf16 weights + fp32 Muon/AdamW state fit.
    "b200": dict(vocab_size=65536, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, moe_intermediate_size=1408, num_experts=32, num_experts_per_tok=4,
                 shared_expert_intermediate_size=2816, max_position_embeddings=4096),
    # Same family for one 24 GB card (RTX 4090): ~0.57e9 total, ~16 bytes/param of training state.
    "4090": dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=16, num_attention_heads=8,
                 num_key_value_heads=4, moe_intermediate_size=512, num_experts=16, num_experts_per_tok=4,
                 shared_expert_intermediate_size=1024, max_position_embeddings=2048),
    # CPU smoke tests and the quick start: well under a second per step on 2 cores.
    "tiny": dict(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                 shared_expert_intermediate_size=128, max_position_embeddings=1024),
}
# Training defaults per preset (flags override them); the GPU presets train at their full context.
DEFAULTS = {"tiny": {"block_size": 128}}


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse_args((ModelArguments, DataArguments, TrainingArguments), argv)
    return exit_code_of(lambda: run(PRESETS, model_args, data_args, train_args, defaults=DEFAULTS),
                        output_dir=train_args.output_dir)


if __name__ == "__main__":
    sys.exit(main())

"""The MoE family's sizes, by name: the whole model definition of each preset (every other setting
is a flag). Parameter counts: ``accel-trainer params`` (meta device, nothing allocated).

Inside the package so that ``accel-trainer plan --preset 18b`` works from any folder in a regular
install; ``recipes/moe18b.py`` trains them.
"""

from __future__ import annotations

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
    # CPU smoke tests and the quick start: a step takes a fraction of a second on a laptop CPU.
    "tiny": dict(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                 shared_expert_intermediate_size=128, max_position_embeddings=1024),
}
# Training defaults per preset (flags override them); the GPU presets train at their full context.
DEFAULTS = {"tiny": {"block_size": 128}}

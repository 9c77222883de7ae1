"""Token generation for quick looks in notebooks (no KV cache: simple and exact, not fast)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to ``input_ids`` ([batch, seq]); greedy when ``temperature`` is 0.

    The context is cropped to the model's ``max_position_embeddings``.
    """
    window = model.config.max_position_embeddings
    ids = input_ids.to(next(model.parameters()).device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids[:, -window:]).logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                cutoff = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids

"""A small chat model for the fine-tuning tests: a Llama from a config, a byte-level BPE tokenizer
with a ChatML template whose assistant replies sit in ``{% generation %}`` markers, and generated
conversations (a system turn in some, 1-2 exchanges each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TEMPLATE = ("{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}"
            "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
            "{%- else -%}"
            "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")
WORDS = "the cat dog runs fast slow red blue green sky sea tree house car is a very big small".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})
        rows.append({"messages": turns})
    return rows


def make_chat_model(root: Path, n_conversations: int = 64) -> Path:
    """``root/llama`` (model + tokenizer with the template) and ``root/chat.jsonl``; returns ``root``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from accel_trainer.config import DataArguments
    from accel_trainer.data import load_raw_text, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(load_raw_text(DataArguments(max_corpus_bytes=60_000))["text"], 300, show_progress=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, **ids)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    with open(root / "chat.jsonl", "w") as f:
        for row in conversations(n_conversations):
            f.write(json.dumps(row) + "\n")
    return root

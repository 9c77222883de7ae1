"""A user's own training loop made crash-proof by the Checkpointer (real Accelerate, real files, a
tiny transformers model), shared by the tests of both lanes."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from accel_trainer.checkpoint import Checkpointer


class Counter:
    def __init__(self):
        self.tokens = 0

    def state_dict(self):
        return {"tokens": self.tokens}

    def load_state_dict(self, state):
        self.tokens = state["tokens"]


class StepCounter:
    """A loop's step, saved by name (the workers' loops)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class Loop:
    """A user's loop: model, AdamW, a transformers schedule, a shuffled loader, its own counter."""

    def __init__(self, out: Path, optimizers=("optimizer",), **ckpt_kwargs):
        self.accelerator = Accelerator(cpu=True)
        set_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                  max_position_embeddings=16, attention_dropout=0.2))
        params = list(self.model.parameters())
        groups = {name: params[i::len(optimizers)] for i, name in enumerate(optimizers)}
        opts = {name: torch.optim.AdamW(p, lr=1e-2) for name, p in groups.items()}
        scheds = {name: get_cosine_schedule_with_warmup(o, 2, 20) for name, o in opts.items()}
        data = torch.randint(0, 32, (40, 8), generator=torch.Generator().manual_seed(1))
        loader = DataLoader(data, batch_size=4, shuffle=True)
        prepared = self.accelerator.prepare(self.model, *opts.values(), loader, *scheds.values())
        self.model, rest = prepared[0], prepared[1:]
        self.optimizers = dict(zip(opts, rest[: len(opts)]))
        self.schedulers = dict(zip(scheds, rest[len(opts) + 1:]))
        self.counter = Counter()
        single = len(optimizers) == 1
        self.ckpt = Checkpointer(self.accelerator, out, model=self.model,
                                 optimizer=next(iter(self.optimizers.values())) if single else self.optimizers,
                                 scheduler=next(iter(self.schedulers.values())) if single else self.schedulers,
                                 dataloader=rest[len(opts)], extra={"loop": self.counter}, config={"lr": 1e-2},
                                 **ckpt_kwargs)
        self.batches = self._forever()

    def _forever(self):
        while True:
            yield from self.ckpt.dataloader

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            batch = next(self.batches)
            loss = self.model(input_ids=batch, labels=batch).loss
            self.accelerator.backward(loss)
            for name, opt in self.optimizers.items():
                opt.step()
                self.schedulers[name].step()
                opt.zero_grad()
            self.counter.tokens += batch.numel()
            losses.append(loss.item())
        return losses

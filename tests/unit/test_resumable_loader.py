"""Level 2: draw N batches, save the loader's position, rebuild everything, load, and the next M
batches are equal, mid-epoch and across epochs, for a plain shuffled loader and for the trainer's."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from accel_trainer.checkpoint import ResumableLoader
from accel_trainer.config import DataArguments
from accel_trainer.data import build_datasets, build_train_dataloader


def shuffled_loader():
    set_seed(0)  # a fresh process: the same seed, nothing else carried over
    return Accelerator(cpu=True).prepare(DataLoader(torch.arange(40), batch_size=4, shuffle=True))


@pytest.fixture(scope="module")
def trainer_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_data")
    return build_datasets(DataArguments(max_corpus_bytes=60_000), seed=7, output_dir=out, block_size=32,
                          progress=False).train


def trainer_loader(data):
    return Accelerator(cpu=True).prepare(build_train_dataloader(data, batch_size=4))


def draw(loader: ResumableLoader, n: int) -> list[torch.Tensor]:
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch["input_ids"] if isinstance(batch, dict) else batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("drawn", [3, 10, 13, 27])  # mid-epoch, at an epoch's end, in later epochs
def test_a_shuffled_loader_continues_with_the_next_batch(drawn):
    loader = ResumableLoader(shuffled_loader())
    reference = draw(loader, drawn + 15)
    saver = ResumableLoader(shuffled_loader())
    assert [b.tolist() for b in draw(saver, drawn)] == [b.tolist() for b in reference[:drawn]]
    state = json.loads(json.dumps(saver.state_dict()))  # through JSON, as on disk
    resumed = ResumableLoader(shuffled_loader())
    resumed.load_state_dict(state)
    assert [b.tolist() for b in draw(resumed, 15)] == [b.tolist() for b in reference[drawn:]]
    assert sorted(torch.cat(reference[:10]).tolist()) == list(range(40))  # an epoch is a permutation


def test_the_trainers_loader_continues_across_an_epoch(trainer_data):
    steps = len(trainer_loader(trainer_data))
    loader = ResumableLoader(trainer_loader(trainer_data))
    reference = draw(loader, steps + 5)
    saver = ResumableLoader(trainer_loader(trainer_data))
    draw(saver, steps - 3)
    resumed = ResumableLoader(trainer_loader(trainer_data))
    resumed.load_state_dict(saver.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(draw(resumed, 8), reference[steps - 3:]))
    assert resumed.epoch == 1


def test_a_position_between_batches_reads_the_partial_batch_again_with_a_note():
    resumed = ResumableLoader(shuffled_loader())
    resumed.load_state_dict({"epoch": 0, "samples_in_epoch": 6, "epoch_generator_state": None})
    assert resumed.samples_in_epoch == 4 and resumed.batches_left() == 9
    assert "6 samples into epoch 0 is not a multiple of this run's global batch of 4; the last 2" in resumed.notes[0]


def test_end_epoch_drops_the_rest_and_the_next_epoch_is_a_new_order():
    loader = ResumableLoader(shuffled_loader())
    first = draw(loader, 2)
    loader.end_epoch()
    assert (loader.epoch, loader.samples_in_epoch, loader.batches_left()) == (1, 0, 10)
    second = draw(loader, 10)
    assert sorted(torch.cat(second).tolist()) == list(range(40))
    assert [b.tolist() for b in second[:2]] != [b.tolist() for b in first]

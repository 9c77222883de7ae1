import pytest
import torch

from accel_trainer.config import DataArguments
from accel_trainer.data import (ByteTokenizer, EpochShuffleSampler, build_datasets,
                                load_raw_text, tokenize_and_pack)


@pytest.fixture(scope="module")
def data():
    return build_datasets(DataArguments(max_corpus_bytes=200_000, block_size=32), seed=7)


def test_packing_concatenates_documents_with_eos_into_equal_blocks():
    import datasets

    raw = datasets.Dataset.from_dict({"text": ["abc", "defgh", "ij"]})
    packed = tokenize_and_pack(raw, ByteTokenizer(), DataArguments(block_size=4))
    tok = ByteTokenizer()
    stream = tok.encode("abc") + [tok.eos_token_id] + tok.encode("defgh") + [tok.eos_token_id] + tok.encode("ij")
    assert packed["input_ids"] == [stream[0:4], stream[4:8], stream[8:12]]  # 13th token: tail dropped


def test_default_corpus_is_real_text_and_needs_no_download():
    raw = load_raw_text(DataArguments(max_corpus_bytes=50_000))
    text = "".join(raw["text"])
    assert 40_000 < len(text) <= 50_000
    assert "def " in text and "import" in text


def test_local_data_files_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_raw_text(DataArguments(data_files=[str(tmp_path / "a.txt")]))["text"] == ["hello world\nsecond line\n"]
    assert load_raw_text(DataArguments(data_files=[str(tmp_path / "b.jsonl")]))["text"] == ["one", "two"]


def test_bad_data_files_name_the_flag_and_path(tmp_path):
    with pytest.raises(ValueError, match="--data_files: no such file.*missing.txt"):
        load_raw_text(DataArguments(data_files=[str(tmp_path / "missing.txt")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="--data_files: file types \\['.csv'\\]"):
        load_raw_text(DataArguments(data_files=[str(tmp_path / "x.csv")]))
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="--text_column='text': not in the data's columns \\['body'\\]"):
        load_raw_text(DataArguments(data_files=[str(tmp_path / "c.jsonl")]))


def test_split_is_deterministic_from_seed(data):
    again = build_datasets(DataArguments(max_corpus_bytes=200_000, block_size=32), seed=7)
    other = build_datasets(DataArguments(max_corpus_bytes=200_000, block_size=32), seed=8)
    assert torch.equal(data.validation[:]["input_ids"], again.validation[:]["input_ids"])
    assert not torch.equal(data.validation[:]["input_ids"], other.validation[:]["input_ids"])
    assert data.train[0]["input_ids"].shape == (32,)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(100, seed=3), EpochShuffleSampler(100, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(100))
    b.set_epoch(1)
    assert list(a) == list(b)


def _consumed(order_sampler, batch, world, steps, skip=0):
    """Sample indices the processes of a world consume in ``steps`` per-process batches, in global order,
    using Accelerate's own sharding (BatchSamplerShard) and skipping (SkipBatchSampler)."""
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
    from torch.utils.data import BatchSampler

    per_rank = []
    for rank in range(world):
        shard = BatchSamplerShard(BatchSampler(order_sampler, batch, drop_last=True), num_processes=world,
                                  process_index=rank)
        per_rank.append([b for _, b in zip(range(steps), SkipBatchSampler(shard, skip_batches=skip))])
    return [i for step in zip(*per_rank) for b in step for i in b]


@pytest.mark.parametrize("before,after", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (3, 2)), ((1, 4), (2, 4))])
def test_global_sample_position_survives_a_world_size_change(before, after):
    """No sample of the epoch is seen twice or skipped when (world, batch) changes at a resume."""
    from accel_trainer.checkpoint.dataloader import position_to_skip

    sampler = EpochShuffleSampler(200, seed=5)
    sampler.set_epoch(3)
    (w1, b1), (w2, b2) = before, after
    first = _consumed(sampler, b1, w1, steps=6)
    skip, remainder = position_to_skip(len(first), b2 * w2)
    assert remainder == 0
    second = _consumed(sampler, b2, w2, steps=4, skip=skip)
    order = list(sampler)
    assert first + second == order[: len(first) + len(second)]

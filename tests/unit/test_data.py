"""The data path: tokenizers, token shards on disk, the seeded order, mixing, and resuming the order
at any position on any world size (levels 1 and 2: no training)."""

import json
import re
import time

import numpy as np
import pytest
from accelerate import Accelerator

from accel_trainer.data import shards as tokens_module
from accel_trainer.checkpoint import ResumableLoader
from accel_trainer.checkpoint.dataloader import position_to_skip
from accel_trainer.cli import main as cli_main
from accel_trainer.config import DataArguments
from accel_trainer.data import (Permutation, RunSampler, TrainBlocks, build_datasets, build_train_dataloader,
                                load_raw_text, mix_pattern, raw_source)
from accel_trainer.data import byte_tokenizer, load_tokenizer, train_tokenizer, vocab_size_for
from accel_trainer.data import DataError, TokenBlocks, prepare


@pytest.fixture(scope="module")
def corpus():
    return load_raw_text(DataArguments(max_corpus_bytes=400_000))


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus["text"], 600, show_progress=False).save_pretrained(folder)
    return folder


def prepared(corpus, tokenizer, out, shard_bytes=60_000, name="byte"):
    return prepare(corpus, "text", tokenizer, out, {"tokenizer_name": name}, shard_text_bytes=shard_bytes,
                   progress=False)


# -------------------------------------------------------------------------------- tokenizers
def test_the_byte_tokenizer_is_utf8_bytes_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    text = "héllo <|eos|> wörld\n\t∑"
    tok = byte_tokenizer()
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))  # "<|eos|>" stays text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258, 259)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert again.decode(list(text.encode("utf-8"))) == text and again.eos_token_id == 257
    assert vocab_size_for(tok) == 320


def test_a_trained_tokenizer_round_trips_and_loads_with_autotokenizer(bpe):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe)
    assert len(tok) == 600 and tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    for text in ("def main(argv=None):\n    return 12345\n", "naïve café — 東京 🙂", "<|eos|> is text here"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text and tok.eos_token_id not in ids
    assert len(tok.encode("def __init__(self):", add_special_tokens=False)) < len("def __init__(self):")  # merges
    assert load_tokenizer(str(bpe)).eos_token_id == tok.eos_token_id


def test_the_cli_trains_a_tokenizer_and_prepares_data(tmp_path, capsys):
    assert cli_main(["train-tokenizer", "--max_corpus_bytes", "100000", "--vocab_size", "400",
                     "--output_dir", str(tmp_path / "tok")]) == 0
    assert cli_main(["prepare-data", "--max_corpus_bytes", "100000", "--tokenizer_name", str(tmp_path / "tok"),
                     "--output_dir", str(tmp_path / "data"), "--num_proc", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained a byte-level BPE of 400 ids" in out and "train with --prepared_data" in out
    manifest = json.loads((tmp_path / "data" / "tokens.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["total_tokens"] > 20_000
    assert cli_main(["train-tokenizer", "--vocab_size", "100", "--output_dir", str(tmp_path / "t2")]) == 2
    assert "--vocab_size=100: must be at least 259" in capsys.readouterr().err


# ------------------------------------------------------------------------------ token shards
def test_an_interrupted_preparation_resumes_to_identical_shards(corpus, tmp_path, monkeypatch):
    clean = prepared(corpus, byte_tokenizer(), tmp_path / "clean")
    assert len(clean["shard_files"]) >= 4
    real, calls = tokens_module._write_shard, []

    def interrupted(out, i, parts, dtype):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill would, after two shards
        calls.append(i)
        return real(out, i, parts, dtype)

    monkeypatch.setattr(tokens_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepared(corpus, byte_tokenizer(), tmp_path / "again")
    assert not (tmp_path / "again" / "tokens.json").exists()
    with pytest.raises(DataError, match="its preparation did not finish"):
        TokenBlocks(tmp_path / "again", 64, 0.05)
    monkeypatch.setattr(tokens_module, "_write_shard", real)
    rewritten = []
    monkeypatch.setattr(tokens_module, "_write_shard", lambda *a: rewritten.append(a[1]) or real(*a))
    prepared(corpus, byte_tokenizer(), tmp_path / "again")
    assert rewritten == list(range(2, len(clean["shard_files"])))  # finished shards were kept
    for path in sorted((tmp_path / "clean").glob("shard-*")):
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name


def test_prepared_data_of_other_inputs_is_refused_and_every_document_ends_with_eos(corpus, tmp_path):
    manifest = prepared(corpus, byte_tokenizer(), tmp_path)
    with pytest.raises(DataError, match="prepared from other inputs \\(differs in tokenizer_name\\)"):
        prepared(corpus, byte_tokenizer(), tmp_path, name="other")
    shard = manifest["shard_files"][0]
    ids = np.fromfile(tmp_path / shard["tokens"]["file"], dtype=np.uint16)
    ends = np.fromfile(tmp_path / shard["index"]["file"], dtype=np.int64)
    assert (ids[ends - 1] == 257).all() and ends[-1] == len(ids) == shard["tokens_count"]
    first = bytes(ids[: ends[0] - 1].tolist()).decode("utf-8")
    assert first == corpus[0]["text"][: len(first)]


def test_blocks_never_cross_a_shard_end_and_the_tail_validates(corpus, tmp_path):
    prepared(corpus, byte_tokenizer(), tmp_path)
    blocks = TokenBlocks(tmp_path, 128, 0.05)
    counts = [s["tokens_count"] // 128 for s in blocks.manifest["shard_files"]]
    assert blocks.num_blocks == sum(counts) and blocks.num_validation == round(sum(counts) * 0.05)
    first_of_second_shard = blocks.block(counts[0])
    second = np.fromfile(tmp_path / blocks.manifest["shard_files"][1]["tokens"]["file"], dtype=np.uint16)
    assert np.array_equal(first_of_second_shard, second[:128])


# --------------------------------------------------------------------------------- the order
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
def test_the_permutation_is_a_bijection_decided_by_its_key(n):
    perm = Permutation(n, key=42)
    order = [perm(i) for i in range(n)]
    assert sorted(order) == list(range(n))
    if n > 10:
        assert order != list(range(n)) and order != [Permutation(n, key=43)(i) for i in range(n)]


def test_any_position_costs_the_same_to_locate():
    """O(1) resume: the block at sample 10^9 is found as fast as the one at sample 10 (no scan)."""
    perm = Permutation(10**9 + 7, key=1)
    for i in (10, 10**6, 10**9):
        start = time.perf_counter()
        assert 0 <= perm(i) < 10**9 + 7
        assert time.perf_counter() - start < 0.05


def test_the_mix_holds_its_weights_in_every_period():
    pattern = mix_pattern([0.7, 0.2, 0.1])
    assert [pattern.count(i) for i in range(3)] == [700, 200, 100]
    window = pattern[:10]
    assert window.count(0) == 7 and window.count(1) == 2 and window.count(2) == 1  # spread, not in runs


def test_a_weighted_mix_of_prepared_data_trains_in_its_proportions(corpus, tmp_path):
    prepared(corpus, byte_tokenizer(), tmp_path / "a")
    prepared(corpus.select(range(5)), byte_tokenizer(), tmp_path / "b")
    data = build_datasets(DataArguments(data_mix=[f"{tmp_path / 'a'}:0.75", f"{tmp_path / 'b'}:0.25"]), seed=3,
                          output_dir=tmp_path, block_size=64, progress=False)
    sources = [data.train.locate(g)[0] for g in range(4000)]
    assert sources.count(0) == 3000 and sources.count(1) == 1000
    small = data.train.sources[1].num_train
    seen = [data.train.locate(g)[1] for g in range(4000) if data.train.locate(g)[0] == 1][:small]
    assert sorted(seen) == list(range(small))  # the small source runs through its own epochs in full


def test_the_epoch_order_is_a_function_of_seed_epoch_and_index(corpus, tmp_path):
    prepared(corpus, byte_tokenizer(), tmp_path)
    source = [TokenBlocks(tmp_path, 64, 0.05)]
    a, b, c = TrainBlocks(source, seed=1), TrainBlocks(source, seed=1), TrainBlocks(source, seed=2)
    n = len(a)
    first = [a.locate(g)[1] for g in range(n)]
    assert sorted(first) == list(range(n))  # an epoch is a permutation of the training blocks
    assert first == [b.locate(g)[1] for g in range(n)] and first != [c.locate(g)[1] for g in range(n)]
    assert [a.locate(g)[1] for g in range(n, 2 * n)] != first  # another epoch, another order


def _consumed(sampler, batch, world, steps, start=0):
    """Sample indices the processes of a world consume in ``steps`` per-process batches, in global
    order, with Accelerate's own sharding (BatchSamplerShard)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    per_rank = []
    for rank in range(world):
        sampler.set_start(start)
        shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), num_processes=world, process_index=rank)
        per_rank.append([b for _, b in zip(range(steps), shard)])
    return [i for step in zip(*per_rank) for b in step for i in b]


@pytest.mark.parametrize("before,after", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (3, 2)), ((1, 4), (2, 4)),
                                          ((2, 4), (3, 4))])
def test_the_global_position_survives_a_world_size_change(before, after):
    """No sample of the epoch is seen twice or skipped when (world, batch) changes at a resume, even
    when the position is not a whole number of the new global batches."""
    sampler = RunSampler(200)
    sampler.set_epoch(3)
    (w1, b1), (w2, b2) = before, after
    first = _consumed(sampler, b1, w1, steps=6)
    second = _consumed(sampler, b2, w2, steps=4, start=len(first))
    assert first + second == list(range(600, 600 + len(first) + len(second)))
    assert position_to_skip(len(first), b2 * w2)[0] * b2 * w2 <= len(first)


def test_a_resumed_loader_with_workers_reads_the_same_blocks(corpus, tmp_path):
    """Level 2 with --dataloader_num_workers 2: draw, save the position, rebuild, load, the next
    batches are the same blocks (and the pass started where it was, skipping nothing)."""
    prepared(corpus, byte_tokenizer(), tmp_path)
    data = build_datasets(DataArguments(prepared_data=[str(tmp_path)]), seed=5, output_dir=tmp_path, block_size=64,
                          progress=False)

    def loader():
        return ResumableLoader(Accelerator(cpu=True).prepare(build_train_dataloader(data.train, 4, num_workers=2)))

    def draw(source, n):
        out = []
        while len(out) < n:
            for batch in source:
                out.append(batch["block"].tolist())
                if len(out) == n:
                    break
        return out

    steps = len(data.train) // 4
    reference = draw(loader(), steps + 3)
    saver = loader()
    draw(saver, steps - 2)
    state = json.loads(json.dumps(saver.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    assert resumed.starts_anywhere and resumed.batches_left() == 2
    assert draw(resumed, 5) == reference[steps - 2:]


def test_raw_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_raw_text(DataArguments(data_files=[str(tmp_path / "a.txt")]))["text"] == ["hello world\nsecond line\n"]
    assert load_raw_text(DataArguments(data_files=[str(tmp_path / "b.jsonl")]))["text"] == ["one", "two"]
    raw = load_raw_text(DataArguments(max_corpus_bytes=50_000))
    text = "".join(raw["text"])
    assert 40_000 < len(text) <= 50_000 and "def " in text and "import" in text  # the embedded corpus
    assert raw_source(DataArguments(max_corpus_bytes=10))["max_corpus_bytes"] == 10


def test_bad_data_files_name_the_flag_and_path(tmp_path):
    with pytest.raises(ValueError, match="--data_files: .*missing.txt: no such file"):
        load_raw_text(DataArguments(data_files=[str(tmp_path / "missing.txt")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="--data_files: file types \\['.csv'\\]"):
        load_raw_text(DataArguments(data_files=[str(tmp_path / "x.csv")]))
    with pytest.raises(ValueError, match="no such folder; make it with accel-trainer prepare-data"):
        TokenBlocks(tmp_path / "nope", 64, 0.05)
    with pytest.raises(ValueError, match="--data_mix 'a.txt': expected PATH:WEIGHT"):
        build_datasets(DataArguments(data_mix=["a.txt"]), 0, tmp_path, 64)
    with pytest.raises(ValueError, match="--tokenizer_name with --prepared_data: prepared data brings its own"):
        DataArguments(prepared_data=["x"], tokenizer_name="byte")


def test_training_from_a_weighted_mix_of_prepared_data(corpus, tmp_path, recipe_module, capsys):
    prepared(corpus, byte_tokenizer(), tmp_path / "a")
    prepared(corpus.select(range(5)), byte_tokenizer(), tmp_path / "b")
    args = ["--preset", "tiny", "--data_mix", f"{tmp_path / 'a'}:0.7", f"{tmp_path / 'b'}:0.3", "--block_size", "64",
            "--per_device_train_batch_size", "4", "--max_steps", "6", "--eval_steps", "3", "--report_to", "none",
            "--disable_tqdm", "--output_dir", str(tmp_path / "run"), "--logging_steps", "1"]
    assert recipe_module.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and "val_loss" in records[2]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-6" / "run_config.json").read_text())
    assert saved["data_mix"] == args[3:5] and not (tmp_path / "run" / "data").exists()  # nothing re-tokenised
    assert (tmp_path / "run" / "checkpoints" / "step-6" / "tokenizer.json").is_file()


LATIN1 = "caf\u00e9 cr\u00e8me\n".encode("latin-1")
BAD_FILES = {  # name: (bytes or None for a folder, what the one line must say)
    "empty.txt": (b"", r"empty.txt is empty"),
    "binary.txt": (b"ELF\x00\x01\x02" * 100, r"binary.txt holds binary data, not text \(a NUL byte at offset 3\)"),
    "latin1.txt": (LATIN1 * 50, r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\); if it is Latin-1.*iconv"),
    "bad.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"text": b}\n', r"bad.jsonl:3: invalid JSON \(Expecting value at "
                                                                  r"column 10\)"),
    "nocol.jsonl": (b'{"body": "x"}\n', r"nocol.jsonl:1: no 'text' key \(it has \['body'\]\); pass --text_column body"),
    "array.json": (b'[{"text": "a"}, {"content": "b"}]', r"array.json record 1: no 'text' key"),
    "dir": (None, r"dir is a directory; pass the files in it"),
    "missing.txt": ("missing", r"missing.txt: no such file"),
    "table.parquet": (b"not parquet at all", r"table.parquet is not a readable Parquet file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_is_one_line_naming_it_and_the_reason(tmp_path, name):
    from accel_trainer.data import DataError

    content, message = BAD_FILES[name]
    if content is None:
        (tmp_path / name).mkdir()
    elif content != "missing":
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"^--data_files: {re.escape(str(tmp_path))}/{message}") as err:
        load_raw_text(DataArguments(data_files=[str(tmp_path / name)]))
    assert "\n" not in str(err.value)


def test_too_little_data_says_how_much_there_is_and_what_to_do(tmp_path):
    from accel_trainer.data import DataError

    (tmp_path / "two.txt").write_text("hi")
    with pytest.raises(DataError, match=r"\(prepared from --data_files .*two.txt\): too little data: 3 tokens make "
                                        r"0 block\(s\) of --block_size=64.*smaller --block_size"):
        build_datasets(DataArguments(data_files=[str(tmp_path / "two.txt")]), 0, tmp_path / "out", 64, progress=False)


def test_a_hub_name_without_network_fails_in_seconds(monkeypatch):
    import time

    from accel_trainer import hub as raw_text
    from accel_trainer.data import TokenizerError, load_tokenizer
    from accel_trainer.data import DataError

    monkeypatch.setattr(raw_text, "hub_offline", lambda: False)
    monkeypatch.setattr(raw_text, "hub_reachable", lambda timeout=3.0: False)  # what no network gives
    began = time.perf_counter()
    with pytest.raises(DataError, match=r"--dataset_name='wikitext': the Hugging Face Hub is not reachable"):
        load_raw_text(DataArguments(dataset_name="wikitext"))
    with pytest.raises(TokenizerError, match=r"--tokenizer_name='gpt2': the Hugging Face Hub is not reachable"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match=r"--tokenizer_name='./tok': no such folder"):
        load_tokenizer("./tok")
    assert time.perf_counter() - began < 10


def test_the_hub_probe_answers_from_the_endpoint_it_would_use(monkeypatch):
    import socket

    from huggingface_hub import constants

    from accel_trainer.hub import hub_reachable
    from launching import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens: refused
    assert hub_reachable(timeout=1.0) is False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=1.0) is True


def test_accel_trainer_data_commands_report_bad_files_in_one_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    for verb in ("prepare-data", "train-tokenizer"):
        code = cli_main([verb, "--data_files", str(tmp_path / "latin1.txt"), "--output_dir", str(tmp_path / verb)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"accel-trainer {verb}: --data_files: ") and "not UTF-8" in err
        assert len(err.strip().splitlines()) == 1

"""Text data: load with `datasets`, tokenise, pack into fixed blocks, split, and serve in a seeded order.

The order of the training blocks in epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so
the global sample position ``(epoch, samples consumed in that epoch)`` identifies the next batch on
any number of processes; the checkpoint's :class:`~accel_trainer.checkpoint.ResumableLoader` resumes there.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from .config import DataArguments

EXTENSION_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                      ".jsonl": "json", ".parquet": "parquet"}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus BOS/EOS/PAD; needs no download and never fails on input."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(name: str):
    """``'byte'`` gives :class:`ByteTokenizer`; anything else goes to ``AutoTokenizer.from_pretrained``."""
    if name == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise ValueError(f"--tokenizer_name={name!r}: could not load it ({err}). "
                         "Use 'byte' for the built-in tokenizer that needs no download.") from None


def default_corpus_files() -> list[Path]:
    """The Python standard library's own source: real text that every machine running us has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def load_raw_text(args: DataArguments) -> datasets.Dataset:
    """Return a ``datasets.Dataset`` with a ``text`` column from the hub, local files, or the default corpus.

    Raises:
        ValueError: naming the flag and path when a file is missing, of an unknown type, or lacks the column.
    """
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    elif args.data_files:
        missing = [f for f in args.data_files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"--data_files: no such file(s): {', '.join(missing)}")
        exts = {Path(f).suffix.lower() for f in args.data_files}
        unknown = sorted(e for e in exts if e not in EXTENSION_BUILDERS)
        builders = {EXTENSION_BUILDERS[e] for e in exts if e in EXTENSION_BUILDERS}
        if unknown or len(builders) != 1:
            raise ValueError(f"--data_files: file types {sorted(exts)} are not one of the supported kinds "
                             f"(.txt/.md, .json/.jsonl, .parquet; one kind per run)")
        builder = builders.pop()
        extra = {"sample_by": "document"} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=list(args.data_files), split="train", **extra)
    else:
        texts, used = [], 0
        for path in default_corpus_files():
            if used >= args.max_corpus_bytes:
                break
            text = path.read_text(encoding="utf-8", errors="replace")[: args.max_corpus_bytes - used]
            texts.append(text)
            used += len(text)
        if not texts:
            raise ValueError("no --data_files or --dataset_name given and the embedded corpus (the Python "
                             "standard library source) was not found; pass --data_files")
        raw = datasets.Dataset.from_dict({"text": texts})
    if args.text_column not in raw.column_names:
        raise ValueError(f"--text_column={args.text_column!r}: not in the data's columns {raw.column_names}")
    return raw


def tokenize_and_pack(raw: datasets.Dataset, tokenizer, args: DataArguments) -> datasets.Dataset:
    """Tokenise every document, append EOS, concatenate and cut into blocks of ``block_size`` tokens.

    Returns:
        A dataset with one ``input_ids`` column of equal-length blocks; the tail shorter than a block
        in each map batch is dropped (as in transformers' run_clm example).
    """
    eos = tokenizer.eos_token_id
    column, block = args.text_column, args.block_size

    def tokenize(batch):
        return {"ids": [tokenizer.encode(t) + [eos] for t in batch[column]]}

    def pack(batch):
        flat = [tok for ids in batch["ids"] for tok in ids]
        usable = len(flat) // block * block
        return {"input_ids": [flat[i: i + block] for i in range(0, usable, block)]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names,
                        num_proc=args.preprocessing_num_workers, desc="tokenising")
    return tokenized.map(pack, batched=True, remove_columns=["ids"], num_proc=args.preprocessing_num_workers,
                         desc=f"packing into blocks of {block}")


@dataclass
class TextData:
    train: datasets.Dataset
    validation: datasets.Dataset
    tokenizer: object


def build_datasets(args: DataArguments, seed: int) -> TextData:
    """Load, tokenise and pack, then split blocks into train/validation deterministically from ``seed``."""
    tokenizer = load_tokenizer(args.tokenizer_name)
    packed = tokenize_and_pack(load_raw_text(args), tokenizer, args)
    if len(packed) < 4:
        raise ValueError(f"the data yields only {len(packed)} blocks of --block_size={args.block_size} tokens; "
                         "give more text or a smaller --block_size")
    n_val = max(1, round(len(packed) * args.validation_split_percentage / 100))
    split = packed.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return TextData(split["train"].with_format("torch"), split["test"].with_format("torch"), tokenizer)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``: resumable on any world size."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _own_generator(seed: int) -> torch.Generator:
    # Each DataLoader iterator draws a base seed; from the global RNG that draw would make the global
    # stream depend on how often loaders were (re)started, e.g. once more after a resume.
    return torch.Generator().manual_seed(seed)


def build_train_dataloader(dataset, batch_size: int, seed: int) -> DataLoader:
    # drop_last keeps every batch full, so each step sees the same number of tokens on every rank.
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), seed),
                      drop_last=True, generator=_own_generator(seed))


def build_eval_dataloader(dataset, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=_own_generator(seed))

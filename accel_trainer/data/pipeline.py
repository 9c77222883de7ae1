"""The data path of a pre-training run: text in, prepared token shards, blocks in a seeded order.

Every run trains from prepared token shards (:mod:`.shards`): ``--prepared_data`` names them
(several, concatenated; or ``--data_mix path:weight ...``), and ``--data_files``/``--dataset_name``
or the embedded corpus (the Python standard library's source) are prepared once into
``<output_dir>/data/`` and reused by every later launch. The order is :mod:`.order`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import DataArguments
from ..errors import ConfigError, DataError
from .order import RunSampler, TrainBlocks, ValidationBlocks
from .shards import TokenBlocks, prepare
from .sources import load_raw_text, raw_source
from .tokenizer import load_tokenizer


def prepare_raw(args: DataArguments, tokenizer, output_dir: str | Path, progress: bool = True) -> Path:
    """Prepare ``--data_files``/``--dataset_name``/the embedded corpus once, under
    ``<output_dir>/data/<key>``; later launches with the same inputs reuse it."""
    source = raw_source(args)
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(output_dir) / "data" / key
    if not (path / "tokens.json").is_file():
        prepare(load_raw_text(args), args.text_column, tokenizer, path, source,
                num_proc=args.preprocessing_num_workers or 1, progress=progress)
    return path


@dataclass
class TextData:
    train: TrainBlocks
    validation: ValidationBlocks
    tokenizer: object
    sources: list[Path]


def parse_mix(items: list[str]) -> tuple[list[str], list[float]]:
    """``["data/a:0.7", "data/b:0.3"]`` -> paths and weights.

    Raises:
        ConfigError: an item without a positive weight.
    """
    paths, weights = [], []
    for item in items:
        path, sep, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not path or not value > 0:
            raise ConfigError(f"--data_mix {item!r}: expected PATH:WEIGHT with a weight > 0, e.g. data/web:0.7")
        paths.append(path)
        weights.append(value)
    return paths, weights


def build_datasets(args: DataArguments, seed: int, output_dir: str | Path, block_size: int,
                   progress: bool = True) -> TextData:
    """The training and validation blocks of this run (preparing raw data first if given).

    Raises:
        ConfigError/DataError: naming the flag and path.
    """
    if args.chat_data:
        return _chat_datasets(args, seed, output_dir, block_size, progress)
    weights = None
    if args.data_mix:
        paths, weights = parse_mix(args.data_mix)
    elif args.prepared_data:
        paths = list(args.prepared_data)
    else:
        paths = [prepare_raw(args, load_tokenizer(args.tokenizer_name or "byte"), output_dir, progress)]
    sources = [TokenBlocks(Path(p), block_size, args.validation_split_percentage / 100) for p in paths]
    tokenizer_files = {(s.tokenizer_dir / "tokenizer.json").read_bytes() for s in sources}
    if len(tokenizer_files) > 1:
        raise DataError(f"{', '.join(paths)}: prepared with different tokenizers; a mix needs one tokenizer")
    tokenizer = load_tokenizer(str(sources[0].tokenizer_dir))
    return TextData(TrainBlocks(sources, seed, weights), ValidationBlocks(sources), tokenizer, [Path(p) for p in paths])


def _chat_datasets(args: DataArguments, seed: int, output_dir: str | Path, block_size: int,
                   progress: bool) -> TextData:
    """``--chat_data``: rendered once under ``<output_dir>/data/chat-<key>`` (the key from the
    files' and the tokenizer's contents), rows of one or (``--packing``) several conversations."""
    from .chat import ChatRows, chat_source, prepare_chat
    from .sources import tokenizer_identity

    source = chat_source(list(args.chat_data), tokenizer_identity(args.tokenizer_name))
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(output_dir) / "data" / f"chat-{key}"
    tokenizer = load_tokenizer(args.tokenizer_name or "byte")
    prepare_chat(list(args.chat_data), tokenizer, path, source, progress, num_proc=args.preprocessing_num_workers or 1)
    rows = ChatRows(path, block_size, args.validation_split_percentage / 100, packing=args.packing)
    if progress:
        cut = (f"; {rows.truncated} longer than --block_size={block_size} are cut to it (raise it to keep them "
               "whole)") if rows.truncated else ""
        print(f"--chat_data: {rows.manifest['conversations']} conversations, {rows.manifest['assistant_tokens']:,} of "
              f"{rows.manifest['total_tokens']:,} tokens the assistant's (the loss is on those), in "
              f"{rows.num_blocks} rows of {block_size}" + (" (packed)" if args.packing else "") + cut)
    return TextData(TrainBlocks([rows], seed), ValidationBlocks([rows]), load_tokenizer(str(rows.tokenizer_dir)),
                    [path])


def _own_generator() -> torch.Generator:
    # Each DataLoader iterator draws a base seed (for its workers); from the global RNG that draw
    # would make the global stream depend on how often loaders were (re)started, e.g. after a resume.
    return torch.Generator().manual_seed(0)


def build_train_dataloader(dataset: TrainBlocks, batch_size: int, num_workers: int = 0) -> DataLoader:
    # drop_last keeps every batch full, so each step sees the same number of tokens on every rank.
    return DataLoader(dataset, batch_size=batch_size, sampler=RunSampler(len(dataset)), drop_last=True,
                      num_workers=num_workers, persistent_workers=num_workers > 0, generator=_own_generator())


def build_eval_dataloader(dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=_own_generator())

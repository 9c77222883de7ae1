"""The data path, text in to token blocks out; this module is its face (import from here only).

* :mod:`.sources`: raw text (local files checked up front, a Hub dataset, the embedded corpus);
* :mod:`.tokenizer`: the built-in byte tokenizer, trained byte-level BPEs, any tokenizer folder;
* :mod:`.shards`: ``prepare-data``'s token shards on disk, memory-mapped as fixed-size blocks;
* :mod:`.order`: the seeded, O(1)-resumable training order and weighted mixes;
* :mod:`.pipeline`: a run's datasets and loaders, built from :class:`~accel_trainer.config.DataArguments`.

The modules import each other downwards only (pipeline -> order -> shards -> tokenizer; sources
stands alone); a test walks the import graph of the whole package and finds no cycle.
"""

from ..errors import DataError, TokenizerError
from .order import MIX_PERIOD, Permutation, RunSampler, TrainBlocks, ValidationBlocks, mix_pattern
from .pipeline import (TextData, build_datasets, build_eval_dataloader, build_train_dataloader, parse_mix,
                       prepare_raw)
from .shards import TOKENIZER_DIR, TokenBlocks, prepare, read_prepared
from .sources import (DATA_IDENTITY_VERSION, check_data_files, data_contents, data_identity, default_corpus_files,
                      file_hashes, legacy_data_identity, load_raw_text, raw_source)
from .tokenizer import (byte_tokenizer, character_tokenizer, load_tokenizer, token_byte_lengths, train_tokenizer,
                        vocab_size_for)

__all__ = ["DATA_IDENTITY_VERSION", "DataError", "MIX_PERIOD", "Permutation", "RunSampler", "TOKENIZER_DIR",
           "TextData", "TokenBlocks", "TokenizerError", "TrainBlocks", "ValidationBlocks", "build_datasets",
           "build_eval_dataloader",
           "build_train_dataloader", "byte_tokenizer", "character_tokenizer", "check_data_files", "data_contents",
           "data_identity", "default_corpus_files", "file_hashes", "legacy_data_identity", "load_raw_text",
           "load_tokenizer", "mix_pattern", "parse_mix", "prepare", "prepare_raw", "raw_source", "read_prepared",
           "token_byte_lengths", "train_tokenizer", "vocab_size_for"]

"""Tokenizers, all of them ``transformers`` fast tokenizers, saved as folders that
``AutoTokenizer.from_pretrained`` loads:

* ``byte`` (the zero-setup default): UTF-8 bytes are ids 0-255, then BOS, EOS, PAD (256-258);
* a byte-level BPE trained on your text with the ``tokenizers`` library (``accel-trainer
  train-tokenizer``), split like GPT-4's tokenizer (words, numbers of up to 3 digits, punctuation
  runs, whitespace) before the byte-level BPE, as nanochat trains its own;
* any tokenizer folder or Hub name (``--tokenizer_name``).

Special tokens written in a document's text are encoded as text, never as the special token
(``encode_special_tokens``): a corpus cannot inject an EOS.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenizerError

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (what ByteLevel works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    # split_special_tokens: "<|eos|>" in a document's text stays text (saved with the tokenizer).
    # Left padding: a batch of prompts for a decoder-only model must end where generation starts.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, split_special_tokens=True,
                                   padding_side="left")


def byte_tokenizer():
    """UTF-8 bytes as ids 0-255 plus BOS/EOS/PAD (256-258); never fails on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(backend)


def character_tokenizer(alphabet: str):
    """One id per character of ``alphabet`` (in its order), then an UNK for any other character and
    BOS/EOS/PAD: the tokenizer of a small-vocabulary model (20 amino acids make 24 ids).

    Raises:
        TokenizerError: an empty alphabet or one with a character twice.
    """
    from tokenizers import Tokenizer, decoders, models

    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise TokenizerError(f"--alphabet={alphabet!r}: give each character once (e.g. ACDEFGHIKLMNPQRSTVWY)")
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab[UNK] = len(vocab)  # BPE's unknown token must be in its own vocabulary
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([UNK, *SPECIAL_TOKENS])
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False, split_special_tokens=True,
                                   padding_side="left")


def train_tokenizer(texts, vocab_size: int, num_texts: int | None = None, show_progress: bool = True):
    """A byte-level BPE of ``vocab_size`` ids (BOS/EOS/PAD included) trained on ``texts`` (an iterable
    of strings; ``num_texts`` sizes the progress bar).

    Raises:
        TokenizerError: ``vocab_size`` too small to hold the 256 bytes and the special tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"--vocab_size={vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                             "(the 256 bytes and BOS/EOS/PAD)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    backend.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return _wrap(backend)


def load_tokenizer(name: str):
    """``byte``, a tokenizer folder, or a Hub name (fails fast when offline).

    Raises:
        TokenizerError: naming ``--tokenizer_name`` and what to do.
    """
    if name == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name)
    if not path.exists():
        if name.startswith((".", "~", "/")) or name.count("/") > 1:
            raise TokenizerError(f"--tokenizer_name={name!r}: no such folder")
        from ..hub import require_hub

        require_hub("--tokenizer_name", name, TokenizerError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        where = "folder" if path.exists() else "folder or Hub name (no network here?)"
        raise TokenizerError(f"--tokenizer_name={name!r}: could not load it as a tokenizer {where} "
                             f"({str(err).splitlines()[0][:200]}); use 'byte' for the built-in one") from None
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"--tokenizer_name={name!r}: has no EOS token (documents are separated by EOS)")
    if getattr(tokenizer, "backend_tokenizer", None) is not None:  # text never turns into special tokens
        tokenizer.backend_tokenizer.encode_special_tokens = True
    return tokenizer


def token_byte_lengths(tokenizer):
    """UTF-8 bytes of text each id stands for (an int64 array over the tokenizer's ids); 0 for special
    tokens. Exact for byte-level BPEs (each token is a run of bytes, partial characters included);
    for other tokenizers, the bytes of each id decoded on its own.

    Bits per byte divide a loss summed over tokens by these bytes: runs with different tokenizers compare.
    """
    import numpy as np

    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder)
    special = set(tokenizer.all_special_ids)
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            continue
        if byte_level and all(char in byte_of for char in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def vocab_size_for(tokenizer) -> int:
    """The embedding size for a tokenizer: its ids rounded up to a multiple of 128 (64 under 16k),
    the sizes GPU matrix kernels are fastest on."""
    n = len(tokenizer)
    multiple = 128 if n >= 16384 else 64
    return -(-n // multiple) * multiple

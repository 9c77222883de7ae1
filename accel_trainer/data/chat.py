"""Chat data: conversations rendered by the tokenizer's chat template, the loss on the assistant's
tokens only, each conversation a row of its own or packed with others (``--packing``).

    <output_dir>/data/chat-<key>/
        tokenizer/           the tokenizer (and chat template) the conversations were rendered with
        tokens.bin           token ids of every conversation, one after another (uint16 or uint32)
        mask.bin             one byte per token: 1 where the assistant speaks (the loss is there)
        index.bin            int64 end offset of every conversation
        chat.json            written last: the source by content, counts, xxh3-128 of the three files

Which tokens are the assistant's comes from the template's ``{% generation %}`` markers, as in
transformers' ``return_assistant_tokens_mask`` (what TRL's ``assistant_only_loss`` uses). Rows are a
pure function of the conversations' lengths and ``--block_size``, so the run's order and its O(1)
resume are :mod:`.order`'s as for text. In a row, each conversation's positions restart at 0 and
its first token is never a target; the padding after the last one is a segment of its own, no target.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_text, read_json
from ..errors import DataError
from .shards import write_array
from .sources import file_identity

FORMAT = "accel_trainer.chat/1"
MANIFEST, TOKENIZER_DIR = "chat.json", "tokenizer"
FILES = {"tokens": "tokens.bin", "mask": "mask.bin", "index": "index.bin"}
IGNORE = -100  # the label of a token that is not a target (transformers' and PyTorch's ignore_index)
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def check_chat_template(tokenizer, where: str) -> None:
    """The tokenizer must render conversations and mark the assistant's part.

    Raises:
        DataError: no chat template, or one without ``{% generation %}`` markers; naming ``where``.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise DataError(f"--chat_data: the tokenizer {where} has no chat template; give a tokenizer that has one "
                        "(--tokenizer_name), or add chat_template.jinja to its folder")
    if not GENERATION_MARKER.search(template):
        raise DataError(f"--chat_data: the chat template of the tokenizer {where} has no {{% generation %}} markers, "
                        "so the assistant's tokens cannot be told from the rest; wrap each assistant reply in "
                        "{% generation %}...{% endgeneration %} in its chat_template.jinja (as TRL's "
                        "assistant_only_loss asks)")


def read_conversations(path: str | Path) -> list[tuple[int, list[dict]]]:
    """``(line number, messages)`` of every row of a JSON-lines file.

    Raises:
        DataError: naming the file, the line and what is wrong.
    """
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"--chat_data {path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"--chat_data {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--chat_data {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: each row needs 'messages', a list of {{\"role\", \"content\"}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation")
        out.append((number, messages))
    if not out:
        raise DataError(f"--chat_data {path}: no conversations in it")
    return out


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of one conversation and, per token, 1 where the assistant speaks."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def chat_source(files: list[str], tokenizer_identity: str) -> dict:
    """What the chat data is, by content (no paths): every file's xxh3 in order, and the tokenizer."""
    # file_identity's digest: hashed once per process, shared with the run's data identity
    return {"format": FORMAT, "files": [file_identity(f, "--chat_data")["xxh3_128"] for f in files],
            "tokenizer": tokenizer_identity}


_WORKER: dict = {}
CHUNK = 256  # conversations per task of a rendering process


def _init_worker(tokenizer_dir: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from .tokenizer import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(tokenizer_dir)


def _render_chunk(chunk: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    return [render(_WORKER["tokenizer"], messages) for messages in chunk]


def _rendered(conversations: list, tokenizer, tokenizer_dir: Path, num_proc: int):
    """``render`` of every conversation, in order: in this process, or in ``num_proc`` forked ones
    (the template is Python-side Jinja, so processes are what makes it faster)."""
    if num_proc <= 1 or len(conversations) <= CHUNK:
        yield from (render(tokenizer, m) for *_, m in conversations)
        return
    import multiprocessing

    chunks = [[m for *_, m in conversations[a: a + CHUNK]] for a in range(0, len(conversations), CHUNK)]
    with multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (str(tokenizer_dir),)) as pool:
        for part in pool.imap(_render_chunk, chunks):
            yield from part
        pool.close()  # the workers leave on their own before the block ends (see shards._prepare)
        pool.join()


def prepare_chat(files: list[str], tokenizer, out: Path, source: dict, progress: bool = True,
                 num_proc: int = 1) -> dict:
    """Render every conversation of ``files`` once into ``out`` (kept for later launches).

    Args:
        num_proc: rendering processes (``--preprocessing_num_workers``).

    Raises:
        DataError: bad rows, a template without markers, a conversation with no assistant token.
    """
    from tqdm.auto import tqdm

    from ..console import interactive

    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST)
        if manifest.get("source") == source:
            return manifest
    check_chat_template(tokenizer, f"{getattr(tokenizer, 'name_or_path', '')!r}")
    conversations = [(f, line, m) for f in files for line, m in read_conversations(f)]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    tokens, masks, ends = [], [], []
    total = 0
    bar = tqdm(total=len(conversations), unit="conversation", desc=f"rendering chats into {out}",
               disable=not progress or not interactive())
    for n, (ids, mask) in enumerate(_rendered(conversations, tokenizer, out / TOKENIZER_DIR, num_proc)):
        if not any(mask):
            where, line, _ = conversations[n]
            raise DataError(f"--chat_data {where}:{line}: no assistant token after rendering (the template's "
                            "{% generation %} markers wrap nothing there)")
        tokens.append(np.asarray(ids, dtype=np.int64))
        masks.append(np.asarray(mask, dtype=np.uint8))
        total += len(ids)
        ends.append(total)
        bar.update(1)
    bar.close()
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    arrays = {"tokens": np.concatenate(tokens).astype(dtype), "mask": np.concatenate(masks),
              "index": np.asarray(ends, dtype=np.int64)}
    hashes = {key: write_array(array, out / FILES[key]) for key, array in arrays.items()}
    manifest = {"format": FORMAT, "source": source, "dtype": np.dtype(dtype).name, "conversations": len(ends),
                "total_tokens": total, "assistant_tokens": int(arrays["mask"].sum()), "xxh3_128": hashes,
                "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Items (by index) into bins of ``capacity``: best fit, longest first, never split.

    Each item goes into the open bin with the least room that still holds it (a new bin when none
    does); the room left in open bins is kept as sorted distinct values, so this is O(n log n).
    Deterministic: equal lengths keep their order, and each bin lists its items in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rooms: list[int] = []               # distinct room values that some bin has, sorted
    with_room: dict[int, list[int]] = {}  # room -> bins with exactly that room
    bins: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        k = bisect.bisect_left(rooms, need)
        if k == len(rooms):
            bins.append([i])
            b, left = len(bins) - 1, capacity - need
        else:
            room = rooms[k]
            b = with_room[room].pop()
            if not with_room[room]:
                del with_room[room]
                rooms.pop(k)
            bins[b].append(i)
            left = room - need
        if left > 0:
            if left not in with_room:
                bisect.insort(rooms, left)
                with_room[left] = []
            with_room[left].append(b)
    return [sorted(b) for b in bins]


@dataclass
class ChatRows:
    """The rows of prepared chat data for one ``--block_size``; the first ``num_train`` train, the
    rest (the conversations at the end of the data) validate. A conversation longer than a row is
    cut to ``block_size`` tokens (counted in ``truncated``)."""

    path: Path
    block_size: int
    validation_fraction: float
    packing: bool = False

    def __post_init__(self):
        self.manifest = read_chat(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.ends = np.fromfile(self.path / FILES["index"], dtype=np.int64)
        self.starts = np.concatenate([[0], self.ends[:-1]])
        lengths = self.ends - self.starts
        self.lengths = np.minimum(lengths, self.block_size)
        self.truncated = int((lengths > self.block_size).sum())
        n = len(self.ends)
        n_val = max(1, round(n * self.validation_fraction)) if n > 1 else 0
        train, val = np.arange(n - n_val), np.arange(n - n_val, n)
        train_rows, val_rows = self._rows(train), self._rows(val)
        self.rows = train_rows + val_rows
        self.num_train, self.num_validation = len(train_rows), len(val_rows)
        self.num_blocks = len(self.rows)
        self.pad_id = int(self.manifest["pad_token_id"])
        self._maps: dict = {}
        self._pid = None

    def _rows(self, conversations: np.ndarray) -> list[list[int]]:
        if not self.packing:
            return [[int(c)] for c in conversations]
        return [[int(conversations[i]) for i in row] for row in best_fit(self.lengths[conversations], self.block_size)]

    def __getstate__(self):  # DataLoader workers re-open the maps in their own process
        return {k: v for k, v in self.__dict__.items() if k != "_maps"} | {"_maps": {}}

    def _map(self, key: str, dtype) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if key not in self._maps:
            self._maps[key] = np.memmap(self.path / FILES[key], dtype=dtype, mode="r")
        return self._maps[key]

    def item(self, r: int) -> dict:
        """Row ``r``: ``input_ids``, ``labels`` (-100 but on the assistant's tokens, and never a
        conversation's first token) and ``position_ids`` (restarting per conversation)."""
        tokens, mask = self._map("tokens", self.dtype), self._map("mask", np.uint8)
        ids = np.full(self.block_size, self.pad_id, dtype=np.int64)
        labels = np.full(self.block_size, IGNORE, dtype=np.int64)
        positions = np.zeros(self.block_size, dtype=np.int64)
        at = 0
        for c in self.rows[r]:
            start, length = int(self.starts[c]), int(self.lengths[c])
            piece = tokens[start: start + length].astype(np.int64)
            ids[at: at + length] = piece
            labels[at: at + length] = np.where(mask[start: start + length] > 0, piece, IGNORE)
            labels[at] = IGNORE  # no token before it in this conversation predicts it
            positions[at: at + length] = np.arange(length)
            at += length
        positions[at:] = np.arange(self.block_size - at)  # the padding: a segment of its own
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR


def read_chat(path: Path) -> dict:
    """The manifest of prepared chat data.

    Raises:
        DataError: not complete prepared chat data, or a file of another size than recorded.
    """
    if not (path / MANIFEST).is_file():
        raise DataError(f"{path}: not prepared chat data (no {MANIFEST}); it is made by a run with --chat_data")
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path / MANIFEST}: format {manifest.get('format')!r}, this accel_trainer reads {FORMAT!r}")
    sizes = {"tokens": manifest["total_tokens"] * np.dtype(manifest["dtype"]).itemsize,
             "mask": manifest["total_tokens"], "index": manifest["conversations"] * 8}
    for key, size in sizes.items():
        file = path / FILES[key]
        if not file.is_file() or file.stat().st_size != size:
            raise DataError(f"{file}: missing or not {size} bytes; delete {path} and run again to prepare it anew")
    return manifest

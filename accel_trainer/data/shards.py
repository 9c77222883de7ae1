"""Token shards on disk: ``accel-trainer prepare-data`` writes them once, every training run
memory-maps them (no tokenisation at launch, no copy of the corpus in any process's RAM).

    data/x/
        plan.json            the source, the tokenizer, and which documents go to which shard
        tokenizer/           the tokenizer the shards were made with (AutoTokenizer loads it)
        shard-00000.bin      token ids (uint16, or uint32 for vocabularies over 65,536), each
                             document followed by EOS
        shard-00000.idx      int64 end offset of every document in the shard
        shard-00000.json     the shard's marker: token and document counts, xxh3-128 of both files
        tokens.json          written last: the prepared data is complete (totals, every shard)

Shards are planned from the documents before any is written, so an interrupted preparation resumes
with the same plan: shards whose marker verifies are kept, the others are made again, and the result
is byte for byte what an uninterrupted run writes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_text, fsync_file, hash_file, read_json
from ..errors import DataError
from .sources import TOKEN_IDS

FORMAT = "accel_trainer.tokens/1"
PLAN, COMPLETE_MANIFEST, TOKENIZER_DIR = "plan.json", "tokens.json", "tokenizer"
SHARD_TEXT_BYTES = 256 << 20  # ~64M tokens of English per shard
CHUNK_DOCUMENTS = 2000


def shard_name(i: int, suffix: str) -> str:
    return f"shard-{i:05d}.{suffix}"


# ------------------------------------------------------------------------------------- writing
_WORKER: dict = {}


def _init_worker(dataset, column: str, tokenizer_dir: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no threads inside
    from .tokenizer import load_tokenizer

    _WORKER.update(dataset=dataset, column=column, tokenizer=load_tokenizer(tokenizer_dir))


def _tokenize_range(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of documents ``[start, end)``, each followed by EOS, and their end offsets."""
    start, end = bounds
    tokenizer = _WORKER["tokenizer"]
    texts = _WORKER["dataset"][start:end][_WORKER["column"]]
    if _WORKER["column"] == TOKEN_IDS:  # pre-tokenised documents: the ids as they are
        ids = texts
    else:
        backend = tokenizer.backend_tokenizer
        # The Rust tokenizer directly: no attention masks or offsets built only to be dropped.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    ends = np.cumsum(np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids)))
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[ends - 1] = False
    tokens[is_text] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(is_text.sum()))
    tokens[~is_text] = tokenizer.eos_token_id
    return tokens, ends


def prepare(dataset, column: str, tokenizer, output_dir: str | Path, source: dict, num_proc: int = 1,
            shard_text_bytes: int = SHARD_TEXT_BYTES, progress: bool = True) -> dict:
    """Tokenise ``dataset[column]`` into shards under ``output_dir``; resumes an interrupted run.

    Args:
        dataset: a ``datasets.Dataset`` of documents.
        column: the text column.
        tokenizer: a ``transformers`` tokenizer (saved into ``output_dir/tokenizer``).
        source: what the documents are (flags), recorded so a rerun on other data is refused.
        num_proc: tokenising processes.
        shard_text_bytes: about how much text goes to one shard.

    Returns:
        The completed ``tokens.json`` manifest.

    Raises:
        DataError: ``output_dir`` holds a preparation of other data or with another tokenizer, or
            its disk is full (or fails) while the shards are written.
    """
    out = Path(output_dir)
    if TOKEN_IDS in dataset.column_names and column not in dataset.column_names:
        column = TOKEN_IDS
        largest = max((max(d) for d in dataset[TOKEN_IDS] if d), default=-1)
        if largest >= len(tokenizer):
            raise DataError(f"--data_files: token id {largest} is not below the tokenizer's {len(tokenizer)} ids; "
                            "give the --tokenizer_name the ids were made with")
    out.mkdir(parents=True, exist_ok=True)
    if (out / COMPLETE_MANIFEST).is_file():
        manifest = read_prepared(out)
        _check_same(out, manifest, source)
        return manifest
    try:
        return _prepare(dataset, column, tokenizer, out, source, num_proc, shard_text_bytes, progress)
    except OSError as err:  # a full or failing disk: one line; the shards written so far are kept
        for partial in out.glob(".tmp-*"):
            partial.unlink(missing_ok=True)
        raise DataError(f"{out}: could not write the prepared data ({err.strerror or err}); free space on that disk "
                        "(or prepare elsewhere) and run again: the shards already written are kept and it continues "
                        "from there") from None


def _prepare(dataset, column: str, tokenizer, out: Path, source: dict, num_proc: int, shard_text_bytes: int,
             progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ..console import interactive

    plan = _plan(dataset, tokenizer, out, source, shard_text_bytes)
    dtype = np.dtype(plan["dtype"])
    todo = [i for i in range(len(plan["shards"])) if not _shard_done(out, i)]
    began, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=plan["num_documents"], unit="doc", desc=f"tokenising into {out}",
               disable=not progress or not interactive(),
               initial=plan["num_documents"] - sum(b - a for i, (a, b) in enumerate(plan["shards"]) if i in todo))
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(max(1, num_proc), _init_worker, (dataset, column, str(out / TOKENIZER_DIR))) as pool:
        for i in todo:
            start, end = plan["shards"][i]
            # Several chunks per process, so that every process has work even in a small shard.
            size = max(1, min(CHUNK_DOCUMENTS, math.ceil((end - start) / (4 * max(1, num_proc)))))
            chunks = [(a, min(a + size, end)) for a in range(start, end, size)]
            parts = []
            for tokens, ends in pool.imap(_tokenize_range, chunks):
                parts.append((tokens, ends))
                bar.update(len(ends))
            new_tokens += _write_shard(out, i, parts, dtype)
        # Workers leave on their own before the block ends: its terminate() SIGTERMs them, and one killed
        # while it holds the task queue's lock leaves another blocked on it and the join waiting forever
        # (seen once in the suite).
        pool.close()
        pool.join()
    bar.close()
    seconds = time.perf_counter() - began
    manifest = _complete(out, plan)
    if progress and todo:
        print(f"prepared {out}: {manifest['total_tokens']:,} tokens in {len(plan['shards'])} shards; "
              f"{new_tokens:,} tokens tokenised now in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):,.0f} "
              f"tokens/s)")
    return manifest


def _plan(dataset, tokenizer, out: Path, source: dict, shard_text_bytes: int) -> dict:
    """The shard plan, made once: a rerun reuses it so that it writes the same shards."""
    if (out / PLAN).is_file():
        plan = read_json(out / PLAN)
        if plan.get("source") != source:  # unfinished, and its inputs changed since: start over
            print(f"{out}: an unfinished preparation of other inputs is there; preparing again from the start")
            for stale in [*out.glob("shard-*"), out / PLAN]:
                stale.unlink()
        else:
            return plan
    n = len(dataset)
    if n == 0:
        raise DataError(f"{out}: the data has no documents")
    num_shards = max(1, min(n, math.ceil(dataset.data.nbytes / shard_text_bytes)))
    per_shard = math.ceil(n / num_shards)
    shards = [[a, min(a + per_shard, n)] for a in range(0, n, per_shard)]
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    plan = {"format": FORMAT, "source": source, "num_documents": n, "shards": shards,
            "dtype": "uint16" if len(tokenizer) <= 2**16 else "uint32",
            "tokenizer": {"name": source.get("tokenizer_name"), "vocab": len(tokenizer),
                          "eos_token_id": tokenizer.eos_token_id}}
    atomic_write_text(out / PLAN, json.dumps(plan, indent=2) + "\n")
    return plan


def _check_same(out: Path, recorded: dict, source: dict) -> None:
    if recorded.get("source") != source:
        from .sources import changed_files

        before = recorded.get("source", {})
        edited = changed_files(before, source) if before.get("data_files") == source.get("data_files") else []
        if edited:
            raise DataError(f"{out} was prepared from other contents of {', '.join(edited)} (the file changed since); "
                            "pass another --output_dir or remove it to prepare the new contents")
        changed = sorted(k for k in set(source) | set(before) if k != "files" and source.get(k) != before.get(k))
        raise DataError(f"{out} holds data prepared from other inputs (differs in {', '.join(changed)}); "
                        "pass another --output_dir or remove it")


def _shard_done(out: Path, i: int) -> bool:
    marker = out / shard_name(i, "json")
    if not marker.is_file():
        return False
    try:
        info = read_json(marker)
        return all((out / info[k]["file"]).is_file() and hash_file(out / info[k]["file"]) == info[k]["xxh3_128"]
                   for k in ("tokens", "index"))
    except (DataError, KeyError, TypeError, OSError, ValueError):
        return False


def write_array(array: np.ndarray, path: Path) -> str:
    """``array``'s bytes as ``path``, atomically (a temporary file, fsynced, renamed); its xxh3-128."""
    tmp = path.with_name(f".tmp-{path.name}")
    array.tofile(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    return hash_file(path)


def _write_shard(out: Path, i: int, parts: list, dtype: np.dtype) -> int:
    tokens = np.concatenate([t for t, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
    offsets, ends = 0, []
    for t, e in parts:
        ends.append(e + offsets)
        offsets += len(t)
    ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    info = {"documents": int(len(ends)), "tokens_count": int(len(tokens))}
    for key, array, suffix in (("tokens", tokens.astype(dtype), "bin"), ("index", ends.astype(np.int64), "idx")):
        path = out / shard_name(i, suffix)
        info[key] = {"file": path.name, "xxh3_128": write_array(array, path)}
    atomic_write_text(out / shard_name(i, "json"), json.dumps(info, indent=2) + "\n")
    return len(tokens)


def _complete(out: Path, plan: dict) -> dict:
    shards = [read_json(out / shard_name(i, "json")) for i in range(len(plan["shards"]))]
    manifest = {**plan, "shard_files": shards, "total_tokens": sum(s["tokens_count"] for s in shards),
                "total_documents": sum(s["documents"] for s in shards)}
    atomic_write_text(out / COMPLETE_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------------------- reading
def read_prepared(path: str | Path) -> dict:
    """The manifest of complete prepared data.

    Raises:
        DataError: not prepared data, or its preparation did not finish.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--prepared_data={str(path)!r}: no such folder; make it with accel-trainer prepare-data")
    if not (path / COMPLETE_MANIFEST).is_file():
        what = "its preparation did not finish (run prepare-data again to resume it)" if (path / PLAN).is_file() \
            else "not prepared data (no tokens.json); make it with accel-trainer prepare-data"
        raise DataError(f"--prepared_data={str(path)!r}: {what}")
    try:
        manifest = read_json(path / COMPLETE_MANIFEST)
    except Exception as err:  # an unreadable manifest, in any way
        raise DataError(f"--prepared_data={str(path)!r}: {err}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path / COMPLETE_MANIFEST}: format {manifest.get('format')!r}, this accel_trainer reads "
                        f"{FORMAT!r}")
    for shard in manifest["shard_files"]:
        file = path / shard["tokens"]["file"]
        expected = shard["tokens_count"] * np.dtype(manifest["dtype"]).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise DataError(f"{file}: missing or not {expected} bytes; prepare the data again")
    return manifest


@dataclass
class TokenBlocks:
    """Fixed-size blocks of one prepared dataset, memory-mapped; block ``b`` never crosses a shard's end.

    The first ``num_train`` blocks train; the last ``num_validation`` (the tail of the data) validate.
    """

    path: Path
    block_size: int
    validation_fraction: float

    def __post_init__(self):
        self.manifest = read_prepared(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        counts = np.array([s["tokens_count"] // self.block_size for s in self.manifest["shard_files"]], dtype=np.int64)
        self.shard_ends = np.cumsum(counts)
        self.num_blocks = int(self.shard_ends[-1]) if len(counts) else 0
        self.num_validation = max(1, round(self.num_blocks * self.validation_fraction)) if self.num_blocks > 1 else 0
        self.num_train = self.num_blocks - self.num_validation
        self._maps: dict[int, np.memmap] = {}
        self._pid = None

    def __getstate__(self):  # DataLoader workers re-open the maps in their own process
        return {k: v for k, v in self.__dict__.items() if k != "_maps"} | {"_maps": {}}

    def block(self, b: int) -> np.ndarray:
        """Tokens of block ``b`` (a view into the memory map)."""
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        shard = int(np.searchsorted(self.shard_ends, b, side="right"))
        first = int(self.shard_ends[shard - 1]) if shard else 0
        tokens = self._maps.get(shard)
        if tokens is None:
            file = self.path / self.manifest["shard_files"][shard]["tokens"]["file"]
            tokens = self._maps[shard] = np.memmap(file, dtype=self.dtype, mode="r")
        start = (b - first) * self.block_size
        return tokens[start: start + self.block_size]

    def item(self, b: int) -> dict:
        """Block ``b`` as a training item: ``{"input_ids": int64 tokens}`` (its own next-token targets)."""
        return {"input_ids": torch.from_numpy(self.block(b).astype(np.int64))}

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

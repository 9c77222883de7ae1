"""Raw text in: local files, a Hub dataset, or the embedded corpus, checked before any work.

Every file is checked up front so that a bad one fails in one line that names it and the reason
(empty, binary, not UTF-8, a bad JSON line, a missing column), instead of an error from deep inside
the ``datasets`` builders that names neither. A Hub name fails in seconds when the Hub cannot be
reached (or with ``HF_HUB_OFFLINE`` set and nothing cached), not after a minute of retries.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import sysconfig
import time
from pathlib import Path

from ..config import DataArguments
from ..errors import DataError
from ..hub import require_hub

EXTENSION_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                      ".jsonl": "json", ".parquet": "parquet", ".pkl": "pickle", ".pickle": "pickle"}
# The column of pre-tokenised documents (a pickled list of token-id lists): no tokenising, ids as they are.
TOKEN_IDS = "input_ids"
CHUNK = 1 << 20


def default_corpus_files() -> list[Path]:
    """The Python standard library's own source: real text that every machine running us has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


# ---------------------------------------------------------------------------------- local files
def check_data_files(files: list[str], text_column: str) -> str:
    """Check every ``--data_files`` entry before any work; returns the ``datasets`` builder to read them.

    Raises:
        DataError: one line naming the file (and line or byte) and what is wrong.
    """
    for f in files:
        path = Path(f)
        if path.is_dir():
            raise DataError(f"--data_files: {f} is a directory; pass the files in it (e.g. {f.rstrip('/')}/*.jsonl)")
        if not path.is_file():
            raise DataError(f"--data_files: {f}: no such file")
    exts = {Path(f).suffix.lower() for f in files}
    builders = {EXTENSION_BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise DataError(f"--data_files: file types {sorted(exts)} are not one of the supported kinds "
                        "(.txt/.md, .json/.jsonl, .parquet, .pkl of a list of texts or of token-id lists; one kind "
                        "per run)")
    builder = builders.pop()
    if builder == "text" and text_column != "text":
        raise DataError(f"--text_column={text_column!r}: text files have one column, 'text'; leave --text_column out")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"--data_files: {f} is empty")
        if builder == "pickle":
            read_pickled_documents(f)
        else:
            {"text": _check_text, "json": _check_json, "parquet": _check_parquet}[builder](f, text_column)
    return builder


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds lists, tuples, dicts, strings and numbers, which the pickle opcodes make by themselves;
    any class or function the file names is refused, so no code of the file ever runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_pickled_documents(path: str | Path) -> tuple[str, list]:
    """``("text", [str, ...])`` or ``("input_ids", [[int, ...], ...])`` from a pickled dataset
    (seed 002's ``dataset.pkl``), read without running any code.

    Raises:
        DataError: anything else in the file (a class, an array), naming it and the conversion to run.
    """
    convert = ("convert it where you trust it: python -c \"import json, pickle; [print(json.dumps({'text': t})) "
               f"for t in pickle.load(open('{path}', 'rb'))]\" > corpus.jsonl, and pass corpus.jsonl")
    try:
        with open(path, "rb") as f:
            obj = _DataOnlyUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise DataError(f"--data_files: {path} pickles {err}, which could run code when loaded; {convert}") from None
    except (EOFError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"--data_files: {path} is not a readable pickle ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text"), list):
        obj = obj["text"]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(d, dict) and isinstance(d.get("text"), str)
                                                      for d in obj):
        obj = [d["text"] for d in obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(d, str) for d in obj):
        return "text", list(obj)
    if isinstance(obj, (list, tuple)) and obj and all(
            isinstance(d, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in d)
            for d in obj):
        return TOKEN_IDS, [list(d) for d in obj]
    kind = type(obj).__name__ + (f" of {type(obj[0]).__name__}" if isinstance(obj, (list, tuple)) and obj else "")
    raise DataError(f"--data_files: {path} holds a {kind}, not a list of texts or of token-id lists; {convert}")


def _check_text(f: str, _column: str) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")("strict"), 0
    with open(f, "rb") as stream:
        while chunk := stream.read(CHUNK):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(f"--data_files: {f} holds binary data, not text (a NUL byte at offset {offset + nul})")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(_not_utf8(f, offset + err.start, chunk[err.start])) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"--data_files: {f} is not UTF-8 text (it ends inside a multi-byte character)") from None


def _not_utf8(f: str, offset: int, byte: int) -> str:
    return (f"--data_files: {f} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); if it is Latin-1 or "
            f"cp1252, convert it first: iconv -f latin1 -t utf-8 {f} > {Path(f).stem}.utf8{Path(f).suffix}")


def _check_json(f: str, column: str) -> None:
    with open(f, "rb") as stream:
        head = stream.read(CHUNK).lstrip()
    if head.startswith(b"["):  # one JSON array of records
        try:
            records = json.loads(Path(f).read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"--data_files: {f} is not valid JSON ({err})") from None
        for i, record in enumerate(records if isinstance(records, list) else [records]):
            _check_record(f"{f} record {i}", record, column)
        return
    with open(f, "rb") as stream:  # JSON lines: one object per line
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as err:
                raise DataError(f"--data_files: {f}:{number}: not UTF-8 ({err.reason})") from None
            except json.JSONDecodeError as err:
                hint = (" (a file holding one JSON object over several lines is not supported: use one object "
                        "per line)") \
                    if number == 1 and raw.strip() == b"{" else ""
                raise DataError(f"--data_files: {f}:{number}: invalid JSON ({err.msg} at column {err.colno}){hint}") \
                    from None
            _check_record(f"{f}:{number}", record, column)


def _check_record(where: str, record, column: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"--data_files: {where}: expected a JSON object with a {column!r} key, got "
                        f"{type(record).__name__}")
    if column not in record:
        texts = [k for k, v in record.items() if isinstance(v, str)]
        hint = f"; pass --text_column {texts[0]}" if len(texts) == 1 else ""
        raise DataError(f"--data_files: {where}: no {column!r} key (it has {sorted(record)}){hint}")
    if record[column] is None:
        raise DataError(f"--data_files: {where}: {column!r} is null; give the row its text or remove the row")
    if not isinstance(record[column], str):
        raise DataError(f"--data_files: {where}: {column!r} is a {type(record[column]).__name__}, not text")


def _check_parquet(f: str, column: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(f).names
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise DataError(f"--data_files: {f} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if column not in names:
        raise DataError(f"--data_files: {f}: no {column!r} column (it has {names}); pass --text_column NAME")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


# ----------------------------------------------------------------------------------------- load
def load_raw_text(args: DataArguments):
    """A ``datasets.Dataset`` of documents from the Hub, local files, or the embedded corpus.

    Raises:
        DataError: one line naming the flag, file and reason.
    """
    import datasets

    from ..console import quiet_library_bars

    quiet_library_bars("datasets")
    if args.dataset_name:
        require_hub("--dataset_name", args.dataset_name)
        try:
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        except Exception as err:
            raise DataError(f"--dataset_name={args.dataset_name!r}: could not load it ({_root_cause(err)})") from None
    elif args.data_files and check_data_files(list(args.data_files), args.text_column) == "pickle":
        columns: dict[str, list] = {}
        for f in sorted(args.data_files):
            column, documents = read_pickled_documents(f)
            columns.setdefault(column, []).extend(documents)
        if len(columns) > 1:
            raise DataError("--data_files: some pickles hold texts and some token ids; give one kind per run")
        raw = datasets.Dataset.from_dict(columns)
        if TOKEN_IDS in columns:
            return raw  # pre-tokenised: the column is the ids, whatever --text_column says
    elif args.data_files:
        builder = check_data_files(list(args.data_files), args.text_column)
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            raw = datasets.load_dataset(builder, data_files=list(args.data_files), split="train", **extra)
        except Exception as err:  # what the checks above did not foresee, still in one line
            raise DataError(f"--data_files: could not read {', '.join(args.data_files)} ({_root_cause(err)})") from None
    else:
        texts, used = [], 0
        for path in default_corpus_files():
            if used >= args.max_corpus_bytes:
                break
            text = path.read_text(encoding="utf-8", errors="replace")[: args.max_corpus_bytes - used]
            texts.append(text)
            used += len(text)
        if not texts:
            raise DataError("no --data_files or --dataset_name given and the embedded corpus (the Python "
                            "standard library source) was not found; pass --data_files")
        raw = datasets.Dataset.from_dict({"text": texts})
    if args.text_column not in raw.column_names:
        raise DataError(f"--text_column={args.text_column!r}: not in the data's columns {raw.column_names}")
    return raw


def file_identity(path: str | Path, flag: str = "--data_files") -> dict:
    """What a source file is, by content: its size, modification time and xxh3-128 of its bytes
    (streamed; cheap next to tokenising it)."""
    from ..checkpoint import hash_file

    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        raise DataError(f"{flag}: {path}: no such file") from None
    # Hashed once per process while the file stays as it is. The change time is in the key because a
    # write sets it and, unlike the modification time, no one can set it back (`touch -d`, os.utime).
    # A file changed within the last seconds is hashed every time: a second write in the same
    # clock tick would leave every time stamp as it was (git's "racily clean" entries).
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    digest = _IDENTITIES.get(key)
    if digest is None:
        digest = hash_file(path)
        if time.time_ns() - stat.st_ctime_ns > 2_000_000_000:
            _IDENTITIES[key] = digest
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "xxh3_128": digest}


_IDENTITIES: dict[tuple, str] = {}


def raw_source(args: DataArguments) -> dict:
    """What raw data is: the flags that decide the documents and their tokens, and every local file
    by content (``files``): an edited file is other data, never trained on as its old tokens."""
    files = sorted(args.data_files) if args.data_files else None
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "data_files": files, "text_column": args.text_column,
            "tokenizer_name": args.tokenizer_name or "byte",
            "max_corpus_bytes": None if (args.dataset_name or args.data_files) else args.max_corpus_bytes,
            "files": {f: {k: v for k, v in file_identity(f).items() if k != "mtime_ns"} for f in files or ()}}


#: The version of :func:`data_identity`: 2 identifies data by contents alone (paths are not identity).
DATA_IDENTITY_VERSION = 2


def tokenizer_identity(name: str | None) -> str:
    """A tokenizer by content: a local folder's files hashed (any path to the same files is the same
    tokenizer), else its name (``byte``, a Hub name)."""
    import hashlib

    from ..checkpoint import hash_file

    name = name or "byte"
    folder = Path(name)
    if not folder.is_dir():
        return name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".txt", ".model", ".jinja"))
    return "sha256:" + hashlib.sha256(json.dumps([[p.name, hash_file(p)] for p in files]).encode()).hexdigest()[:16]


def data_contents(args: DataArguments) -> dict:
    """What this run trains on, by content alone: every local file's bytes in the order they are read
    (sorted by path, as :func:`load_raw_text` reads them), or the prepared folders' manifests
    (``tokens.json``) in order with their weights; the tokenizer by content; the flags that decide the
    documents. No path: the same bytes at another path (a relative path, a copy, another machine)
    are the same data."""
    from ..checkpoint import hash_file

    if args.chat_data:  # rendered by the tokenizer's template, in rows of one or (packing) several
        return {"chat": [file_identity(f, "--chat_data")["xxh3_128"] for f in args.chat_data],
                "tokenizer": tokenizer_identity(args.tokenizer_name), "packing": args.packing}
    if args.data_mix or args.prepared_data:
        items = args.data_mix or [f"{f}:1" for f in args.prepared_data]
        parts = [item.rpartition(":") for item in items]
        return {"prepared": [[hash_file(Path(f) / "tokens.json") if (Path(f) / "tokens.json").is_file() else None,
                              weight] for f, _, weight in parts]}
    files = sorted(args.data_files) if args.data_files else []
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "text_column": args.text_column, "tokenizer": tokenizer_identity(args.tokenizer_name),
            "max_corpus_bytes": None if (args.dataset_name or args.data_files) else args.max_corpus_bytes,
            "files": [[Path(f).suffix, file_identity(f)["xxh3_128"]] for f in files]}


def data_identity(args: DataArguments) -> str:
    """One digest of :func:`data_contents`. A resume compares it with the checkpoint's."""
    import hashlib

    return hashlib.sha256(json.dumps(data_contents(args), sort_keys=True).encode()).hexdigest()[:16]


def legacy_data_identity(args: DataArguments) -> str:
    """The identity runs recorded before :data:`DATA_IDENTITY_VERSION` 2 (paths included), so that
    their checkpoints still resume on the same paths."""
    import hashlib

    from ..checkpoint import hash_file

    folders = [item.rpartition(":")[0] for item in args.data_mix] if args.data_mix else args.prepared_data
    if folders:
        what = {str(f): hash_file(Path(f) / "tokens.json") if (Path(f) / "tokens.json").is_file() else None
                for f in folders}
    else:
        what = raw_source(args)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def file_hashes(args: DataArguments) -> dict[str, str]:
    """Every local ``--data_files`` file's xxh3 (recorded with a run, so that a refused resume can
    name the files that changed)."""
    return {f: file_identity(f)["xxh3_128"] for f in sorted([*(args.data_files or ()), *(args.chat_data or ())])
            if Path(f).is_file()}


def changed_files(recorded: dict, source: dict) -> list[str]:
    """The local files whose content differs between two :func:`raw_source` records."""
    then, now = recorded.get("files") or {}, source.get("files") or {}
    return sorted(f for f in set(then) | set(now) if then.get(f) != now.get(f))

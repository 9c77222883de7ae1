"""Object storage (``s3://...`` or any fsspec URL) as a second checkpoint tier.

The local ``step-N`` stays the fast tier; every complete one is uploaded in the background to
``<url>/checkpoints/step-N/``, the same layout. Object stores have no rename, so the commit there is
an order of writes, each done only after the one before succeeded:

  1. every data file (in parallel), then their sizes listed back and compared with the manifest;
  2. ``manifest.json``; 3. ``COMPLETE`` (the manifest's checksum and file count);
  4. the ``latest`` (and ``best``) pointer objects.

A reader trusts only a ``step-N`` whose ``COMPLETE`` matches its manifest and whose files have the
sizes it lists; an upload killed at any instant leaves the remote ``latest`` on an older complete
checkpoint. Re-uploading a step first deletes its ``COMPLETE``. Deleting one (retention) deletes
its ``COMPLETE`` first, so a half-deleted checkpoint is never trusted either.

Credentials and endpoints come from s3fs/botocore's usual sources (``AWS_*`` variables, config
files, instance roles) or ``storage_options`` (e.g. ``{"endpoint_url": ...}``); nothing of them is
written into a checkpoint or a log.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checksums import CHUNK, HASH, hash_file, new_hasher
from .format import CHECKPOINTS, COMPLETE, LATEST, MANIFEST, STEP_RE, TMP_PREFIX
from .io import CheckpointError, fsync_tree
from .manifest import MANIFEST_HASH, verify
from .rewrite import link_or_copy
from .storage import CheckpointStorage, LocalStorage
from ..secrets import redact_mapping, redact_url



class RemoteError(CheckpointError):
    """The object store could not be reached or did not accept or return what it should."""


def is_url(spec) -> bool:
    return isinstance(spec, str) and "://" in spec and not spec.startswith("file://")


def redact(storage_options: dict | None) -> dict | None:
    """``storage_options`` fit for a log or a saved config: credentials replaced by ``***``
    (:func:`accel_trainer.secrets.redact_mapping`, the one place that decides what is a secret)."""
    return redact_mapping(storage_options) if storage_options else storage_options


#: Storage options kept off the command line (where launchers and ``ps`` show them): JSON or ``@FILE``.
STORAGE_OPTIONS_ENV = "ACCEL_TRAINER_STORAGE_OPTIONS"


def parse_storage_options(text: str | None, flag: str = "--storage_options") -> dict:
    """The filesystem options of the object store, as a dict: ``text`` is JSON, or ``@FILE`` naming a
    JSON file; without ``text``, the ``ACCEL_TRAINER_STORAGE_OPTIONS`` environment variable (same
    forms). Both keep credentials out of the command line, which launchers print when a run fails.

    Raises:
        CheckpointError: naming the flag (or variable) and what is wrong, never the values.
    """

    if not text:
        text, flag = os.environ.get(STORAGE_OPTIONS_ENV), STORAGE_OPTIONS_ENV
        if not text:
            return {}
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{flag}=@{path}: cannot read the file ({getattr(err, 'strerror', None) or err}); "
                                  "give a JSON file of the options") from None
        flag = f"{flag}=@{path}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{flag}: not JSON ({err.msg} at character {err.pos}); e.g. "
                              "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{flag}: must be a JSON object, got {type(value).__name__}")
    return value


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, CheckpointError):  # our own message already says what failed
        return text[:300]
    return f"{type(err).__name__}: {text}"[:300]


def _quiet_orphaned_connection_errors(loop) -> None:
    """When the store drops a connection mid-request, aiohttp leaves a task behind whose write failed,
    and asyncio prints its traceback ("Task exception was never retrieved") from the filesystem's
    event-loop thread, although the request's own error already reached us (the uploader reports it,
    once per outage). Such orphaned connection errors are dropped; anything else still goes to
    asyncio's default handler."""
    if loop is None or getattr(loop, "_accel_trainer_quiet", False):
        return

    def handler(loop, context):
        error = context.get("exception")
        orphan = str(context.get("message", "")).startswith("Task exception was never retrieved")
        if orphan and isinstance(error, (ConnectionError, TimeoutError, OSError)):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    loop._accel_trainer_quiet = True


class RemoteTier(CheckpointStorage):
    """The checkpoints of one run under an fsspec URL (the object-store tier of :class:`CheckpointStorage`).

    Args:
        url: e.g. ``s3://bucket/prefix`` (the run's remote "output dir": checkpoints go to
            ``<url>/checkpoints/``).
        storage_options: passed to the fsspec filesystem (s3fs: ``endpoint_url``, ``key``, ...).
        retries: attempts per request before giving up; waits ``backoff * 2**i`` seconds between.
        workers: files uploaded or downloaded at once.
    """

    UNREADABLE_SEQUENCE = -1  # a remote checkpoint whose manifest cannot be read is never the newest

    def __init__(self, url: str, storage_options: dict | None = None, retries: int = 4, backoff: float = 0.5,
                 workers: int = 8):
        import fsspec

        self.url = url.rstrip("/")
        self.shown = redact_url(self.url)  # what messages and listings show
        try:
            # skip_instance_cache: listings cached by another instance would hide other writers' objects.
            self.fs, base = fsspec.url_to_fs(self.url, skip_instance_cache=True, **(storage_options or {}))
        except (ImportError, ValueError) as err:
            hint = " (pip install 'accel_trainer[s3]')" if self.url.startswith("s3") else ""
            raise RemoteError(f"{self.shown}: cannot open this storage: {_reason(err)}{hint}") from None
        self.base = base.rstrip("/")
        self.root = f"{self.base}/{CHECKPOINTS}"
        self.retries, self.backoff, self.workers = retries, backoff, workers
        _quiet_orphaned_connection_errors(getattr(self.fs, "loop", None))

    def __str__(self) -> str:
        return self.shown

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, *parts: str) -> str:
        return "/".join([self.shown, CHECKPOINTS, *parts])

    def _retry(self, what: str, fn):
        """``fn()``, retried with exponential backoff; a :class:`RemoteError` naming ``what`` at the end.
        Missing objects are not retried (FileNotFoundError goes up as it is)."""
        for attempt in range(self.retries):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as err:  # network, credentials, throttling: all are worth another try
                if attempt == self.retries - 1:
                    raise RemoteError(f"{what}: {_reason(err)}") from None
                time.sleep(self.backoff * 2**attempt)

    # ----------------------------------------------------------------------------- small objects
    def check(self) -> None:
        """Raise :class:`RemoteError` unless the location can be listed (credentials, bucket, network)."""
        try:
            self._retry(f"cannot reach {self.shown}", lambda: self.fs.ls(self.base, refresh=True))
        except FileNotFoundError:  # nothing under the prefix yet: fine if its bucket exists
            top = self.base.split("/")[0]
            if top and top != self.base and not self._retry(f"cannot reach {self.shown}", lambda: self.fs.exists(top)):
                raise RemoteError(f"{self.shown}: the bucket {top!r} does not exist (or these credentials cannot "
                                  "see it); create it or fix --checkpoint_upload_to") from None

    def cat(self, *parts: str) -> bytes:
        return self._retry(f"reading {self.display(*parts)}", lambda: self.fs.cat_file(self.path(*parts)))

    def read_bytes(self, step_name: str, file: str) -> bytes:
        return self.cat(step_name, file)

    def pipe(self, data: bytes, *parts: str) -> None:
        self._retry(f"writing {self.display(*parts)}", lambda: self.fs.pipe_file(self.path(*parts), data))

    def read_pointer(self, name: str) -> str | None:
        try:
            target = self.cat(name).decode("utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return target if STEP_RE.match(target) else None

    def write_pointer(self, name: str, step_name: str) -> None:
        self.pipe(f"{step_name}\n".encode(), name)

    def listing(self) -> dict[str, dict[str, int]]:
        """step folder -> {relative file name: size}, one recursive listing of ``checkpoints/``."""
        try:
            self.fs.invalidate_cache()  # other writers (another run, a cleanup) change what is there
            found = self._retry(f"listing {self.display()}",
                                lambda: self.fs.find(self.root, detail=True, withdirs=False))
        except FileNotFoundError:
            return {}
        steps: dict[str, dict[str, int]] = {}
        for full, info in found.items():
            rel = full[len(self.root) + 1:] if full.startswith(self.root + "/") else None
            if rel and "/" in rel and STEP_RE.match(rel.split("/", 1)[0]):
                step, name = rel.split("/", 1)
                steps.setdefault(step, {})[name] = int(info.get("size") or 0)
        return steps

    # ---------------------------------------------------------------------------------- verify
    def problems(self, step_name: str, files: dict[str, int] | None = None,
                 checksums: bool = False) -> tuple[list[str], dict | None]:
        """What makes remote ``step_name`` untrustworthy (empty: valid), and its manifest."""
        files = self.listing().get(step_name, {}) if files is None else files
        where = self.display(step_name)
        if COMPLETE not in files:
            return [f"{where}: no {COMPLETE} object (the upload did not finish)"], None
        try:
            marker = json.loads(self.cat(step_name, COMPLETE))
            raw = self.cat(step_name, MANIFEST)
            manifest = json.loads(raw)
        except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
            return [f"{where}: unreadable {MANIFEST}/{COMPLETE} ({_reason(err)})"], None
        hasher = new_hasher()
        hasher.update(raw)
        if not isinstance(marker, dict) or marker.get(MANIFEST_HASH) != hasher.hexdigest() \
                or marker.get("files") != len(manifest.get("files", {})):
            return [f"{where}/{MANIFEST}: does not match its {COMPLETE} (changed or partly uploaded)"], manifest
        out = []
        for name, info in manifest["files"].items():
            if name not in files:
                out.append(f"{where}/{name}: missing")
            elif files[name] != info.get("size"):
                out.append(f"{where}/{name}: size {files[name]} bytes, manifest says {info.get('size')}")
            elif checksums and self._hash(step_name, name) != info.get(HASH):
                out.append(f"{where}/{name}: checksum mismatch (the object changed after it was uploaded)")
        return out, manifest

    def _hash(self, step_name: str, name: str) -> str:
        def run():
            hasher = new_hasher()
            with self.fs.open(self.path(step_name, name), "rb", block_size=CHUNK) as f:
                while chunk := f.read(CHUNK):
                    hasher.update(chunk)
            return hasher.hexdigest()
        return self._retry(f"reading {self.display(step_name, name)}", run)

    # ---------------------------------------------------------------------------------- upload
    def upload(self, folder: Path) -> int:
        """Upload the complete local checkpoint ``folder`` by the commit order above; returns bytes.

        Raises:
            RemoteError: a request failed after its retries, or the sizes listed back differ.
        """
        self.begin(folder.name)
        size = self.put(folder, manifest_files(folder))
        self.commit(folder)
        return size

    def begin(self, name: str) -> None:
        """Before any file of ``name`` is sent: its old ``COMPLETE`` (a re-upload) must go first."""
        try:
            self._retry(f"deleting {self.display(name, COMPLETE)}", lambda: self.fs.rm_file(self.path(name, COMPLETE)))
        except FileNotFoundError:
            pass  # the usual case: never uploaded before

    def put(self, folder: Path, files: list[str], same_as: str | None = None) -> int:
        """Upload ``files`` of ``folder`` in parallel (each retried); returns the bytes sent.

        A file that is the same file on disk (a hard link: frozen tensors stored once) as in the
        checkpoint ``same_as`` uploaded before is copied inside the store (S3's CopyObject: no bytes
        over the network); if that copy fails it is uploaded."""

        def send(f: str) -> int:
            previous = folder.parent / same_as / f if same_as else None
            try:
                linked = previous is not None and previous.stat().st_ino == (folder / f).stat().st_ino
            except OSError:
                linked = False
            if linked:
                try:
                    self._retry(f"copying {self.display(same_as, f)} to {self.display(folder.name, f)} in the store",
                                lambda: self.fs.copy(self.path(same_as, f), self.path(folder.name, f)))
                    return 0
                except (RemoteError, FileNotFoundError):
                    pass  # not there any more (remote retention): send the bytes
            self._retry(f"uploading {folder / f} to {self.display(folder.name, f)}",
                        lambda: self.fs.put_file(str(folder / f), self.path(folder.name, f)))
            return (folder / f).stat().st_size

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="upload") as pool:
            return sum(pool.map(send, files))

    def commit(self, folder: Path) -> None:
        """Every data file is up: check their sizes as the store lists them, then manifest, then COMPLETE."""
        manifest = json.loads((folder / MANIFEST).read_text())
        name, files = folder.name, list(manifest["files"])
        listed = self.listing().get(name, {})
        wrong = [f"{f}: {listed.get(f, 'missing')} bytes, expected {manifest['files'][f]['size']}"
                 for f in files if listed.get(f) != manifest["files"][f]["size"]]
        if wrong:
            raise RemoteError(f"{self.display(name)}: uploaded objects differ from the local files: "
                              f"{'; '.join(wrong[:3])}")
        for last in (MANIFEST, COMPLETE):
            self._retry(f"uploading {self.display(name, last)}",
                        lambda: self.fs.put_file(str(folder / last), self.path(name, last)))

    def delete(self, name: str) -> None:
        """Remove a remote checkpoint: its ``COMPLETE`` first, so no reader trusts what is left."""
        try:
            self._retry(f"deleting {self.display(name, COMPLETE)}", lambda: self.fs.rm_file(self.path(name, COMPLETE)))
        except FileNotFoundError:
            pass
        try:
            self._retry(f"deleting {self.display(name)}", lambda: self.fs.rm(self.path(name), recursive=True))
        except FileNotFoundError:
            pass

    # -------------------------------------------------------------------------------- download
    def download(self, name: str, dest_root: Path, progress: bool = True, report=None) -> Path:
        """Copy remote ``name`` into ``dest_root/name`` (via a temporary folder, then verified with
        every checksum and renamed); returns the local folder.

        A local ``dest_root/name`` that is damaged (the reason to download) keeps what is intact: each
        of its files whose size and checksum are the remote manifest's is linked into the new copy, and
        only the others are downloaded. ``report`` (a print function) is told which.

        Raises:
            RemoteError: the remote checkpoint is not valid, a transfer failed, or the copy does not verify.
        """
        from tqdm.auto import tqdm

        problems, manifest = self.problems(name)
        if problems:
            raise RemoteError("; ".join(problems))
        final = dest_root / name
        tmp = dest_root / f"{TMP_PREFIX}download-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        kept = _keep_intact_files(final, manifest, tmp)
        names = [f for f in manifest["files"] if f not in kept] + [MANIFEST, COMPLETE]
        total = sum(info["size"] for f, info in manifest["files"].items() if f not in kept)
        if kept and report is not None:
            fetched = [f for f in manifest["files"] if f not in kept]
            report(f"checkpoint: {name}: {len(kept)} of {len(manifest['files'])} files intact locally; downloading "
                   f"{len(fetched)} ({', '.join(fetched[:4])}{', ...' if len(fetched) > 4 else ''}; {total:,} bytes)")
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not progress) as bar:
            def get(f):
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                self._retry(f"downloading {self.display(name, f)}",
                            lambda: self.fs.get_file(self.path(name, f), str(tmp / f)))
                bar.update(manifest["files"].get(f, {}).get("size", 0))
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="download") as pool:
                list(pool.map(get, names))
        fsync_tree(tmp)
        problems = verify(tmp)
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RemoteError(f"{self.display(name)}: the downloaded copy does not verify: {problems[0]}")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final


def _keep_intact_files(local: Path, manifest: dict, into: Path) -> set[str]:
    """Link each file of the local copy ``local`` whose size and checksum are ``manifest``'s into
    ``into``; the names linked (none when there is no local copy)."""
    kept: set[str] = set()
    if not local.is_dir():
        return kept
    for f, info in manifest["files"].items():
        path = local / f
        try:
            if path.stat().st_size != info.get("size") or hash_file(path) != info.get(HASH):
                continue
            link_or_copy(path, into / f)
        except OSError:
            continue
        kept.add(f)
    return kept


def manifest_files(folder: Path) -> list[str]:
    """The data files a committed local checkpoint lists in its manifest."""
    return list(json.loads((folder / MANIFEST).read_text())["files"])


def remote_tier(url: str, storage_options: dict | None = None) -> RemoteTier:
    """The one factory of the object-store tier (``--checkpoint_upload_to``, ``s3://`` paths).

    Raises:
        CheckpointError: an unknown scheme, or the fsspec backend for it is not installed.
    """
    return RemoteTier(str(url), storage_options)


def storage_for(location: str | Path, storage_options: dict | None = None) -> CheckpointStorage:
    """The tier of a run's output dir or checkpoints folder: a local folder, or an fsspec URL."""
    if is_url(location):
        return remote_tier(str(location), storage_options)
    path = Path(location)
    return LocalStorage(path if path.name == "checkpoints" else path / "checkpoints")


class Uploader:
    """Uploads committed local checkpoints in a background thread, in order.

    One process: it uploads every file (several at once); when saves come faster than uploads the
    newest wins (a queued step that is neither ``best`` nor the last is dropped). Several processes
    with a ``channel`` (a sharded run): every rank has one, and each uploads the shards it wrote,
    all at once (the bandwidth of every node, not one); rank 0 the other files, and it commits only
    once every rank reported its shards uploaded.

    Args:
        tier: where to.
        keep_last, keep_every_n_steps: remote retention (as locally).
        report: called with one line per upload or failure (rank 0).
        channel: gather/broadcast between the ranks' upload threads (:class:`sharded.Channel`).
        files_of: ``(folder, rank) -> files`` this rank uploads of a committed checkpoint (the write
            strategy's answer); default: rank 0 uploads every file of the manifest.
    """

    def __init__(self, tier: RemoteTier, keep_last: int | None, keep_every_n_steps: int | None, report=print,
                 channel=None, files_of=None):
        self.tier, self.keep_last, self.keep_every_n_steps, self.report = tier, keep_last, keep_every_n_steps, report
        self.channel = channel
        self.files_of = files_of or (lambda folder, rank: manifest_files(folder) if rank == 0 else [])
        self.rank = channel.rank if channel is not None else 0
        self._queue: deque[tuple[Path, list[str]]] = deque()
        self._in_flight: str | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.failures: list[str] = []
        self.last_submitted: str | None = None   # the newest local checkpoint handed over
        self.last_uploaded: str | None = None    # the newest one the remote tier holds whole
        self._outage: list[str] = []             # failed uploads since the last that worked
        self._superseded: list[str] = []         # steps dropped since the last report
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, folder: Path, pointers: list[str]) -> None:
        """Queue a committed checkpoint (every rank of a sharded run submits the same ones, in order)."""
        dropped = []
        with self._cond:
            if self.channel is None:  # ranks would have to agree on what to drop: only alone
                dropped = [item[0].name for item in self._queue if "best" not in item[1]]
                self._queue = deque(item for item in self._queue if "best" in item[1])
            self._queue.append((folder, list(pointers)))
            self.last_submitted = folder.name
            self._cond.notify_all()
            self._superseded += dropped  # said once per stretch (see _summary), not once per save

    @property
    def behind(self) -> str | None:
        """Why the remote tier does not hold the newest checkpoint handed over (None when it does)."""
        if self.last_submitted is None or self.last_submitted == self.last_uploaded:
            return None
        held = self.last_uploaded or "nothing"
        return (f"the object store's newest complete checkpoint is {held}, the local one {self.last_submitted} "
                f"({len(self.failures)} upload(s) failed{': ' + self._outage[-1] if self._outage else ''})")

    def _summary(self) -> None:
        """One line for a stretch of failed or skipped uploads, when it ends (or at close)."""
        if len(self._outage) > 1:  # the first was said when it happened
            self.report(f"WARNING: checkpoint upload failed {len(self._outage)} times in a row (the last: "
                        f"{self._outage[-1]}); the local checkpoints are kept")
        if self._superseded:
            self.report(f"checkpoint upload: {len(self._superseded)} checkpoint(s) not uploaded "
                        f"({', '.join(self._superseded[:3])}"
                        f"{', ...' if len(self._superseded) > 3 else ''}): newer ones came before their turn (uploads "
                        f"are "
                        "slower than saves)")
        self._outage, self._superseded = [], []

    def pending(self) -> set[str]:
        """Step folders queued or uploading: local retention keeps them."""
        with self._cond:
            return {folder.name for folder, _ in self._queue} | ({self._in_flight} if self._in_flight else set())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                folder, pointers = self._queue.popleft()
                self._in_flight = folder.name
            try:
                self._upload(folder, pointers)
            except Exception as err:  # a broken channel: say so, keep the thread (wait() must return)
                self.failures.append(f"checkpoint upload of {folder.name} failed ({_reason(err)})")
                self._outage.append(_reason(err))
                if len(self._outage) == 1:
                    self.report(f"WARNING: {self.failures[-1]}")
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _upload(self, folder: Path, pointers: list[str]) -> None:
        start = time.perf_counter()
        problem, size = None, 0
        try:
            if self.rank == 0:
                self.tier.begin(folder.name)
        except Exception as err:
            problem = _reason(err)
        if self.channel is not None:  # nobody sends a file before the old COMPLETE is gone
            problem = self.channel.broadcast(problem)
        if problem is None:
            try:
                size = self.tier.put(folder, self.files_of(folder, self.rank), same_as=self.last_uploaded)
            except Exception as err:
                problem = _reason(err)
        reports = self.channel.gather((problem, size)) if self.channel is not None else [(problem, size)]
        if self.rank != 0:
            return
        failed = [f"rank {r}: {p}" if len(reports) > 1 else p for r, (p, _) in enumerate(reports) if p]
        try:
            if failed:
                raise RemoteError("; ".join(failed))
            self.tier.commit(folder)
            for pointer in pointers:
                self.tier.write_pointer(pointer, folder.name)
            self.tier.apply_retention(self.keep_last, self.keep_every_n_steps, keep=self.pending())
        except Exception as err:  # never stops training: the local checkpoint stays
            message = (f"checkpoint upload of {folder.name} to {self.tier} failed ({_reason(err)}); the local "
                       f"checkpoint is kept and training continues; the next save uploads again")
            self.failures.append(message)
            self._outage.append(_reason(err))
            if len(self._outage) == 1:  # the first of an outage; the rest are counted, said when it ends
                self.report(f"WARNING: {message}")
            return
        if self._outage or self._superseded:
            self._summary()
        self.last_uploaded = folder.name
        total, seconds = sum(n for _, n in reports), time.perf_counter() - start
        shares = f"; {len(reports)} ranks in parallel" if len(reports) > 1 else ""
        self.report(f"checkpoint: uploaded {folder.name} to {self.tier.display(folder.name)} "
                    f"({total / 2**20:.1f} MiB in {seconds:.1f} s{shares})")

    def wait(self) -> None:
        """Block until every queued upload is done (or failed)."""
        with self._cond:
            while self._queue or self._in_flight:
                self._cond.wait()

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self.rank == 0:
            self._summary()


def resolve_with_remote(spec: str, output_dir: str | Path, tier: RemoteTier, checksums: bool | set[str] = True,
                        report=print, progress: bool = True):
    """:func:`layout.resolve` over both tiers: ``latest`` is the newest valid checkpoint of either
    (by save sequence, then step; the local copy wins a tie); ``best``/``step-N`` missing locally
    come from the remote. A remote one is downloaded into the local ``checkpoints/`` first.

    Raises:
        CheckpointError: as :func:`layout.resolve`, or a download that failed.
    """
    from .layout import Resolved, checkpoints_dir, resolve
    from .storage import step_number

    root = checkpoints_dir(output_dir)
    if spec not in ("latest", "best") and not STEP_RE.match(spec):
        return resolve(spec, output_dir, checksums)  # a path: the local tier only
    local, local_error = None, None
    try:
        local = resolve(spec, output_dir, checksums)
    except CheckpointError as err:
        local_error = err
    if spec == "latest":
        local_key = ((LocalStorage(root).sequence(local.path.name), step_number(local.path.name))
                     if local and local.path else None)
        listing = tier.listing()
        for sequence, step, name in tier.complete_steps():
            if local_key is not None and local_key >= (sequence, step):
                break  # the local tier has this one (or a newer one)
            problems, _ = tier.problems(name, listing.get(name))
            try:
                if problems:
                    raise RemoteError(problems[0])
                why = ("its local copy does not verify" if (root / name).is_dir()
                       else "is newer than any local checkpoint")
                report(f"checkpoint: {tier.display(name)} {why}: downloading it")
                return Resolved(tier.download(name, root, progress=progress, report=report))
            except RemoteError as err:  # damaged or unreachable: the next older one, as locally
                report(f"WARNING: 'latest' skips the remote {name}: {err}")
        if local_error is not None:
            raise local_error
        return local
    if local_error is None:
        return local
    name = tier.read_pointer("best") if spec == "best" else spec
    if name is None or tier.problems(name)[0]:
        raise local_error
    report(f"checkpoint: {tier.display(name)} is not in the local checkpoints: downloading it")
    return Resolved(tier.download(name, root, progress=progress, report=report))


def cache_dir(url: str) -> Path:
    """Where remote checkpoints read by ``load_model_for_inference``/``accel-trainer inspect`` are kept
    (``$ACCEL_TRAINER_CACHE`` or ``~/.cache/accel_trainer``), one folder per URL."""
    import hashlib

    base = Path(os.environ.get("ACCEL_TRAINER_CACHE", Path.home() / ".cache" / "accel_trainer"))
    return base / "remote" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def fetch(spec: str, storage_options: dict | None = None, progress: bool = True) -> Path:
    """A local copy of a remote checkpoint: ``<url>`` (its newest valid one), ``<url>/best``,
    ``<url>/latest`` or ``<url>/checkpoints/step-N``; downloaded once into :func:`cache_dir`.

    Raises:
        RemoteError/CheckpointError: unreachable, nothing valid there, or a copy that does not verify.
    """
    from .manifest import verify as verify_local

    url, name = spec.rstrip("/"), None
    last = url.rsplit("/", 1)[-1]
    if STEP_RE.match(last) or last in (LATEST, "best"):
        url, name = url.rsplit("/", 1)
        if url.endswith(f"/{CHECKPOINTS}"):
            url = url[: -len(CHECKPOINTS) - 1]
    tier = remote_tier(url, storage_options)
    if name in (None, LATEST):
        name, _, skipped = tier.latest_valid()
        if name is None:
            detail = f": {'; '.join(skipped)}" if skipped else ""
            raise RemoteError(f"{tier.display()}: no complete checkpoint there{detail}")
    elif name == "best":
        name = tier.read_pointer("best")
        if name is None:
            raise RemoteError(f"{tier.display('best')}: no 'best' pointer there")
    local = cache_dir(url) / CHECKPOINTS / name
    if local.is_dir() and not verify_local(local):
        remote_manifest = json.loads(tier.cat(name, MANIFEST))
        if remote_manifest == json.loads((local / MANIFEST).read_text()):
            return local  # this very checkpoint, already here and intact
    return tier.download(name, local.parent, progress=progress)

"""Weights-only loading by name, strict or not, with a report of every difference.

Names are normalised first: ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
prefixes are dropped wherever they appear, so weights saved by any wrapper load into a bare model.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .format import COMPRESSED_SUFFIX, FSDP_MODEL_DIR, MANIFEST, SHARDED_DIR, weight_files
from .manifest import saved_digests
from .stored_tensors import open_tensor_file, read_tensor_file, read_verified, tensor_header
from ..errors import DamagedFile
from .checksums import hash_file
from .io import CheckpointError, check_dcp_metadata_is_data, like_parameter, safe_torch_load

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_orig_mod)\.")
# Keys that old single-file checkpoints use for the model's weights, most specific first.
LEGACY_MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module")


def normalize_key(key: str) -> str:
    """``module._orig_mod.layers.0.w`` -> ``layers.0.w``."""
    while True:
        new = WRAPPER_PREFIXES.sub(r"\1", key)
        if new == key:
            return key
        key = new


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = normalize_key(key)
        if new in out:
            raise CheckpointError(f"two weights map to {new!r} after removing wrapper prefixes (one is {key!r})")
        out[new] = value
    return out


def _group(key: str) -> str:
    """Module a key belongs to, at layer granularity: ``model.layers.3.mlp.up_proj`` -> ``model.layers.3``."""
    match = re.match(r"^(.*?\.\d+)\.", key)
    return match.group(1) if match else key.rsplit(".", 1)[0] if "." in key else key


@dataclass
class LoadReport:
    """What a weights load did. ``mismatched`` holds ``(key, checkpoint_shape, model_shape)``."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    resized: list[tuple[str, int, int]] = field(default_factory=list)  # (what, rows loaded, rows now)
    transposed: list[str] = field(default_factory=list)  # [out, in] matrices read into [in, out] (Conv1D)

    @property
    def left_as_initialised(self) -> list[str]:
        """The model's tensors the load did not fill (missing or of another shape)."""
        return self.missing + [k for k, *_ in self.mismatched]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.resized)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors by name"]
        for title, keys, note in (("missing in checkpoint", self.missing, "left as initialised"),
                                  ("unexpected in checkpoint", self.unexpected, "ignored")):
            if keys:
                lines.append(f"{len(keys)} {title} ({note}):")
                grouped = defaultdict(list)
                for k in keys:
                    grouped[_group(k)].append(k[len(_group(k)) + 1:] or k)
                lines += [f"  {g}: {', '.join(v)}" for g, v in grouped.items()]
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} shape-mismatched (skipped, left as initialised):")
            lines += [f"  {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
        if self.transposed:
            lines.append(f"{len(self.transposed)} matrices converted from nn.Linear's [out, in] layout (nanoGPT) "
                         f"to the model's Conv1D [in, out]: {', '.join(self.transposed[:4])}"
                         + (", ..." if len(self.transposed) > 4 else ""))
        for what, loaded, now in self.resized:
            lines.append(f"{what}: rows 0..{loaded - 1} loaded, rows {loaded}..{now - 1} newly initialised")
        return "\n".join(lines)


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (names normalised) and any extra fields from a checkpoint folder, safetensors file,
    Hugging Face model folder, or old single-file PyTorch checkpoint.

    Returns:
        ``(state_dict, extras)`` where ``extras`` is the rest of a legacy dict (step, epoch, config, ...).
    """
    path = Path(path)
    if path.is_dir():
        # A checkpoint holds our model as one file (Accelerate names other models model_<i>); a
        # Hugging Face folder may hold shards, model-0000i-of-0000n.safetensors.
        ours = weight_files(path) if (path / MANIFEST).is_file() else []
        files = ours or sorted(path.glob("model*.safetensors"))
        sharded = _dcp_dir(path)
        if not files and sharded is not None:
            return normalize_state_dict(consolidate_sharded(sharded)), {}
        if not files:
            raise CheckpointError(f"{path}: nothing to load here: no checkpoints/step-N with a COMPLETE marker, "
                                  f"no model*.safetensors, no FSDP {FSDP_MODEL_DIR}/ shards")
        state, digests = {}, saved_digests(path) if ours else {}
        for f in files:  # ours: hashed as read (one pass), compared with the manifest
            state.update(read_verified(f, digests[f.name], str(device)) if f.name in digests
                         else read_tensor_file(f, device=str(device)))
        return normalize_state_dict(state), {}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix in (".safetensors", COMPRESSED_SUFFIX):
        return normalize_state_dict(read_tensor_file(path, device=str(device))), {}
    obj = safe_torch_load(path, map_location=device)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors or a training checkpoint dict, got "
                              f"{type(obj).__name__}")
    for key in LEGACY_MODEL_KEYS:
        if isinstance(obj.get(key), dict):
            extras = {k: v for k, v in obj.items() if k != key}
            return normalize_state_dict(obj[key]), extras
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return normalize_state_dict(obj), {}
    raise CheckpointError(f"{path}: found no weights (looked for a tensor dict or keys {list(LEGACY_MODEL_KEYS)}; "
                          f"the file has {sorted(obj)[:10]})")


def _dcp_dir(folder: Path) -> Path | None:
    """The torch.distributed.checkpoint folder of a checkpoint, if it has one."""
    for candidate in (folder / SHARDED_DIR, folder / FSDP_MODEL_DIR, folder):
        if (candidate / ".metadata").is_file():
            return candidate
    return None


def _model_tensors(dcp_dir: Path) -> dict[str, tuple[str, object]]:
    """DCP key -> (tensor name, its storage metadata) of the model tensors of a torch.distributed.checkpoint
    folder, from its metadata alone (checked to be data first). Our sharded checkpoints (and
    Accelerate's) save ``{"model": ..., "optimizer": ...}`` together: the model's keys then carry one
    extra ``model.``, which the name drops."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_dcp_metadata_is_data(dcp_dir / ".metadata")
    metadata = {k: m for k, m in dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata)}
    wrapped = all(k.startswith(("model.", "optimizer.")) for k in metadata)
    return {k: (k[len("model."):] if wrapped else k, m) for k, m in metadata.items()
            if not wrapped or k.startswith("model.")}


def _load_from_shards(dcp_dir: Path, entries: dict[str, tuple[str, object]]) -> dict[str, torch.Tensor]:
    """DCP key -> the full tensor of ``entries`` (from :func:`_model_tensors`), stitched from every
    rank's shards in this process, without a process group."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, (_, m) in entries.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
    return state


def sharded_model_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Names and full shapes of the model tensors of a sharded (FSDP) checkpoint, from its
    torch.distributed.checkpoint metadata alone (no shard is read); None when it has none."""
    dcp_dir = _dcp_dir(folder)
    if dcp_dir is None:
        return None
    return {normalize_key(name): list(m.size) for name, m in _model_tensors(dcp_dir).values()}


def consolidate_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """Full tensors from a sharded checkpoint written by N ranks (FSDP SHARDED_STATE_DICT), read in
    one process without a process group; shards are stitched by torch.distributed.checkpoint.

    Accelerate saves ``{"model": state_dict}``, so keys carry one extra ``model.`` that is removed.
    """
    entries = _model_tensors(folder)
    if not entries:
        raise CheckpointError(f"{folder}: the sharded checkpoint holds no model tensors")
    return {entries[k][0]: v for k, v in _load_from_shards(folder, entries).items()}


def write_consolidated(dcp_dir: Path, path: Path, group_bytes: int = 1 << 30) -> str:
    """The model tensors of a sharded checkpoint as one safetensors file at ``path`` (fsynced), read
    from the shards a group of about ``group_bytes`` at a time: peak memory is one group (or its
    largest tensor), never the whole model. Returns the file's xxh3-128.

    Raises:
        CheckpointError: unsafe metadata, or no model tensors.
    """
    import os

    from .checksums import new_hasher
    from .tensor_files import _as_bytes, safetensors_prefix

    entries = _model_tensors(dcp_dir)
    if not entries:
        raise CheckpointError(f"{dcp_dir}: the sharded checkpoint holds no model tensors")
    prefix = safetensors_prefix({normalize_key(name): (m.properties.dtype, list(m.size))
                                 for name, m in entries.values()})
    groups, size = [{}], 0
    for k, (name, m) in entries.items():
        nbytes = math.prod(m.size) * m.properties.dtype.itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = (name, m)
        size += nbytes
    hasher = new_hasher()
    with open(path, "wb", buffering=0) as f:
        f.write(prefix)
        hasher.update(prefix)
        for group in groups:  # in the header's order: the safetensors offsets follow it
            for tensor in _load_from_shards(dcp_dir, group).values():
                view = _as_bytes(tensor)
                f.write(view)
                hasher.update(view)
        os.fsync(f.fileno())
    return hasher.hexdigest()


def adapt_linear_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights saved in ``nn.Linear``'s [out, in] layout (nanoGPT's GPT-2) for a model whose matrices
    are transformers' ``Conv1D`` [in, out]: transposed, all of them, when the file's non-square ones
    show that layout. A square matrix cannot show its layout, so the file decides for all of them,
    never the shape of one: a file whose layout its shapes do not reveal is left as it is.

    Returns:
        ``(state, names transposed)``.

    Raises:
        CheckpointError: some matrices in one layout and some in the other.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return state, []
    conv = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}
    if not conv:
        return state, []
    own = model.state_dict()
    telling = [k for k in conv if k in state and state[k].ndim == 2 and state[k].shape[0] != state[k].shape[1]
               and k in own]
    linear = [k for k in telling if tuple(state[k].shape) == tuple(own[k].shape[::-1])]
    native = [k for k in telling if tuple(state[k].shape) == tuple(own[k].shape)]
    if not linear:
        return state, []
    if native:
        raise CheckpointError(f"the file holds Conv1D matrices in both layouts ({native[0]} as the model's, "
                              f"{linear[0]} transposed); it is not one model's state dict")
    names = sorted(k for k in conv if k in state and state[k].ndim == 2)
    return {k: (v.t().contiguous() if k in names else v) for k, v in state.items()}, names


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = False) -> LoadReport:
    """Copy matching tensors into ``model`` by name; never crashes on a mismatch unless ``strict``.

    Raises:
        CheckpointError: with ``strict=True``, listing every missing, unexpected and mis-shaped key.
    """
    state, transposed = adapt_linear_layout(model, state)
    own = model.state_dict()
    report = LoadReport(transposed=transposed)
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in state]
    if strict and not report.exact:
        raise CheckpointError("strict weight loading failed, nothing was loaded; differences:\n" + str(report))
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    return report


def load_weights(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Load weights by name from ``path`` into ``model`` and log a report of the differences.

    Args:
        model: the model to fill (wrapped or not; parameters are matched after prefix normalisation).
        path: checkpoint folder, ``output_dir`` (its latest), ``.safetensors`` file, HF folder, or legacy ``.pt``.
        strict: raise instead of skipping when anything differs.

    Returns:
        The :class:`LoadReport`.
    """
    from .layout import resolve_path

    target = resolve_path(path, flag=f"load_weights({str(path)!r})").path
    state, _ = read_weights(target)
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    report = load_state_into(inner, state, strict=strict)
    logger.info("weights from %s: %s", target, report)
    return report


def load_weights_in_place(paths: Path | list[Path], model: torch.nn.Module, digests: dict[str, str] | None = None,
                          skip: set[str] = frozenset()) -> None:
    """Copy tensor by tensor from the checkpoint's weight files into the parameters: peak memory is
    the model plus one tensor, not a second copy of the weights.

    Args:
        digests: file name -> saved checksum: those files are read once, front to back, and hashed
            as they are read (the others memory-mapped, unverified).
        skip: the model's tensors the files do not hold on purpose (left as they are).

    Raises:
        CheckpointError: the files' tensors are not exactly the model's (names or shapes).
        DamagedFile: a file's bytes are not those saved, found after its tensors were copied: the
            model's weights are then a mix and must be loaded again (a resume falls back and does).
    """
    from contextlib import ExitStack

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    digests = digests or {}
    where = paths[0] if len(paths) == 1 else paths[0].parent
    own = {normalize_key(k): v for k, v in model.state_dict().items() if normalize_key(k) not in skip}
    shapes = {}
    for path in paths:
        try:
            shapes[path] = {name: tuple(info["shape"]) for name, info in tensor_header(path).items()}
        except CheckpointError as err:  # a header that no longer parses: not the file that was saved
            raise (DamagedFile(str(err)) if path.name in digests else err) from None
    source = {name: path for path, header in shapes.items() for name in header}
    try:
        if set(source) != set(own):
            missing, unexpected = sorted(set(own) - set(source)), sorted(set(source) - set(own))
            raise CheckpointError(f"{where}: weights differ from the model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}); use --init_from for non-strict loading")
        for name, target in own.items():
            shape = shapes[source[name]][name]
            if shape != tuple(target.shape):
                raise CheckpointError(f"{where}: {name} has shape {list(shape)} but the model's is "
                                      f"{list(target.shape)}; use --init_from for non-strict loading")
    except CheckpointError:
        for path in paths:  # a header damaged into other names or shapes is damage, not another model
            if path.name in digests and hash_file(path) != digests[path.name]:
                raise DamagedFile(f"{path}: checksum mismatch (the file changed after it was saved)") from None
        raise

    def into(name, shape, dtype):  # a plain CPU parameter is read into directly: no copy, no new memory
        target = own.get(name)
        if (target is None or type(target).__name__ == "DTensor" or target.device.type != "cpu"
                or target.dtype != dtype or list(target.shape) != list(shape) or not target.is_contiguous()):
            return None
        return target.detach()

    def values(stack):
        for path in paths:
            if path.name in digests:  # read once, front to back, hashed meanwhile
                yield from read_verified(path, digests[path.name], into=into)
                continue
            reader = stack.enter_context(open_tensor_file(path))
            names = [n for n in own if source[n] == path]
            if hasattr(reader, "iter_tensors"):  # compressed: a few tensors ahead, in parallel threads
                yield from reader.iter_tensors(names)
            else:
                yield from ((n, reader.get_tensor(n)) for n in names)

    with ExitStack() as stack, torch.no_grad():
        for name, loaded in values(stack):
            target = own[name]
            if loaded.data_ptr() == target.data_ptr() and target.numel():
                continue  # read in place
            value = like_parameter(target, loaded)
            if type(value).__name__ == "DTensor":  # this rank's slice of an expert-parallel stack
                target.to_local().copy_(value.to_local())
            else:
                target.copy_(value)

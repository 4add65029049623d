"""Check checkpoint files before anything loads them, so that loading never runs their code.

A pickle (what ``torch.save`` writes, and what ``accelerate``, DeepSpeed and
``torch.distributed.checkpoint`` use for parts of their checkpoints) can name any importable
function and make the unpickler call it: ``torch.load(..., weights_only=False)`` or
``pickle.load`` on a file from someone else runs whatever that file asks for.  Engines that must
load their own files that way (DeepSpeed's ``*_states.pt``, the ``.metadata`` of a sharded FSDP2
checkpoint) are handed only files that :func:`check_file` accepted first:

* ``*.json`` must parse as JSON;
* ``*.safetensors`` must have a readable safetensors header (nothing in it is executable);
* a ``torch.save`` file (a zip archive holding ``data.pkl``) must load with
  ``torch.load(weights_only=True)`` (memory-mapped: the tensors are not read), with the few
  extra globals named in ``torch_globals`` allowed, e.g. :data:`DEEPSPEED_GLOBALS`;
* any other pickle is unpickled with an unpickler that resolves only the globals named in
  ``pickle_globals`` (e.g. :data:`DCP_METADATA_GLOBALS`) and refuses every other one.

Files of other kinds (text, scripts such as DeepSpeed's ``zero_to_fp32.py``) are not read by a
resume and are left alone.  Every refusal is an :class:`UnsafeFileError` naming the file and
the reason.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Collection, Iterable
from pathlib import Path

import torch

__all__ = ["DCP_METADATA_GLOBALS", "DEEPSPEED_GLOBALS", "NUMPY_GLOBALS", "UnsafeFileError",
           "check_dcp_directory", "check_directory", "check_file", "file_kind"]

#: what DeepSpeed's ZeRO optimizer-state files hold besides tensors and plain containers
#: (checked on ZeRO 0-3 checkpoints of deepspeed 0.19)
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

#: numpy's array reconstruction, as in the RNG files of transformers' Trainer
#: (``rng_state*.pth``, loaded by transformers with these allowed)
NUMPY_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)

#: what the ``.metadata`` pickle of a ``torch.distributed.checkpoint`` directory (FSDP2's
#: sharded checkpoints) holds: the metadata dataclasses, sizes, dtypes, layouts and a path
DCP_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})

_PICKLE_PROTOCOL_MARK = 0x80  # first byte of a pickle of protocol 2 or later
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeFileError(ValueError):
    """A file that cannot be loaded safely: missing, unreadable, truncated, or naming code.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    reason : str
        Why it is refused.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def file_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds, judged by its content (and, for JSON and safetensors, its name).

    Returns
    -------
    str
        ``"json"``, ``"safetensors"``, ``"torch"`` (a ``torch.save`` zip archive), ``"pickle"``
        (any other pickle, including torch's legacy format), ``"dcp-data"`` (the data files of a
        ``torch.distributed.checkpoint`` directory: see :func:`check_dcp_directory`) or
        ``"other"``.

    Raises
    ------
    UnsafeFileError
        The file cannot be read.
    """
    path = Path(path)
    if path.suffix == ".json":
        return "json"
    if path.suffix == ".distcp":
        return "dcp-data"
    if path.suffix == ".safetensors":
        return "safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UnsafeFileError(path, f"cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK"):
        return "torch"
    if path.suffix in _PICKLE_SUFFIXES or path.name == ".metadata":
        return "pickle"  # named as one: checked as one, whatever it holds
    if head[:1] == bytes([_PICKLE_PROTOCOL_MARK]):
        return "pickle"
    return "other"


def _resolve(names: Iterable[str]) -> list:
    objects = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # not installed: a file needing it cannot be loaded here anyway
    return objects


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an allow-list of globals (every call a pickle can make
    goes through a global it names)."""

    def __init__(self, file: io.BufferedIOBase, allowed: Collection[tuple[str, str]]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names the global {module}.{name}, which is not "
                                     "allowed")


#: what the restricted unpicklers (ours, torch's weights_only one) say when they refuse
_REFUSALS = ("which is not allowed", "Weights only load failed")
#: torch's boilerplate around the reason of a weights_only refusal
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue",
                "You can use the following", "(1)", "(2)", "In PyTorch")


def _reason(e: BaseException) -> str:
    """The informative line of a loader's error (torch wraps it in paragraphs of advice)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    named = [x for x in lines if "GLOBAL" in x or "Unsupported" in x or "not allowed" in x]
    useful = [x for x in lines if not x.startswith(_BOILERPLATE)]
    return ((named or useful or lines or [type(e).__name__])[0])[:300]


def check_file(path: str | os.PathLike, *, torch_globals: Iterable[str] = (),
               pickle_globals: Collection[tuple[str, str]] = frozenset()) -> str:
    """Verify that ``path`` loads without running code from it, before an engine loads it.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    torch_globals : iterable of str
        Fully qualified names of the classes a ``torch.save`` file may hold besides what
        ``torch.load(weights_only=True)`` allows (e.g. :data:`DEEPSPEED_GLOBALS`).
    pickle_globals : collection of (module, name)
        The globals a plain pickle may name (e.g. :data:`DCP_METADATA_GLOBALS`); torch dtypes
        are always allowed.

    Returns
    -------
    str
        The file's kind (:func:`file_kind`).

    Raises
    ------
    UnsafeFileError
        The file is missing or unreadable, is truncated or corrupt, or names a global outside
        the allow-list (planted code); the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(path, "is missing")
    kind = file_kind(path)
    try:
        if kind == "json":
            json.loads(path.read_text(encoding="utf-8"))
        elif kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif kind == "torch":
            if not zipfile.is_zipfile(path):
                raise ValueError("a truncated or corrupt zip archive")
            with torch.serialization.safe_globals(_resolve(torch_globals)):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        elif kind == "pickle":
            with open(path, "rb") as f:
                _RestrictedUnpickler(f, pickle_globals).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # truncated / corrupt: every loader raises its own kind
        message = _reason(e)
        if any(x in str(e) for x in _REFUSALS):
            raise UnsafeFileError(path, f"refused as unsafe: {message} (loading it could run "
                                  "code from the file)") from None
        raise UnsafeFileError(path, f"unreadable ({kind} file): {message}") from None
    return kind


def check_dcp_directory(directory: str | os.PathLike) -> None:
    """Verify a ``torch.distributed.checkpoint`` directory (FSDP2's sharded checkpoints).

    torch reads its ``.metadata`` with ``pickle.load`` and its non-tensor items with
    ``torch.load(weights_only=False)``; the metadata is checked against
    :data:`DCP_METADATA_GLOBALS`, and every non-tensor item (its bytes in a ``.distcp`` file)
    with ``torch.load(weights_only=True)``.  Tensor items torch itself loads with
    ``weights_only=True``.

    Raises
    ------
    UnsafeFileError
        The metadata or an item is missing, unreadable or names code; the message names the
        file (and the item).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    meta_path = directory / ".metadata"
    check_file(meta_path, pickle_globals=DCP_METADATA_GLOBALS)
    with open(meta_path, "rb") as f:
        metadata = _RestrictedUnpickler(f, DCP_METADATA_GLOBALS).load()
    kinds = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(kinds, dict) or not isinstance(storage, dict):
        raise UnsafeFileError(meta_path, "unreadable: not a torch.distributed.checkpoint "
                              "Metadata object")
    for index, info in storage.items():
        if not isinstance(kinds.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            continue  # a tensor: torch loads it with weights_only=True
        path = directory / str(info.relative_path)
        if Path(info.relative_path).is_absolute() or ".." in Path(info.relative_path).parts:
            raise UnsafeFileError(meta_path, f"item {index.fqn!r} points outside the directory "
                                  f"({info.relative_path})")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeFileError(path, f"item {index.fqn!r} is stored with transforms "
                                  f"{info.transform_descriptors}, which cannot be checked")
        try:
            with open(path, "rb") as f:
                f.seek(int(info.offset))
                raw = f.read(int(info.length))
        except OSError as e:
            raise UnsafeFileError(path, f"cannot be read ({e.strerror or e})") from None
        if len(raw) != int(info.length):
            raise UnsafeFileError(path, f"item {index.fqn!r} is truncated")
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            what = ("refused as unsafe" if any(x in str(e) for x in _REFUSALS)
                    else "unreadable")
            raise UnsafeFileError(path, f"item {index.fqn!r} {what}: {_reason(e)}") from None


def check_directory(directory: str | os.PathLike, *, torch_globals: Iterable[str] = (),
                    skip: Collection[str] = ()) -> dict[str, str]:
    """:func:`check_file` on every file under ``directory`` (and :func:`check_dcp_directory`
    on every sub-directory holding a ``.metadata``).

    Parameters
    ----------
    directory : str or os.PathLike
        A checkpoint directory.
    torch_globals : iterable of str
        Extra classes ``torch.save`` files may hold (:func:`check_file`).
    skip : collection of str
        Paths relative to ``directory`` (POSIX form) not to check: files nothing loads.

    Returns
    -------
    dict
        Each file checked (relative path) and its kind.

    Raises
    ------
    UnsafeFileError
        The first file that cannot be loaded safely.
    """
    directory = Path(directory)
    kinds = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name in skip:
            continue
        if path.name == ".metadata":
            check_dcp_directory(path.parent)
            kinds[name] = "pickle"
        else:
            kinds[name] = check_file(path, torch_globals=torch_globals)
    return kinds

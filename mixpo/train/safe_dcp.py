"""torch.distributed.checkpoint (DCP) reads that cannot run code from a crafted checkpoint.

DCP's own FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its
DefaultLoadPlanner loads every non-tensor entry (optimizer hyper-parameters) with
`torch.load(weights_only=False)`: a planted file would run arbitrary code on resume or
export. `SafeReader` unpickles the metadata through an allow-list of DCP's own metadata
classes, and `SafePlanner` loads the non-tensor entries with the weights-only unpickler
(tensor shards are already read weights-only by DCP). Both raise
`mixpo.files.UnsafeFileError` naming the file.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mixpo.files import UnsafeFileError, load_tensors

# What DCP's metadata pickle refers to: its dataclasses, torch.Size and dtypes, and the
# layout lookup torch pickles layouts with.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def read_metadata(path: str | Path) -> Metadata:
    """The `.metadata` file of the DCP directory `path`, unpickled through the allow-list."""
    metadata_file = Path(path) / ".metadata"
    with open(metadata_file, "rb") as handle:
        try:
            metadata = _MetadataUnpickler(handle).load()
        except pickle.UnpicklingError as error:
            raise UnsafeFileError(f"{metadata_file}: refused: {error} (a crafted file, or not "
                                  "written by torch.distributed.checkpoint)") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeFileError(f"{metadata_file}: refused: not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `read_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by mixpo
            raise UnsafeFileError(f"{self.path}: per-rank DCP metadata is not supported")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor entries weights-only."""

    def __init__(self, checkpoint_dir: str | Path):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = load_tensors(value)
        except UnsafeFileError:
            raise UnsafeFileError(f"{self.checkpoint_dir}: refused: entry {fqn!r} holds Python "
                                  "objects other than tensors and plain values (a crafted "
                                  "file)") from None
        # What DefaultLoadPlanner.load_bytes does once the object is loaded.
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load(state: dict, checkpoint_dir: str | Path) -> None:
    """`dcp.load(state, checkpoint_id=checkpoint_dir)` through SafeReader and SafePlanner."""
    import warnings

    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process: DCP warns that there is no process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(str(checkpoint_dir)),
                     planner=SafePlanner(checkpoint_dir))
    except dcp.api.CheckpointException as error:  # DCP wraps each rank's exception
        for failure, _ in error.failures.values():
            if isinstance(failure, UnsafeFileError):
                raise failure from None
        raise

"""Atomic file and directory writes: an output is either complete or absent (or still the
previous version), whatever kills the process mid-write.

Everything mixpo writes (prepared data, reference log-prob caches, checkpoints, exported
models, reports) is written to a hidden staging path beside the target,
`.NAME.<pid>.<random>.tmp`, and moved over the target with `os.replace` (a rename, atomic on
one file system). Staging paths whose writer process is gone (killed mid-write) are removed
by the next write of the same target (`remove_stale_staging`).

mixpo replaces only what it wrote: every directory it writes holds `OUTPUT_MARKER`, naming
the command that wrote it, and an existing directory is replaced only when it is empty or
carries the marker of the same command (`check_replaceable`). Files it reads back are loaded
with `load_tensors` (torch's weights-only unpickler), never with plain pickle.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

# Written into every directory mixpo writes: {"written_by": "mixpo <command>"}.
OUTPUT_MARKER = ".mixpo-output.json"
# Directories written before the marker existed, recognised by a file only that writer leaves.
_LEGACY_SIGNS = {"mixpo train": ("mixpo_run.json", "trainer_state.pt"),
                 "mixpo export": ("mixpo_run.json",), "mixpo demo": ("demo_sft.json",)}


class UnsafeFileError(ValueError):
    """A file mixpo reads back holds Python objects beyond tensors and plain values."""


def load_tensors(path: str | os.PathLike, allowed_globals: tuple = ()) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU: tensors, numbers, strings, lists,
    tuples and dicts only (plus `allowed_globals`), so a crafted file cannot run code.
    UnsafeFileError naming the file when it refers to any other Python object (how a crafted
    pickle runs code); a damaged file raises what torch raises."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # not a reference to Python code: damaged bytes
            raise
        raise UnsafeFileError(
            f"{path}: refused: it holds Python objects other than tensors and plain values, "
            "which could run code when loaded (a crafted file, or not mixpo's); "
            "mixpo loads none of it") from None


def check_writable(target: str | os.PathLike) -> None:
    """ValueError naming the directory when `target` could not be written (a read-only or
    full file system, no permission): probed with a staging file beside it, before any work.
    Missing parent directories are created."""
    parent = Path(target).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=parent, prefix=_staging_prefix(Path(target)),
                                        suffix=".tmp")
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise ValueError(f"{parent}: cannot write here ({error.strerror or error})") from None


def written_by(directory: Path) -> str | None:
    """The command that wrote `directory` (its OUTPUT_MARKER), or None."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


def check_replaceable(target: str | os.PathLike, owner: str) -> None:
    """ValueError unless writing the directory `target` as `owner` (e.g. "mixpo export")
    destroys nothing mixpo did not write: `target` is absent, an empty directory, or a
    directory `owner` wrote before. Called before the work, and again just before the swap."""
    target = Path(target)
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link; mixpo does not write through links: "
                         "give the real path")
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another output path")
    if not any(target.iterdir()):
        return
    writer = written_by(target)
    if writer == owner or (writer is None and any(
            (target / sign).is_file() for sign in _LEGACY_SIGNS.get(owner, ()))):
        return
    what = f"`{writer}`" if writer else "something other than mixpo"
    raise ValueError(f"{target} already exists and was written by {what}; `{owner}` replaces "
                     "only its own earlier output: choose another path, or remove it yourself")


def _default_mode(directory: bool = False) -> int:
    """Permissions a plain `open(path, "w")` / `mkdir` would give; mkstemp and mkdtemp make
    private (0o600 / 0o700) paths, which would otherwise become the output's."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> int:
    """Delete the staging paths of `target` whose writer process no longer exists (a write
    that was killed). Returns how many were removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return 0
    removed = 0
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        pid = stale.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed


def replace_path(staged: Path, target: Path, owner: str | None = None) -> None:
    """Move a fully written file or directory `staged` over `target`. A directory is marked
    as `owner`'s, and an existing one swapped only when `check_replaceable(target, owner)`:
    the old one is kept until the new one is in place, then deleted. A file never replaces a
    directory."""
    if staged.is_dir():
        if not owner:
            raise TypeError("replace_path: a directory output needs owner=, the writing command")
        check_replaceable(target, owner)
        (staged / OUTPUT_MARKER).write_text(json.dumps({"written_by": owner}))
    elif target.is_dir() and not target.is_symlink():
        raise ValueError(f"{target} is a directory; give a file name for this output")
    if not staged.is_dir() or not target.exists():
        os.replace(staged, target)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target),
                                    suffix=".old.tmp"))
    os.replace(target, retired / target.name)
    os.replace(staged, target)
    shutil.rmtree(retired)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, directory: bool = False,
                  owner: str | None = None) -> Iterator[Path]:
    """`with atomic_output(path) as staging:` write the file (or, with `directory=True`, the
    directory) `staging`; on a clean exit it replaces `path`, on an exception it is removed
    and `path` is left as it was. Missing parent directories are created. A directory output
    names its `owner` (the command, e.g. "mixpo export"): an existing directory at `path` is
    replaced only under `check_replaceable`, checked before the work starts."""
    target = Path(target)
    if directory:
        if not owner:
            raise TypeError("atomic_output(directory=True) needs owner=, the writing command")
        check_replaceable(target, owner)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    if directory:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target),
                                        suffix=".tmp"))
    else:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=_staging_prefix(target),
                                        suffix=".tmp")
        os.close(handle)
        staging = Path(name)
    try:
        yield staging
        os.chmod(staging, _default_mode(directory))
        replace_path(staging, target, owner)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_output(target) as staging:
        staging.write_text(text, encoding="utf-8")

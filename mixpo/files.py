"""Atomic file and directory writes: an output is either complete or absent (or still the
previous version), whatever kills the process mid-write.

Everything mixpo writes (prepared data, reference log-prob caches, checkpoints, exported
models, reports) is written to a hidden staging path beside the target,
`.NAME.<pid>.<random>.tmp`, and moved over the target with `os.replace` (a rename, atomic on
one file system). Staging paths whose writer process is gone (killed mid-write) are removed
by the next write of the same target (`remove_stale_staging`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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


def replace_path(staged: Path, target: Path) -> None:
    """Move a fully written file or directory `staged` over `target`. A directory target is
    swapped: the old one is kept until the new one is in place, then deleted."""
    if not staged.is_dir() or not target.exists():
        os.replace(staged, target)
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target),
                                    suffix=".old.tmp"))
    os.replace(target, retired / target.name)
    os.replace(staged, target)
    shutil.rmtree(retired)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """`with atomic_output(path) as staging:` write the file (or, with `directory=True`, the
    directory) `staging`; on a clean exit it replaces `path`, on an exception it is removed
    and `path` is left as it was. Missing parent directories are created."""
    target = Path(target)
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
        replace_path(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_output(target) as staging:
        staging.write_text(text, encoding="utf-8")

"""Writing files so that nothing half-written ever carries a final name.

Every file qwenaudio writes for a user (transcripts, subtitles, summaries, traces, checkpoint shards) is written under
a temporary name in the same directory, flushed to disk, and renamed into place; a failure (a full disk, a read-only
directory, Ctrl-C) removes the temporary file and leaves whatever was at the final name untouched. A resumed run can
therefore trust that an output which exists is complete. Directories (a whole checkpoint) are built the same way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _mode() -> int:
    """Permissions a newly created file gets (0o644 under the usual umask); temporary files are made 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; once the block succeeds it is synced and renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text(text)` in UTF-8, atomically (see `writing`)."""
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def building(directory: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `directory` to fill; once the block succeeds it becomes
    `directory`, replacing an existing one only when `replace` says so (the old one is removed after the swap)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        if replace and directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Writing files so that nothing half-written ever carries a final name.

Every file qwenaudio writes for a user (transcripts, subtitles, summaries, traces, checkpoint shards) is written under
a temporary name in the same directory, flushed to disk, and renamed into place; a failure (a full disk, a read-only
directory, Ctrl-C) removes the temporary file and leaves whatever was at the final name untouched. A resumed run can
therefore trust that an output which exists is complete. Directories (a whole checkpoint) are built the same way.
Append-only logs (metrics.jsonl, an evaluation's replies) grow a synced line at a time instead (`append_line`).

Two more rules live here because every command needs them: `refuse_inputs` (an output never replaces one of the
command's inputs, whatever names the user gave them) and `fingerprint` (a cheap key of a checkpoint's content, so
a resumed run notices other weights under the same path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from .errors import InputError, OutputError


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


def append_line(file: TextIO, record: dict[str, Any]) -> None:
    """Append `record` to a JSON Lines `file` (opened by the caller with "a") as one line, synced before returning:
    a run killed at any moment loses at most the line it was writing (a torn last line, which its reader drops on
    resume)."""
    file.write(json.dumps(record, ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


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
        try:
            tmp.rename(directory)
        except BaseException:
            if old.exists():  # the swap failed half-way: the replaced directory goes back under its name
                old.rename(directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_directory(directory: str | Path, name: str = "--output-dir") -> Path:
    """Make `directory` (and its parents) and prove a file can be created in it, before any work is done: a
    read-only or full file system is OutputError, a file in the way InputError, each naming the option."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{name} {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise OutputError(f"{name} {directory}: cannot write there ({e.strerror or e})") from None
    return directory


def _same(a: Path, b: Path) -> bool:
    """One file or directory under two names (a symlink, `.` and its absolute path, a hard link)."""
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist yet, or is a symlink loop (which Path.resolve raises on)
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_inputs(writes: Iterable[str | Path], reads: Iterable[str | Path]) -> None:
    """Raise OutputError when something a command would write (a file, or a directory it builds whole) is one of
    its inputs or holds one: a command never replaces what it reads, whatever names the user gave both."""
    reads = [Path(r) for r in reads]
    for out in map(Path, writes):
        for read in reads:
            inside = any(_same(out, parent) for parent in Path(os.path.abspath(read)).parents)
            if _same(out, read) or inside:
                raise OutputError(f"{out} would replace the input {read}: write the output somewhere else")


def fingerprint(directory: str | Path, *, block: int = 1 << 16, samples: int = 16) -> str:
    """A cheap fingerprint of the files in `directory` (a checkpoint, an adapter): sha256 over each file's name, size
    and `samples` blocks spread over its content (small files whole). A run keyed on it notices weights replaced
    under the same path while reading a few MiB of a 16 GB checkpoint, not all of it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= block * samples:
                digest.update(f.read())
                continue
            for k in range(samples):  # the first and the last block, and evenly between
                f.seek(k * (size - block) // (samples - 1))
                digest.update(f.read(block))
    return digest.hexdigest()

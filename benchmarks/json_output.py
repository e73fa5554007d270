"""Every benchmark's `--json FILE`: the folder is made and proven writable when the arguments are read, before the
minutes of measuring, and the file is written under a temporary name and renamed at the end (qwenaudio.core.files),
so a mistyped or read-only folder costs nothing and an interrupted write leaves no half-written results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qwenaudio.core.errors import QwenAudioError
from qwenaudio.core.files import writable_directory, write_text


def json_path(text: str) -> Path:
    """argparse `type=` for --json: the path, once its folder exists and takes a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory: name the file to write")
    try:
        writable_directory(path.parent, "its folder")
    except QwenAudioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def write_json(path: Path, results: dict[str, Any]) -> None:
    """The results, indented, atomically."""
    write_text(path, json.dumps(results, indent=2) + "\n")

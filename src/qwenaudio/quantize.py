"""`qwenaudio quantize`: write an int8 or int4 copy of a checkpoint, in the official layout, that loads without
quantizing.

A quantized checkpoint is the official layout with each of the decoder's linear weights stored as int8 next to its
`*.weight_scale` and `"quantization": "int8-weight-only"` in config.json (the layer is `qwenaudio.core.int8`), or as
int4 packed two a byte next to its `*.weight_scale` and `*.weight_zero`, with `"quantization": "int4-weight-only"`
and `"quantization_group_size"` (`qwenaudio.core.int4`); `qwenaudio.load` reads it as it is.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .core import int4, int8
from .core.checkpoint import INDEX_FILE, load_checkpoint, quantizer, save_checkpoint
from .core.config import QwenAudioConfig
from .core.errors import CheckpointError, InputError
from .core.files import building, write_text, writing


def save_quantized(source: str | Path, target: str | Path, *, bits: int = 8, group_size: int = int4.DEFAULT_GROUP_SIZE,
                   overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write an int8 (or, with `bits=4`, int4 in groups of `group_size`) copy of the checkpoint directory `source`
    to `target`: the decoder's linears quantized, their scales (and zeros) in bf16 as the rest, every other file
    copied, config.json marked: 9.68 GB for Qwen-Audio in int8 instead of 16.79, 6.56 GB in int4 with groups of 64
    (from the tensor table).

    `source` is only read. `target` must be a new or empty directory outside it (`overwrite` replaces an existing
    one); the copy is built in a temporary directory beside it and renamed into place when complete, so a full disk
    or Ctrl-C leaves no partial checkpoint behind, and an overwritten one survives until the new one is whole."""
    source, target = Path(source), Path(target)
    if bits not in (8, 4):
        raise InputError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4 and group_size not in int4.GROUP_SIZES:
        raise InputError(f"group size must be one of {', '.join(map(str, int4.GROUP_SIZES))}, got {group_size!r}")
    _check_target(source, target, overwrite)
    config = QwenAudioConfig.from_json(source)
    if config.quantization:
        raise InputError(f"{source} is already quantized ({config.quantization}): quantize its float original")
    method = int8.METHOD if bits == 8 else int4.METHOD
    convert = quantizer(method, config, None, group_size)
    marks = {"quantization": method} | ({"quantization_group_size": group_size} if bits == 4 else {})
    try:
        with building(target, replace=overwrite) as partial:  # first, so an unwritable target fails before the work
            state = load_checkpoint(source, config, progress=progress, convert=convert)
            save_checkpoint(state, partial)
            for file in source.iterdir():
                if file.is_file() and file.suffix != ".safetensors" and file.name not in (INDEX_FILE, "config.json"):
                    with writing(partial / file.name) as tmp:
                        shutil.copyfile(file, tmp)
            write_text(partial / "config.json", json.dumps({**config.to_dict(), **marks}, indent=2) + "\n")
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{target}: could not write the int{bits} checkpoint ({e.strerror or e}); nothing "
                              "was left there") from e
    return target


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse a target that is the source, lies inside it or holds it, or already holds files (unless `overwrite`)."""
    src, dst = source.resolve(), target.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise InputError(f"the target {target} overlaps the source {source}: write the quantized checkpoint to a "
                         "directory of its own")
    if target.exists() and not target.is_dir():
        raise InputError(f"the target {target} is a file, not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise InputError(f"the target {target} exists and is not empty: choose a new directory, or replace it with "
                         "overwrite=True (qwenaudio quantize --overwrite)")

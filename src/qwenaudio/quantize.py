"""`qwenaudio quantize`: write an int8 or int4 copy of a checkpoint, in its family's published layout, that loads
without quantizing.

A quantized checkpoint is the published layout with each of the decoder's linear weights stored as int8 next to its
`*.weight_scale` and `"quantization": "int8-weight-only"` in config.json (the layer is `qwenaudio.core.int8`), or as
int4 packed two a byte next to its `*.weight_scale` and `*.weight_zero`, with `"quantization": "int4-weight-only"`
and `"quantization_group_size"` (`qwenaudio.core.int4`); `qwenaudio.load` reads it as it is. Qwen2-Audio's
config.json stays transformers' (`text_config`, `audio_config`), these keys beside them at the top level.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .core import int4, int8
from .core.checkpoint import int4_group_size, load_checkpoint, quantizer, save_checkpoint, writing_checkpoint
from .core.errors import InputError
from .core.families import read_config
from .core.files import write_text


def save_quantized(source: str | Path, target: str | Path, *, bits: int = 8, group_size: int | None = None,
                   overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write an int8 (or, with `bits=4`, int4 in groups of `group_size`) copy of the checkpoint directory `source`
    to `target`: the decoder's linears quantized, their scales (and zeros) in bf16 as the rest, every other file
    copied, config.json marked: 9.68 GB for Qwen-Audio in int8 instead of 16.79, 6.56 GB in int4 with groups of 64
    (from the tensor table). `group_size` defaults to 64, or to the largest allowed size below it that divides every
    layer's inputs (a warning says so); one given that does not divide them all is refused, naming the layer.

    `source` is only read. `target` must not be, hold or lie inside it, and must be a new or empty directory
    (`overwrite` replaces a checkpoint directory there; `checkpoint.check_target`). The copy is built in a temporary
    directory beside it, made before anything is read, and renamed into place when complete, so an unwritable
    target fails first, and a full disk or Ctrl-C leaves no partial checkpoint behind (OutputError), and an
    overwritten one survives until the new one is whole."""
    if not isinstance(source, (str, Path)) or not isinstance(target, (str, Path)):
        raise InputError(f"save_quantized needs the source and target directories as paths, got {source!r} and "
                         f"{target!r}")
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite must be True or False, got {overwrite!r}")
    if isinstance(bits, bool) or bits not in (8, 4):
        raise InputError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8 and group_size is not None:
        raise InputError(f"group_size applies to bits=4 only (int8 has a scale per row), got {group_size!r}")
    source, target = Path(source), Path(target)
    with writing_checkpoint(target, source, overwrite=overwrite) as partial:
        config = read_config(source)
        if config.quantization:
            raise InputError(f"{source} is already quantized ({config.quantization}): quantize its float original")
        group_size = int4_group_size(config, group_size) if bits == 4 else None
        method = int8.METHOD if bits == 8 else int4.METHOD
        convert = quantizer(method, config, None, group_size)
        marks = {"quantization": method} | ({"quantization_group_size": group_size} if bits == 4 else {})
        state = load_checkpoint(source, config, progress=progress, convert=convert)
        save_checkpoint(state, partial)
        write_text(partial / "config.json", json.dumps({**config.to_dict(), **marks}, indent=2) + "\n")
    return target

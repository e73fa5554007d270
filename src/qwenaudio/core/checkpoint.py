"""Official-layout safetensors checkpoints: which tensors exist, and reading / writing them
(docs/MODEL.md#checkpoint).

This is the one place that maps official tensor names to our modules, with each family's table of prefixes
(`families.Family.names`). Our attribute paths are the official names with one prefix dropped (`official_name`,
`split_state`): in Qwen-Audio the encoder's `blocks.0.attn.query.weight` is stored as
`transformer.audio.blocks.0.attn.query.weight`, the decoder's `h.0.attn.c_attn.weight` as
`transformer.h.0.attn.c_attn.weight`, and its `lm_head.weight` as itself; in Qwen2-Audio the encoder's
`audio_tower.*` and `multi_modal_projector.*` as themselves and the decoder's `model.layers.0.self_attn.q_proj.weight`
as `language_model.model.layers.0.self_attn.q_proj.weight`. `tensor_shapes`, the table every checkpoint is checked
against, is read off the modules, so the two cannot disagree.

Reading goes one tensor at a time through safetensors' memory map, converting each to the requested dtype and
device before the next is touched: the peak is the finished state dict plus one tensor, never two copies of the
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import int4, int8
from .checks import as_path, expect, shown, whole
from .config import QwenAudioConfig
from .families import QWEN_AUDIO, Config, Family, family_of, read_config
from .qwen2_audio import Qwen2AudioConfig
from .errors import CheckpointError, ConfigError, InputError, OutputError, QwenAudioError
from .files import building, refuse_inputs, write_text, writing

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
Shape = tuple[int, ...]

# Where each of our modules sits in an official Qwen-Audio checkpoint (`families.QWEN_AUDIO.names` in full): the
# official tree is `transformer.{wte, h, ln_f, audio}` then `lm_head`, and our attribute paths are the official names
# with this prefix dropped. The decoder's `lm_head` sits beside `transformer`, so it keeps its name.
PREFIXES = {"encoder": "transformer.audio.", "decoder": "transformer."}
V = TypeVar("V")


def official_name(owner: str, path: str, family: Family = QWEN_AUDIO) -> str:
    """The checkpoint's name for the tensor at attribute `path` of our `owner` ("encoder" or "decoder")."""
    return family.official_name(owner, path)


def module_path(name: str, family: Family = QWEN_AUDIO) -> tuple[str, str]:
    """(owner, attribute path) of an official tensor name: the inverse of `official_name`."""
    return family.module_path(name)


def split_state(state: dict[str, V], family: Family = QWEN_AUDIO) -> dict[str, dict[str, V]]:
    """A checkpoint's tensors (or anything keyed by official name) as each module's own, under its attribute paths:
    {"encoder": {"conv1.weight": …}, "decoder": {"wte.weight": …, "lm_head.weight": …}}."""
    parts: dict[str, dict[str, V]] = {"encoder": {}, "decoder": {}}
    for name, value in state.items():
        owner, path = family.module_path(name)
        parts[owner][path] = value
    return parts


def tensor_shapes(config: Config) -> dict[str, Shape]:
    """Every tensor an official checkpoint stores, with its shape, in checkpoint order.

    Read off our own modules, built on the meta device (no memory): their state (parameters and persistent
    buffers) under official names, ordered as the official tree stores them, `transformer.*` before `lm_head.*`.
    A quantized checkpoint (`qwenaudio quantize`) keeps every tensor (an int4 weight packed two a byte) and
    adds the int8 layers' per-row `*.weight_scale`, or the int4 layers' per-group `*.weight_scale` and
    `*.weight_zero`, after them, in the decoder's order. tests/golden/official_tensors.py holds the table written
    by hand from the official checkpoint's index.
    """
    family = family_of(config)
    try:
        with torch.device("meta"):
            encoder, decoder = family.encoder(config), family.decoder(config)
    except (RuntimeError, OverflowError) as e:  # a corrupt width: more elements than an index can count
        raise ConfigError(f"the config's dimensions describe tensors too large to exist ({e})") from None
    shapes = _state_shapes(family, "decoder", decoder) | _state_shapes(family, "encoder", encoder)
    shapes = dict(sorted(shapes.items(), key=lambda item: item[0].startswith("lm_head.")))  # Qwen-Audio's: last
    if config.quantization:  # quantized weights keep their names and places; the new scales (and zeros) go last
        shapes |= _state_shapes(family, "decoder", quantize_layout(decoder, config.quantization,
                                                                   config.quantization_group_size))
    return shapes


def _state_shapes(family: Family, owner: str, module: nn.Module) -> dict[str, Shape]:
    """Shapes of a module's state dict (its parameters and persistent buffers), by official name."""
    return {family.official_name(owner, path): tuple(t.shape) for path, t in module.state_dict().items()}


@dataclass(frozen=True)
class Quantization:
    """One way to quantize the decoder's linears: config.json's name for it, the layer that replaces `nn.Linear`,
    how to swap those layers in (`swap(decoder, group_size)`) and how to quantize weights as they are read
    (`quantizer(names, dtype, group_size)`, `load_checkpoint`'s `convert` hook)."""

    method: str
    layer: type[nn.Module]
    swap: Callable[[nn.Module, int | None], nn.Module]
    quantizer: Callable[[list[str], torch.dtype | None, int | None], Callable[[str, torch.Tensor], dict]]


# `load(quantize=...)`'s values, each with its method: the one table every quantization choice is read from
QUANTIZATIONS = {
    "int8": Quantization(int8.METHOD, int8.Int8Linear, lambda decoder, _: int8.quantize_int8(decoder),
                         lambda names, dtype, _: int8.quantizer(names, dtype)),
    "int4": Quantization(int4.METHOD, int4.Int4Linear, int4.quantize_int4, int4.quantizer),
}


def _method(method: str) -> Quantization:
    """The table's entry for config.json's `method` ("int8-weight-only" or "int4-weight-only")."""
    return next(q for q in QUANTIZATIONS.values() if q.method == method)


def quantization_of(module: nn.Module) -> str | None:
    """"int8" or "int4" when `module` (a model, a decoder) holds that method's layers, else None."""
    kinds = {type(m) for m in module.modules()}
    return next((name for name, q in QUANTIZATIONS.items() if q.layer in kinds), None)


def quantize_layout(decoder: nn.Module, method: str, group_size: int | None) -> nn.Module:
    """`decoder` with its linears swapped for `method`'s layers ("int8-weight-only" or "int4-weight-only")."""
    return _method(method).swap(decoder, group_size)


def quantizer(method: str, config: Config, dtype: torch.dtype | None, group_size: int | None
              ) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`load_checkpoint`'s `convert` hook quantizing the decoder's linears in `method` as they are read."""
    return _method(method).quantizer(quantized_names(config), dtype, group_size)


def quantized_names(config: Config) -> list[str]:
    """Official names of the weights that int8 quantization replaces: those of every `nn.Linear` of the decoder,
    the layers `quantize_int8` swaps."""
    return list(_linear_widths(config))


def int4_group_size(config: Config, requested: int | None = None) -> int:
    """The int4 group size for this model's linears: `requested`, or by default 64 or the largest allowed size
    below it that divides every layer's inputs (`int4.fitting_group_size`)."""
    return int4.fitting_group_size(_linear_widths(config), requested)


def _linear_widths(config: Config) -> dict[str, int]:
    """The inputs of every `nn.Linear` of the decoder, by its weight's official name, in module order."""
    family = family_of(config)
    with torch.device("meta"):
        decoder = family.decoder(config)
    return {family.official_name("decoder", f"{path}.weight"): module.in_features
            for path, module in decoder.named_modules() if isinstance(module, nn.Linear)}


def shard_files(path: str | Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it, for a checkpoint directory (index + shards, or a single
    `model.safetensors`) or a single `.safetensors` file. Every shard the index names must exist."""
    path = Path(path)
    if path.is_file():
        return {name: path for name in read_header(path)}
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    index = path / INDEX_FILE
    if not index.exists():
        single = path / SINGLE_FILE
        if single.exists():
            return {name: single for name in read_header(single)}
        raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
    files = {name: path / shard for name, shard in read_index(index).items()}
    missing = sorted({f for f in files.values() if not f.is_file()})
    if missing:
        listed = ", ".join(f.name for f in missing)
        raise CheckpointError(f"{path}: missing shard file(s) named in {INDEX_FILE}: {listed}")
    return files


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a safetensors index: tensor name -> shard file name.

    Shards must be plain file names, so that a corrupt or hostile index cannot make us read a file outside the
    checkpoint directory (`../x`, `/etc/x`); symlinked shards, as in the Hugging Face cache, are fine.
    """
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{index}: cannot read the index ({type(e).__name__}: {e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] must name a shard file in the checkpoint directory, got {shard!r}"
            )
    return weight_map


def read_header(file: Path) -> dict[str, tuple[torch.dtype, Shape]]:
    """Dtype and shape of every tensor in one safetensors file, read from its header alone."""
    try:
        with safe_open(file, framework="pt") as f:
            raw = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, plus OSError for unreadable files
        raise CheckpointError(f"{file}: cannot read safetensors header ({e}); the file is truncated or corrupt") from e
    for name, (dtype, _) in raw.items():
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
    return {name: (_DTYPES[dtype], shape) for name, (dtype, shape) in raw.items()}


def load_checkpoint(
    path: str | Path,
    config: Config | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prefix: str | tuple[str, ...] = "",
    progress: Callable[[int, int], None] | None = None,
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read and check every tensor of an official checkpoint.

    `config` defaults to the directory's `config.json`. `dtype` None keeps the stored dtype (bf16 for the official
    weights). On the meta device nothing but the headers is read, which checks a full-size checkpoint in seconds.
    Missing, unexpected and wrongly shaped tensors are reported together in one `CheckpointError`. With `prefix`,
    only tensors whose names start with it are read (all headers are still checked). `progress(done, total)` is
    called after each tensor. `convert(name, tensor)` may replace each tensor as it arrives by named tensors of
    its own (quantization does), so that the full-precision original is never held for long. Integer tensors
    (int8 weights) keep their dtype.
    """
    path = as_path(path, "path")
    expect(config, (QwenAudioConfig, Qwen2AudioConfig, type(None)), "config",
           "a QwenAudioConfig, a Qwen2AudioConfig or None (the directory's config.json)")
    files = shard_files(path)
    if config is None:
        config = read_config(path if path.is_dir() else path.parent)
    headers: dict[str, tuple[torch.dtype, Shape]] = {}
    for file in sorted(set(files.values())):
        header = read_header(file)
        absent = [n for n, f in files.items() if f == file and n not in header]
        if absent:
            raise CheckpointError(f"{file}: {INDEX_FILE} places {absent[0]!r} here but the shard does not hold it")
        headers |= header
    layers = config.num_hidden_layers + config.audio.n_layer
    if layers > len(files):  # every layer stores tensors; and a corrupt count must not build a table of billions
        raise CheckpointError(f"{path}: the config asks for {config.num_hidden_layers} decoder and "
                              f"{config.audio.n_layer} encoder layers, but the checkpoint holds {len(files)} tensors")
    check_tensors({n: headers[n][1] for n in files}, tensor_shapes(config), source=str(path))

    wanted = [n for n in files if n.startswith(prefix)]
    device = torch.device(device)
    if device.type == "meta":
        return {n: torch.empty(headers[n][1], dtype=_read_dtype(headers[n][0], dtype), device="meta") for n in wanted}
    state: dict[str, dict[str, torch.Tensor]] = {}  # by name as stored: what it became
    for file in sorted({files[n] for n in wanted}):
        for name, tensor in _shard_tensors(file, [n for n in wanted if files[n] == file], separately=bool(convert)):
            tensor = tensor.to(device, _read_dtype(tensor.dtype, dtype))
            state[name] = convert(name, tensor) if convert else {name: tensor}
            del tensor
            if progress:
                progress(len(state), len(wanted))
    return {k: v for n in wanted for k, v in state[n].items()}


def _shard_tensors(file: Path, names: list[str], separately: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one shard, as views of its memory map. `separately`, each through a map of its own,
    unmapped as soon as the tensor is dropped: a converting load keeps nothing of the original, and one map per
    shard would keep every page read so far resident until the shard's last tensor (2 GB at the peak)."""
    if separately:
        for name in names:
            with safe_open(file, framework="pt", device="cpu") as f:
                yield name, f.get_tensor(name)
    else:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)


def _read_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Float tensors are read in the requested dtype (if any); integer ones (int8 weights) as stored."""
    return requested if requested and stored.is_floating_point else stored


def check_tensors(found: dict[str, Shape], expected: dict[str, Shape], source: str) -> None:
    """Raise one error that lists every missing, unexpected and shape-mismatched tensor."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n}: stored {list(found[n])}, expected {list(s)}" for n, s in expected.items()
             if n in found and tuple(found[n]) != tuple(s)]
    if missing or unexpected or wrong:
        parts = [f"{source}: checkpoint does not match the config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = "\n    ".join(items[:10]) + (f"\n    … and {len(items) - 10} more" if len(items) > 10 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        raise CheckpointError("\n".join(parts))


def plan_shards(nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into consecutive shards of at most `max_shard_bytes` (a larger tensor sits alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in nbytes.items():
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_name(i: int, count: int) -> str:
    """`model-00001-of-00009.safetensors`, numbered from 1 as the official shards are."""
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_index(directory: Path, shards: list[list[str]], total_size: int) -> None:
    """Write `model.safetensors.index.json` for `shards` (lists of tensor names, one per shard file)."""
    weight_map = {name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def save_checkpoint(
    state: dict[str, torch.Tensor], directory: str | Path, *, max_shard_bytes: int = 2 * 1024**3
) -> Path:
    """Write tensors in the official layout: `model-0000i-of-0000N.safetensors` shards plus the index."""
    expect(state, dict, "state", "a dict of tensor names to torch.Tensor")
    for name, tensor in state.items():
        expect(tensor, torch.Tensor, f"state[{name!r}]", "a torch.Tensor")
    layout = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
    return write_shards(layout, state.__getitem__, directory, max_shard_bytes=max_shard_bytes)


def write_shards(
    layout: dict[str, tuple[Shape, torch.dtype]],
    make: Callable[[str], torch.Tensor],
    directory: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the tensors named in `layout` (name -> shape, dtype), in its order, asking `make(name)` for each
    only when its shard is written: a 16.8 GB checkpoint is produced with one shard in memory at a time. Each file
    is written under a temporary name and renamed (`qwenaudio.files`), the index last."""
    directory = as_path(directory, "directory")
    if not whole(max_shard_bytes, 1):
        raise InputError(f"max_shard_bytes must be an int >= 1, got {shown(max_shard_bytes)}")
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = {n: math.prod(shape) * dtype.itemsize for n, (shape, dtype) in layout.items()}
    shards = plan_shards(nbytes, max_shard_bytes)
    for i, names in enumerate(shards):
        tensors = {n: make(n).detach().to("cpu").contiguous() for n in names}
        shard = directory / shard_name(i, len(shards))
        with writing(shard) as tmp:
            try:
                save_file(tensors, tmp, metadata={"format": "pt"})
            except SafetensorError as e:  # how safetensors reports a full disk: an OSError like any other
                raise OSError(f"{shard.name}: {e}") from e
        del tensors
    write_index(directory, shards, sum(nbytes.values()))
    return directory


def check_target(target: Path, reads: Iterable[Path], overwrite: bool) -> None:
    """The rule for a checkpoint directory a command writes whole (quantize, merge), checked before anything is
    read: it is not, does not hold and does not lie inside any input, under any name (a symlink, `.`); it is new or
    empty, or with `overwrite` a checkpoint directory (a folder of other files is never replaced). OutputError
    otherwise."""
    reads = list(reads)
    refuse_inputs([target], reads)
    for read in reads:
        for parent in Path(os.path.abspath(target)).parents:
            if parent.exists() and Path(read).exists() and os.path.samefile(parent, read):
                raise OutputError(f"the target {target} lies inside the input {read}: write the checkpoint to a "
                                  "directory of its own")
    if target.exists() and not target.is_dir():
        raise OutputError(f"the target {target} is a file, not a directory")
    if target.is_symlink() and not target.exists():
        raise OutputError(f"the target {target} is a symbolic link that leads nowhere (a loop, or a missing "
                          "directory): choose a new directory")
    held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if held and not overwrite:
        raise OutputError(f"the target {target} exists and is not empty: choose a new directory, or replace the "
                          "checkpoint there with --overwrite (overwrite=True)")
    if held and not ((target / "config.json").is_file() and
                     ((target / INDEX_FILE).is_file() or (target / SINGLE_FILE).is_file())):
        raise OutputError(f"--overwrite replaces a checkpoint directory only, and {target} is none (it holds "
                          f"{', '.join(held[:3])}{', …' if len(held) > 3 else ''}): choose a new directory")


@contextmanager
def building_checkpoint(target: Path, overwrite: bool) -> Iterator[Path]:
    """`files.building` for a checkpoint directory: an empty directory beside `target` to fill, made first, so an
    unwritable place fails before any work. A failure to write (a read-only directory, a full disk) is an
    OutputError naming `target`; nothing partial is left, and a checkpoint `overwrite` was to replace is kept."""
    replacing = overwrite and target.is_dir() and any(target.iterdir())
    try:
        with building(Path(os.path.abspath(target)), replace=replacing) as partial:
            yield partial
    except QwenAudioError:
        raise
    except OSError as e:
        kept = "; the checkpoint there is as it was" if replacing else ""
        raise OutputError(f"{target}: could not write the checkpoint ({e.strerror or e}); nothing was left "
                          f"there{kept}") from e


@contextmanager
def writing_checkpoint(target: Path, source: Path, *, reads: Iterable[Path] = (), overwrite: bool = False
                       ) -> Iterator[Path]:
    """The one way a checkpoint directory is made from another (quantize, merge, a fine-tuned model): `target` is
    refused as `check_target` says (never `source` or another of `reads`; new or empty, or with `overwrite` a
    checkpoint), then built aside (`building_checkpoint`). The block writes the tensors, and any file it changes
    (config.json), into the directory it is given; every other file of `source` (config, vocabulary, generation
    config) is then copied, each synced, and the whole renamed into place."""
    check_target(target, [source, *reads], overwrite)
    with building_checkpoint(target, overwrite) as partial:
        yield partial
        for file in source.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != INDEX_FILE and not (
                    partial / file.name).exists():
                with writing(partial / file.name) as tmp:
                    shutil.copyfile(file, tmp)


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

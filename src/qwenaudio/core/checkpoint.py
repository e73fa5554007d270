"""Official-layout safetensors checkpoints: which tensors exist, and reading / writing them (SPEC §1, §3).

`tensor_shapes` is the one place that names the official tensors. Our modules use those names as their own
attribute paths (`transformer.h.0.attn.c_attn`), so loading is an identity mapping checked against this table.

Reading goes one tensor at a time through safetensors' memory map, converting each to the requested dtype and
device before the next is touched: the peak is the finished state dict plus one tensor, never two copies of the
checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import QwenAudioConfig
from .errors import CheckpointError
from .files import write_text, writing
from .int8 import scale_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
Shape = tuple[int, ...]


def tensor_shapes(config: QwenAudioConfig) -> dict[str, Shape]:
    """Every tensor an official checkpoint stores, with its shape, in checkpoint order."""
    d, ff, a = config.hidden_size, config.mlp_width, config.audio
    shapes: dict[str, Shape] = {"transformer.wte.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        h = f"transformer.h.{i}."
        shapes |= {
            h + "ln_1.weight": (d,),
            h + "attn.c_attn.weight": (3 * d, d),  # q | k | v stacked
            h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d),
            h + "ln_2.weight": (d,),
            h + "mlp.w1.weight": (ff, d),
            h + "mlp.w2.weight": (ff, d),  # carries the SiLU gate
            h + "mlp.c_proj.weight": (d, ff),
        }
    shapes |= {"transformer.ln_f.weight": (d,)}
    e = "transformer.audio."
    shapes |= {
        e + "positional_embedding": (a.n_ctx, a.n_state),
        e + "conv1.weight": (a.n_state, a.n_mels, 3),
        e + "conv1.bias": (a.n_state,),
        e + "conv2.weight": (a.n_state, a.n_state, 3),
        e + "conv2.bias": (a.n_state,),
    }
    for j in range(a.n_layer):
        b = f"{e}blocks.{j}."
        shapes |= {
            b + "attn.query.weight": (a.n_state, a.n_state),
            b + "attn.query.bias": (a.n_state,),
            b + "attn.key.weight": (a.n_state, a.n_state),  # Whisper's key projection has no bias
            b + "attn.value.weight": (a.n_state, a.n_state),
            b + "attn.value.bias": (a.n_state,),
            b + "attn.out.weight": (a.n_state, a.n_state),
            b + "attn.out.bias": (a.n_state,),
            b + "attn_ln.weight": (a.n_state,),
            b + "attn_ln.bias": (a.n_state,),
            b + "mlp.0.weight": (4 * a.n_state, a.n_state),
            b + "mlp.0.bias": (4 * a.n_state,),
            b + "mlp.2.weight": (a.n_state, 4 * a.n_state),
            b + "mlp.2.bias": (a.n_state,),
            b + "mlp_ln.weight": (a.n_state,),
            b + "mlp_ln.bias": (a.n_state,),
        }
    shapes |= {
        e + "ln_post.weight": (a.n_state,),
        e + "ln_post.bias": (a.n_state,),
        e + "proj.weight": (a.output_dim, a.n_state),
        e + "proj.bias": (a.output_dim,),
        e + "audio_bos_eos_token.weight": (2, a.output_dim),  # row 0 BOS, row 1 EOS
        "lm_head.weight": (config.vocab_size, d),
    }
    if config.quantization:  # int8 weights keep their shapes; each gets a per-row scale (qwenaudio.quantize)
        shapes |= {scale_name(n): shapes[n][:1] for n in quantized_names(config)}
    return shapes


def quantized_names(config: QwenAudioConfig) -> list[str]:
    """Official names of the weights that int8 quantization replaces: every linear of the decoder."""
    layers = [f"transformer.h.{i}.{m}.weight" for i in range(config.num_hidden_layers)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")]
    return layers + ["lm_head.weight"]


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
    config: QwenAudioConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prefix: str = "",
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
    path = Path(path)
    files = shard_files(path)
    if config is None:
        config = QwenAudioConfig.from_json(path if path.is_dir() else path.parent)
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
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(prefix) and name in files:
                    tensor = f.get_tensor(name)
                    tensor = tensor.to(device, _read_dtype(tensor.dtype, dtype))
                    state[name] = convert(name, tensor) if convert else {name: tensor}
                    if progress:
                        progress(len(state), len(wanted))
    return {k: v for n in wanted for k, v in state[n].items()}


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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = {n: math.prod(shape) * dtype.itemsize for n, (shape, dtype) in layout.items()}
    shards = plan_shards(nbytes, max_shard_bytes)
    for i, names in enumerate(shards):
        tensors = {n: make(n).detach().to("cpu").contiguous() for n in names}
        with writing(directory / shard_name(i, len(shards))) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        del tensors
    write_index(directory, shards, sum(nbytes.values()))
    return directory


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

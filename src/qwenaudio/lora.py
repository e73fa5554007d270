"""LoRA adapters: a small trainable low-rank update beside each chosen linear of a frozen model, saved in peft's format.

A LoRA linear computes `base(x) + B(A(dropout(x))) · scale`, with A [r, in] and B [out, r] in fp32 (whatever the
base's dtype), scale = alpha / r (or alpha / sqrt(r) with rsLoRA). B starts at zero, so an adapter fresh from
`apply_lora` changes nothing; the base layer stays frozen and may be int8 (`Int8Linear`), which is how the full
model can be adapted on a 24 GB machine.

Adapters are saved as peft saves them for the official model: `adapter_model.safetensors` with keys
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, … (the official module names) and
`adapter_config.json` with peft's fields, so an adapter trained here loads with peft on the official model, and
one trained with peft loads here (`load_adapter`, or `qwenaudio.load(..., adapter=DIR)`).

Each family's names are one `Naming` record (`NAMING`). Qwen2-Audio's peft names are transformers 5's module names,
`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight` (its checkpoint's
`language_model.model.` is transformers' `model.language_model.`, `audio_tower.` is `model.audio_tower.`), which is
what peft 0.21 writes over transformers 5; adapters written over transformers 4, keyed by the checkpoint's names
(`base_model.model.language_model.model.layers.0…`), are read too. Its target names are ambiguous (`q_proj` is
also each audio tower layer's, and peft adapts both towers for `target_modules=["q_proj"]`), so a Qwen2-Audio
adapter adapts exactly the modules its tensors name, and ours says which in `target_modules` as a regular
expression over transformers' names.

Merging folds each update into its base weight, W + B A · scale computed in fp32 and rounded once to the dtype
stored (`merge_lora` in memory, `merge_checkpoint` from files to files, as `qwenaudio merge` does). An adapter
directory that cannot be read or does not fit the model is a CheckpointError naming the file, like a checkpoint's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core.checkpoint import load_checkpoint, write_shards, writing_checkpoint
from .core.checks import finite, whole
from .core.errors import CheckpointError, InputError, QwenAudioError
from .core.families import FAMILIES, QWEN2_AUDIO, QWEN_AUDIO, Family, family_of, read_config
from .core.files import building, write_text, writing
from .core.int4 import Int4Linear
from .core.int8 import Int8Linear
from .core.model import QwenAudio, as_dtype, expect_model

DECODER_TARGETS = ("c_attn", "c_proj", "w1", "w2")  # the attention and MLP linears of every decoder block
ENCODER_TARGETS = ("query", "key", "value", "out", "mlp.0", "mlp.2")  # Whisper's block linears
# Qwen2-Audio's: every linear of each language-model layer (what LLaMA-Factory's `all` and ms-swift's `all-linear`
# adapt with the audio tower frozen), and each audio tower layer's
QWEN2_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN2_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped (official) model
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
Shape = tuple[int, ...]
LINEARS = (nn.Linear, Int8Linear, Int4Linear)


@dataclass(frozen=True)
class Naming:
    """Where one family's LoRA goes and what peft calls it."""

    decoder: tuple[str, ...]  # the default targets: each decoder block's linears
    encoder: tuple[str, ...]  # what `encoder=True` adds: each audio encoder block's linears
    blocks: tuple[str, str]  # the attribute prefix of the decoder's and the encoder's blocks
    # (checkpoint prefix, transformers' module prefix) where the names peft sees are not the checkpoint's
    renamed: tuple[tuple[str, str], ...] = ()
    by_tensors: bool = False  # an adapter adapts the modules its tensors name (else: those its targets name)


NAMING = {
    QWEN_AUDIO: Naming(DECODER_TARGETS, ENCODER_TARGETS, ("h.", "blocks.")),
    QWEN2_AUDIO: Naming(QWEN2_DECODER_TARGETS, QWEN2_ENCODER_TARGETS, ("model.layers.", "audio_tower.layers."),
                        renamed=(("language_model.model.", "model.language_model."),
                                 ("language_model.lm_head.", "lm_head."), ("audio_tower.", "model.audio_tower."),
                                 ("multi_modal_projector.", "model.multi_modal_projector.")),
                        by_tensors=True),
}


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilized LoRA)
    # decoder module names (last parts of the path), as peft's target_modules; None: every linear of each decoder
    # block (the family's `Naming.decoder`: DECODER_TARGETS, QWEN2_DECODER_TARGETS)
    targets: tuple[str, ...] | None = None
    encoder: bool = False  # also the audio encoder's block linears (`Naming.encoder`)

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):  # a list is welcome; one bare string is not a list of names
            object.__setattr__(self, "targets", tuple(self.targets))
        for ok, message in _rules(self):
            if not ok:
                raise InputError(message)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class Adapter:
    """An adapter directory as read (`read_adapter`): its config and its fp32 tensors under peft's names."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, Tensor]


MAX_RANK = 4096  # Qwen-Audio's hidden size: no rank past a layer's narrower side adds anything


def _rules(c: LoraConfig) -> list[tuple[bool, str]]:
    """(holds, message) for each field, checked when the config is made: an alpha of 0 would train nothing and a
    negative one train backwards, silently."""
    return [
        (whole(c.rank, 1, MAX_RANK),
         f"LoRA rank must be a positive integer (at most {MAX_RANK}), got {c.rank!r}"),
        (finite(c.alpha) and c.alpha > 0, f"LoRA alpha must be a finite number > 0, got {c.alpha!r}"),
        (finite(c.dropout) and 0 <= c.dropout < 1, f"LoRA dropout must be in [0, 1), got {c.dropout!r}"),
        (isinstance(c.rslora, bool), f"rslora must be True or False, got {c.rslora!r}"),
        (isinstance(c.encoder, bool), f"encoder must be True or False, got {c.encoder!r}"),
        (c.targets is None or isinstance(c.targets, tuple) and all(
            isinstance(t, str) and t.strip() for t in c.targets),
         f"LoRA targets must be module names (non-empty strings), got {c.targets!r}"),
    ]


class LoraLinear(nn.Module):
    """A frozen linear (float or int8) plus its trainable low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__()
        self.base, self.scale = base, config.scale
        device = base.weight.device
        # fp32 whatever the base's dtype: AdamW's small steps would vanish in bf16 weights
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x).float())) * self.scale
        return self.base(x) + update.to(x.dtype)

    def delta(self) -> Tensor:
        """The update to the base weight, B @ A · scale [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale


def _targets(family: Family, owners: dict[str, nn.Module], config: LoraConfig) -> list[tuple[str, str]]:
    """(owner, module path) of every linear the config adapts in the "decoder" and "encoder" of `owners`, in module
    order, the decoder's first (the order their A matrices draw from torch's generator)."""
    naming = NAMING[family]
    wanted = {"decoder": config.targets or naming.decoder, "encoder": naming.encoder if config.encoder else ()}
    return [(owner, name) for owner, blocks in zip(("decoder", "encoder"), naming.blocks)
            for name, module in owners[owner].named_modules()
            if name.startswith(blocks) and isinstance(module, LINEARS)
            and any(name == t or name.endswith(f".{t}") for t in wanted[owner])]


def peft_name(family: Family, owner: str, path: str) -> str:
    """peft's name for the module at `path` of our `owner`: the one transformers' model (or the official code's)
    gives it, under `base_model.model.`."""
    return PEFT_PREFIX + _renamed(family.official_name(owner, path), NAMING[family].renamed)


def _renamed(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """`name` with the first of `pairs`' (old prefix, new prefix) that it starts with replaced."""
    return next((new + name.removeprefix(old) for old, new in pairs if name.startswith(old)), name)


def _expected(family: Family, owners: dict[str, nn.Module], found: list[tuple[str, str]], rank: int
              ) -> dict[str, Shape]:
    """The shape of every LoRA tensor of rank `rank` on the modules `found`, by peft name: what an adapter must
    hold."""
    shapes = {}
    for owner, path in found:
        layer, name = owners[owner].get_submodule(path), peft_name(family, owner, path)
        shapes[f"{name}.lora_A.weight"] = (rank, layer.in_features)
        shapes[f"{name}.lora_B.weight"] = (layer.out_features, rank)
    return shapes


def _owners(model: QwenAudio) -> dict[str, nn.Module]:
    expect_model(model)
    return {"encoder": model.encoder, "decoder": model.decoder}


def _wrap(model: QwenAudio, found: list[tuple[str, str]], config: LoraConfig) -> dict[str, nn.Parameter]:
    """Wrap the linears `found` in LoraLinear (in place), freeze everything else, and return the LoRA parameters."""
    owners = _owners(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for owner, path in found:
        parent_path, _, name = path.rpartition(".")
        parent = owners[owner].get_submodule(parent_path)
        setattr(parent, name, LoraLinear(getattr(parent, name), config))
    model.lora_config = config
    return lora_parameters(model)


def apply_lora(model: QwenAudio, config: LoraConfig) -> dict[str, nn.Parameter]:
    """Wrap the targeted linears of `model` in LoraLinear (in place), freeze everything else, and return the LoRA
    parameters by their peft names (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, …)."""
    owners = _owners(model)
    if not isinstance(config, LoraConfig):
        raise InputError(f"apply_lora needs a lora.LoraConfig, got {type(config).__name__}")
    found = _targets(model.family, owners, config)
    if not found:
        raise InputError(f"no linear of {model.family.name} matches the LoRA targets "
                         f"{config.targets or NAMING[model.family].decoder}")
    return _wrap(model, found, config)


def lora_parameters(model: QwenAudio) -> dict[str, nn.Parameter]:
    """The LoRA parameters of a model `apply_lora` changed, by peft name."""
    params = {}
    for owner, root in _owners(model).items():
        for path, module in root.named_modules():
            if isinstance(module, LoraLinear):
                for part in ("lora_A", "lora_B"):
                    params[f"{peft_name(model.family, owner, path)}.{part}.weight"] = getattr(module, part).weight
    return params


def save_adapter(model: QwenAudio, directory: str | Path, base_model: str = "") -> Path:
    """The adapter in peft's format (built aside and renamed): adapter_model.safetensors + adapter_config.json.
    Weights that are not finite are refused: they would turn every reply into NaN."""
    _owners(model)
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig):
        raise InputError("the model has no LoRA adapter to save: apply_lora or load_adapter first")
    if not isinstance(directory, (str, Path)) or not isinstance(base_model, str):
        raise InputError(f"save_adapter needs a directory path and a base model name, got {directory!r} and "
                         f"{base_model!r}")
    tensors = {name: p.detach().contiguous() for name, p in lora_parameters(model).items()}
    bad = next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad:
        raise InputError(f"{bad} holds values that are not finite: refusing to write an adapter that outputs NaN")
    targets = _target_modules(model, config)
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                   "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "use_rslora": config.rslora, "target_modules": targets, "bias": "none",
                   "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
                   "init_lora_weights": True}
    with building(directory, replace=Path(directory).exists()) as partial:
        with writing(partial / WEIGHTS_FILE) as path:  # synced, the usual permissions
            save_file(tensors, str(path), metadata={"format": "pt"})
        write_text(partial / CONFIG_FILE, json.dumps(peft_config, indent=2) + "\n")
    return Path(directory)


def _target_modules(model: QwenAudio, config: LoraConfig) -> list[str] | str:
    """adapter_config.json's `target_modules`: the target names, which peft matches as the last parts of module
    names; where a family's names are ambiguous (`Naming.by_tensors`), a regular expression peft matches against
    whole module names, naming exactly the kinds of module adapted here (transformers' names, any layer)."""
    naming = NAMING[model.family]
    if not naming.by_tensors:
        return list(config.targets or naming.decoder) + (list(naming.encoder) if config.encoder else [])
    modules = {re.sub(r"\.\d+\.", ".N.", name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0])
               for name in lora_parameters(model)}
    return "|".join(re.escape(m).replace(r"\.N\.", r"\.\d+\.") for m in sorted(modules))


def read_adapter(directory: str | Path) -> Adapter:
    """Read and check a peft LoRA adapter directory (ours or peft's) without a model: a missing, truncated or
    corrupt file, a config peft would not write and weights that are not finite are CheckpointErrors naming the
    file, found before any model is loaded."""
    if isinstance(directory, Adapter):
        return directory
    if not isinstance(directory, (str, Path)) or not str(directory):
        raise InputError(f"an adapter is a directory path, got {directory!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no adapter directory there (a LoRA adapter is a directory holding "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: not a LoRA adapter: {name} is missing (a LoRA adapter holds "
                                  f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config = _read_config(directory / CONFIG_FILE)
    file = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError, plus OSError for unreadable files
        raise CheckpointError(f"{file}: cannot read the adapter's weights ({e}); the file is truncated or "
                              "corrupt") from e
    # peft may keep the adapter name; transformers 4's names are read as transformers 5's (`Naming.renamed`)
    names = {_current(name.replace(".default", "")): t for name, t in tensors.items()}
    for name, tensor in names.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: {name} holds values that are not finite floats ({tensor.dtype})")
    return Adapter(directory, config, {name: t.float() for name, t in names.items()})


def _current(name: str) -> str:
    """An adapter tensor's peft name as peft writes it now: one keyed by a checkpoint's names (peft over
    transformers 4) gets transformers 5's module names. No family's checkpoint prefix is another's module prefix, so
    every family's renaming can be tried."""
    module = name.removeprefix(PEFT_PREFIX)
    for naming in NAMING.values():
        module = _renamed(module, naming.renamed)
    return PEFT_PREFIX + module if name.startswith(PEFT_PREFIX) else name


def _read_config(file: Path) -> LoraConfig:
    """The LoraConfig of adapter_config.json; only what peft writes for a LoRA adapter without extras is taken."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON (cut short)
        raise CheckpointError(f"{file}: cannot read the adapter config ({type(e).__name__}: {e}); the file is "
                              "truncated or corrupt") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a peft adapter config (a JSON object)")
    if raw.get("peft_type") != "LORA" or raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise CheckpointError(f"{file}: only LoRA adapters without bias or extra saved modules are supported, got "
                              f"peft_type {raw.get('peft_type')!r}, bias {raw.get('bias')!r}, "
                              f"modules_to_save {raw.get('modules_to_save')!r}")
    extras = [key for key in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern") if raw.get(key)]
    if extras:  # each changes what a layer computes: read as plain LoRA, the logits would be silently wrong
        raise CheckpointError(f"{file}: only plain LoRA is supported (one rank and alpha for every layer), got "
                              + ", ".join(f"{key} {raw[key]!r}" for key in extras))
    targets = raw.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{file}: target_modules must be a list of module names, got {targets!r}")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if key not in raw or isinstance(raw[key], bool) or not isinstance(raw[key], kind):
            raise CheckpointError(f"{file}: {key} must be a number, got {raw.get(key, 'nothing')!r}")
    if not math.isfinite(raw["lora_alpha"]):
        raise CheckpointError(f"{file}: lora_alpha must be finite, got {raw['lora_alpha']!r}")
    try:
        return LoraConfig(rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          rslora=bool(raw.get("use_rslora", False)),
                          targets=tuple(t for t in targets if t not in ENCODER_TARGETS),
                          encoder=any(t in ENCODER_TARGETS for t in targets))
    except (QwenAudioError, TypeError) as e:  # a field LoraConfig refuses
        raise CheckpointError(f"{file}: {e}") from None


def _fit(family: Family, owners: dict[str, nn.Module], adapter: Adapter) -> list[tuple[str, str]]:
    """(owner, module path) of each linear `adapter` adapts in `owners` (the modules of a `family` model): those
    its targets name, or, for a family whose target names are ambiguous, those its tensors name. Every tensor must
    find its place, with its shape, and every place its tensor."""
    _check_family(family, adapter)
    if NAMING[family].by_tensors:
        wanted = {name.rsplit(".lora_", 1)[0] for name in adapter.tensors}
        found = [(owner, path) for owner, root in owners.items() for path, module in root.named_modules()
                 if isinstance(module, LINEARS) and peft_name(family, owner, path) in wanted]
    else:
        found = _targets(family, owners, adapter.config)
    _check_fit(adapter, _expected(family, owners, found, adapter.config.rank))
    if not found:
        raise CheckpointError(f"{adapter.directory}: the adapter adapts no linear of this {family.name} model")
    return found


def _check_family(family: Family, adapter: Adapter) -> None:
    """One error naming both families when the adapter's tensors name another family's modules."""
    if all(_names_module_of(family, name) for name in adapter.tensors):
        return
    other = next((f for f in FAMILIES if f is not family and adapter.tensors and all(
        _names_module_of(f, name) for name in adapter.tensors)), None)
    if other is not None:
        raise CheckpointError(f"{adapter.directory}: this is a {other.name} adapter (its tensors name "
                              f"{next(iter(adapter.tensors))}, …); the model is {family.name}: an adapter applies "
                              "only to the family it was trained on")


def _names_module_of(family: Family, name: str) -> bool:
    """Whether the peft tensor `name` names a module of `family`'s checkpoint."""
    if not name.startswith(PEFT_PREFIX):
        return False
    module = _renamed(name.removeprefix(PEFT_PREFIX), tuple((new, old) for old, new in NAMING[family].renamed))
    try:
        family.module_path(module)
    except CheckpointError:
        return False
    return True


def _check_fit(adapter: Adapter, expected: dict[str, Shape]) -> None:
    """Every tensor of the adapter must find its place, with its shape, and every place its tensor."""
    missing = sorted(set(expected) - set(adapter.tensors))
    unknown = sorted(set(adapter.tensors) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{adapter.directory}: the adapter does not fit this model: missing {missing[:3]}, "
                              f"unknown {unknown[:3]} ({len(missing)} and {len(unknown)} in all)")
    for name, shape in expected.items():
        if tuple(adapter.tensors[name].shape) != shape:
            raise CheckpointError(f"{adapter.directory}: {name} has shape {tuple(adapter.tensors[name].shape)}, "
                                  f"expected {shape}")


def load_adapter(model: QwenAudio, directory: str | Path | Adapter) -> QwenAudio:
    """Apply a peft LoRA adapter (a directory, ours or peft's, or one `read_adapter` read) to `model`, unmerged;
    every tensor must find its place (checked before the model is changed)."""
    owners = _owners(model)
    adapter = read_adapter(directory)
    params = _wrap(model, _fit(model.family, owners, adapter), adapter.config)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(adapter.tensors[name])
    return model


def merge_lora(model: QwenAudio, adapter: str | Path | Adapter | None = None) -> QwenAudio:
    """Fold every LoRA update into its base weight and put the plain linears back, so the model is an ordinary one
    again: W + B A · scale computed in fp32, rounded once to W's dtype. With `adapter`, that adapter is applied
    first (`load_adapter`). Float bases only: an int8 weight cannot take the update exactly."""
    owners = _owners(model)
    if adapter is not None:
        load_adapter(model, adapter)
    for root in owners.values():
        for path, module in list(root.named_modules()):
            if isinstance(module, LoraLinear):
                if not isinstance(module.base, nn.Linear):
                    bits = "int4" if isinstance(module.base, Int4Linear) else "int8"
                    raise InputError(f"merging into {bits} weights would round the update away: load the base in "
                                     "float to merge")
                with torch.no_grad():  # a new tensor: the weight may be a view of the checkpoint's memory map
                    weight = module.base.weight
                    module.base.weight = nn.Parameter((weight.float() + module.delta()).to(weight.dtype),
                                                      requires_grad=weight.requires_grad)
                parent_path, _, name = path.rpartition(".")
                setattr(root.get_submodule(parent_path), name, module.base)
    return model


def merge_checkpoint(source: str | Path, adapter: str | Path | Adapter, target: str | Path, *,
                     dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint directory `source` with `adapter` folded in to `target` (`qwenaudio merge`): each
    adapted weight W + B A · scale computed in fp32 and rounded once to `dtype` (default: the dtype `source`
    stores, bf16 for the official weights; "float32" keeps the merge exact), the other tensors as stored (in
    `dtype` when given), the other files copied.

    Tensor by tensor from the memory-mapped source, a shard in memory at a time: no model is built. The adapter is
    read and checked against the model, and `target` is checked as `quantize` checks it (never an input, new or
    empty, `overwrite` replaces a checkpoint) and made beside it, before the base is read.
    A weight that is not finite in `dtype` (an update too large, or a dtype too narrow) is refused (InputError)
    and nothing is left at `target`."""
    if not all(isinstance(p, (str, Path)) for p in (source, target)) or not isinstance(overwrite, bool):
        raise InputError(f"merge_checkpoint needs the source and target directories as paths and overwrite as "
                         f"True or False, got {source!r}, {target!r}, {overwrite!r}")
    dtype = as_dtype(dtype)
    source, target = Path(source), Path(target)
    adapter = read_adapter(adapter)
    with writing_checkpoint(target, source, reads=[adapter.directory], overwrite=overwrite) as partial:
        config = read_config(source)
        family = family_of(config)
        if config.quantization:
            raise InputError(f"{source} is quantized ({config.quantization}): its weights would round the update "
                             "away; merge into its float original, then quantize the merged checkpoint (qwenaudio "
                             "quantize)")
        with torch.device("meta"):
            owners = {"encoder": family.encoder(config), "decoder": family.decoder(config)}
        found = _fit(family, owners, adapter)
        state = load_checkpoint(source, config)
        layout = {n: (tuple(t.shape), dtype or t.dtype) for n, t in state.items()}
        updates = {family.official_name(owner, f"{path}.weight"): peft_name(family, owner, path)
                   for owner, path in found}  # weight -> its LoRA tensors' prefix

        def make(name: str) -> Tensor:
            tensor = state[name]
            exact = tensor
            if name in updates:
                a, b = (adapter.tensors[f"{updates[name]}.lora_{part}.weight"] for part in "AB")
                exact = tensor.float() + (b @ a) * adapter.config.scale
            stored = exact.to(dtype or tensor.dtype)
            if not torch.isfinite(stored).all():
                raise InputError(f"{name}: the weight to write is not finite in {stored.dtype}: " + (
                    f"{source} holds values that are not finite" if not torch.isfinite(tensor).all() else
                    f"the update of {adapter.directory} is too large to be a weight" if not torch.isfinite(exact).all()
                    else f"{stored.dtype} cannot hold it; --dtype float32 can"))
            return stored

        write_shards(layout, make, partial)
    return target

"""LoRA adapters: a small trainable low-rank update beside each chosen linear of a frozen model, saved in peft's format.

A LoRA linear computes `base(x) + B(A(dropout(x))) · scale`, with A [r, in] and B [out, r] in fp32 (whatever the
base's dtype), scale = alpha / r (or alpha / sqrt(r) with rsLoRA). B starts at zero, so an adapter fresh from
`apply_lora` changes nothing; the base layer stays frozen and may be int8 (`Int8Linear`), which is how the full
model can be adapted on a 24 GB machine.

Adapters are saved as peft saves them for the official model: `adapter_model.safetensors` with keys
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, … (the official module names) and
`adapter_config.json` with peft's fields, so an adapter trained here loads with peft on the official model, and
one trained with peft loads here (`load_adapter`, or `qwenaudio.load(..., adapter=DIR)`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core.checkpoint import PREFIXES
from .core.errors import InputError
from .core.files import building, write_text, writing
from .core.model import QwenAudio

DECODER_TARGETS = ("c_attn", "c_proj", "w1", "w2")  # the attention and MLP linears of every decoder block
ENCODER_TARGETS = ("query", "key", "value", "out", "mlp.0", "mlp.2")  # Whisper's block linears
PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped (official) model


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilized LoRA)
    targets: tuple[str, ...] = DECODER_TARGETS  # module names (last parts of the path), as peft's target_modules
    encoder: bool = False  # also the audio encoder's linears (ENCODER_TARGETS)

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):  # a list is welcome; one bare string is not a list of names
            object.__setattr__(self, "targets", tuple(self.targets))
        for ok, message in _rules(self):
            if not ok:
                raise InputError(message)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


MAX_RANK = 4096  # Qwen-Audio's hidden size: no rank past a layer's narrower side adds anything


def _rules(c: LoraConfig) -> list[tuple[bool, str]]:
    """(holds, message) for each field, checked when the config is made: an alpha of 0 would train nothing and a
    negative one train backwards, silently."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    return [
        (isinstance(c.rank, int) and not isinstance(c.rank, bool) and 1 <= c.rank <= MAX_RANK,
         f"LoRA rank must be a positive integer (at most {MAX_RANK}), got {c.rank!r}"),
        (number(c.alpha) and c.alpha > 0, f"LoRA alpha must be a finite number > 0, got {c.alpha!r}"),
        (number(c.dropout) and 0 <= c.dropout < 1, f"LoRA dropout must be in [0, 1), got {c.dropout!r}"),
        (isinstance(c.rslora, bool), f"rslora must be True or False, got {c.rslora!r}"),
        (isinstance(c.encoder, bool), f"encoder must be True or False, got {c.encoder!r}"),
        (isinstance(c.targets, tuple) and all(isinstance(t, str) and t.strip() for t in c.targets),
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


def _targets(model: QwenAudio, config: LoraConfig) -> list[tuple[str, str]]:
    """(owner, module path) of every linear the config adapts, in module order."""
    chosen = [("decoder", name) for name, _ in model.decoder.named_modules()
              if name.startswith("h.") and any(name == t or name.endswith(f".{t}") for t in config.targets)]
    if config.encoder:
        chosen += [("encoder", name) for name, _ in model.encoder.named_modules()
                   if name.startswith("blocks.") and any(name.endswith(f".{t}") for t in ENCODER_TARGETS)]
    return chosen


def apply_lora(model: QwenAudio, config: LoraConfig) -> dict[str, nn.Parameter]:
    """Wrap the targeted linears of `model` in LoraLinear (in place), freeze everything else, and return the LoRA
    parameters by their peft names (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, …)."""
    for param in model.parameters():
        param.requires_grad_(False)
    found = _targets(model, config)
    if not found:
        raise InputError(f"no linear matches the LoRA targets {config.targets}")
    for owner, path in found:
        parent_path, _, name = path.rpartition(".")
        parent = getattr(model, owner).get_submodule(parent_path)
        setattr(parent, name, LoraLinear(getattr(parent, name), config))
    model.lora_config = config
    return lora_parameters(model)


def lora_parameters(model: QwenAudio) -> dict[str, nn.Parameter]:
    """The LoRA parameters of a model `apply_lora` changed, by peft name."""
    params = {}
    for owner in ("encoder", "decoder"):
        for path, module in getattr(model, owner).named_modules():
            if isinstance(module, LoraLinear):
                for part in ("lora_A", "lora_B"):
                    params[f"{PEFT_PREFIX}{PREFIXES[owner]}{path}.{part}.weight"] = getattr(module, part).weight
    return params


def save_adapter(model: QwenAudio, directory: str | Path, base_model: str = "") -> Path:
    """The adapter in peft's format (built aside and renamed): adapter_model.safetensors + adapter_config.json."""
    config: LoraConfig = model.lora_config
    targets = list(config.targets) + (list(ENCODER_TARGETS) if config.encoder else [])
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                   "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                   "use_rslora": config.rslora, "target_modules": targets, "bias": "none",
                   "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
                   "init_lora_weights": True}
    with building(directory, replace=Path(directory).exists()) as partial:
        tensors = {name: p.detach().contiguous() for name, p in lora_parameters(model).items()}
        with writing(partial / "adapter_model.safetensors") as path:  # synced, the usual permissions
            save_file(tensors, str(path), metadata={"format": "pt"})
        write_text(partial / "adapter_config.json", json.dumps(peft_config, indent=2) + "\n")
    return Path(directory)


def load_adapter(model: QwenAudio, directory: str | Path) -> QwenAudio:
    """Apply a peft LoRA adapter (ours or peft's) to `model`, unmerged; every tensor must find its place."""
    directory = Path(directory)
    try:
        raw = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise InputError(f"{directory}: not a LoRA adapter (adapter_config.json and adapter_model.safetensors): {e}")
    if raw.get("peft_type") != "LORA" or raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise InputError(f"{directory}: only LoRA adapters without bias or extra saved modules are supported, got "
                         f"peft_type {raw.get('peft_type')!r}, bias {raw.get('bias')!r}, "
                         f"modules_to_save {raw.get('modules_to_save')!r}")
    targets = raw.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    config = LoraConfig(rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                        rslora=raw.get("use_rslora", False),
                        targets=tuple(t for t in targets if t not in ENCODER_TARGETS),
                        encoder=any(t in ENCODER_TARGETS for t in targets))
    params = apply_lora(model, config)
    names = {name.replace(".default", ""): t for name, t in tensors.items()}  # peft may keep the adapter name
    missing, unknown = sorted(set(params) - set(names)), sorted(set(names) - set(params))
    if missing or unknown:
        raise InputError(f"{directory}: the adapter does not fit this model: missing {missing[:3]}, unknown "
                         f"{unknown[:3]} ({len(missing)} and {len(unknown)} in all)")
    with torch.no_grad():
        for name, param in params.items():
            if names[name].shape != param.shape:
                raise InputError(f"{directory}: {name} has shape {tuple(names[name].shape)}, expected "
                                 f"{tuple(param.shape)}")
            param.copy_(names[name])
    return model


def merge_lora(model: QwenAudio) -> QwenAudio:
    """Fold every LoRA update into its base weight (W + B A · scale) and put the plain linears back, so the model
    is an ordinary one again (float bases only: an int8 weight cannot take the update exactly)."""
    for owner in ("encoder", "decoder"):
        root = getattr(model, owner)
        for path, module in list(root.named_modules()):
            if isinstance(module, LoraLinear):
                if not isinstance(module.base, nn.Linear):
                    raise InputError("merging into int8 weights would round the update away: load the base in "
                                     "float to merge")
                with torch.no_grad():
                    module.base.weight += module.delta().to(module.base.weight.dtype)
                parent_path, _, name = path.rpartition(".")
                setattr(root.get_submodule(parent_path), name, module.base)
    return model

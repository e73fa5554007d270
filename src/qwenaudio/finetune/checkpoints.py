"""A run's checkpoint (the trained parameters, the optimizer, the schedule, torch's random state, the losses and
what the run depends on) in `output_dir/checkpoint`, saved aside and swapped in whole, checked and restored on
resume; and what the run exports at the end: the fine-tuned model in the official layout, or its LoRA adapter."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import lora, parallel
from ..core.checkpoint import save_checkpoint, writing_checkpoint
from ..core.checks import expect
from ..core.errors import InputError, OutputError, TrainingError
from ..core.int8 import Int8Linear
from ..core.files import building, write_text, writing
from ..core.model import QwenAudio
from ..runner import Processes
from .config import RESUMABLE_CHANGES, TrainConfig, schedule
from .data import Example, as_examples


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run in `output_dir` keeps its checkpoint (beside metrics.jsonl and tensorboard/)."""
    return Path(output_dir) / "checkpoint"


def steps_done(output_dir: str | Path) -> int:
    """The steps the checkpoint of the run in `output_dir` holds (`check_resume` reads it whole), 0 when it has
    none: where a resumed run starts."""
    try:
        saved = (checkpoint_dir(output_dir) / "progress.json").read_text()
    except FileNotFoundError:
        return 0
    return len(json.loads(saved)["losses"])


def run_inputs(examples: Sequence[Example], eval_examples: Sequence[Example] = (), **more: str) -> dict[str, str]:
    """What a run's result depends on besides its settings, as a checkpoint records it: a digest of the training
    and the held-out examples (their text and clip paths) and `more` (the command adds the base model's
    `files.fingerprint` and its dtype). A resume with other inputs is refused (`check_resume`)."""
    def digest(chosen: Sequence[Example]) -> str:
        rows = [[e.prompt, e.response, e.system, e.turns, [str(p) for p in e.audio]] for e in chosen]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    return {"examples": digest(as_examples(examples, "examples")),
            "eval_examples": digest(as_examples(eval_examples, "eval_examples", empty=True)), **more}


# What each recorded input is, for the message that refuses a resume.
INPUT_NAMES = {"examples": "the training examples (--data, or its clips' paths)",
               "eval_examples": "the held-out examples (--eval-data)",
               "model": "the base model's files (--model)", "weights": "the model's dtype (--dtype, --int8)"}


def check_resume(directory: str | Path, config: TrainConfig, inputs: Mapping[str, str]) -> dict[str, Any]:
    """The progress record of the checkpoint in `directory` (losses, settings, inputs), if resuming it with
    `config` and `inputs` continues the same run; else InputError naming each difference. Inputs the checkpoint
    did not record (one written before they were) are not compared."""
    expect(directory, (str, Path), "directory", "a checkpoint directory")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    expect(inputs, Mapping, "inputs", "a mapping of input names to digests (run_inputs)")
    directory = Path(directory)
    try:
        saved = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"nothing to resume: {directory} holds no checkpoint") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{directory}/progress.json cannot be read ({e}): the checkpoint is damaged") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or not isinstance(
            saved.get("losses"), list):
        raise InputError(f"{directory}/progress.json is not a checkpoint's progress record: the checkpoint is damaged")
    now = json.loads(json.dumps(asdict(config)))  # as saved: tuples become lists
    if isinstance(now.get("lora"), dict) and now["lora"].get("targets") is None and isinstance(
            saved["config"].get("lora"), dict) and saved["config"]["lora"].get("targets") == list(lora.DECODER_TARGETS):
        now["lora"]["targets"] = list(lora.DECODER_TARGETS)  # a run saved when that was the default for every model
    changed = [k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    if changed:
        raise InputError(f"{directory} was trained with other settings ({', '.join(changed)}); resume with the "
                         "same ones, or start in another directory")
    recorded = saved.get("inputs", {})
    other = [INPUT_NAMES.get(k, k) for k, v in inputs.items() if k in recorded and recorded[k] != v]
    if other:
        raise InputError(f"{directory} was trained on other inputs: {'; '.join(other)} differ from what the run "
                         "began with; resume with the same ones, or start in another --output-dir")
    return saved


def weights_of(model: QwenAudio) -> str:
    """The model's floating dtype, and whether its linears are int8: a resume on other weights learns otherwise."""
    dtype = next(model.decoder.parameters()).dtype
    return str(dtype).removeprefix("torch.") + (", int8 linears" if any(
        isinstance(m, Int8Linear) for m in model.decoder.modules()) else "")


def rng_state(model: QwenAudio) -> dict[str, Tensor]:
    """torch's random state (the CPU generator's and, on a GPU, the device's: dropout draws there)."""
    state = {"rng": torch.get_rng_state()}
    if model.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(model.device)
    return state


@contextmanager
def output_errors(what: Path) -> Iterator[None]:
    """A write that fails (a full disk: OSError, torch.save's RuntimeError "unexpected pos", safetensors'
    SafetensorError; a read-only directory) as one OutputError naming `what`."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if isinstance(e, OutputError):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else e
        raise OutputError(f"{what}: could not be written ({reason}); free space or choose another --output-dir. "
                          "Anything written before (the previous checkpoint) is kept") from None


def _finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """TrainingError naming the first tensor that holds NaN or infinity: such weights are never written."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"{name} holds values that are not finite: {what} is not written (a learning rate "
                                "too high for these data?); the last checkpoint is kept")


def save_run(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, losses: list[float],
          config: TrainConfig, rng: dict[str, Tensor], inputs: Mapping[str, str], *, write: bool) -> None:
    """The run so far, built aside and swapped in whole: a crash, a full disk or Ctrl-C while saving leaves the
    previous checkpoint. Every file is written by `files.writing` (synced, the usual permissions). Sharded tensors
    are gathered whole (every process calls this), so a run resumes on any number of processes; only `write`
    writes. `rng` is torch's random state at the start of the next step."""
    tensors = {name: parallel.full(p.detach()).contiguous() for name, p in params.items()}
    state = optimizer.state_dict()
    state["state"] = {i: {k: parallel.full(v) for k, v in s.items()} for i, s in state["state"].items()}
    _finite(tensors, f"the checkpoint of step {len(losses)}")
    if not write:
        return
    with output_errors(directory), building(directory, replace=True) as partial:
        with writing(partial / "trainable.safetensors") as path:
            save_file(tensors, str(path))
        with writing(partial / "state.pt") as path:
            torch.save({"optimizer": state, "scheduler": scheduler.state_dict(), **rng}, path)
        write_text(partial / "progress.json", json.dumps({"losses": losses, "config": asdict(config),
                                                          "inputs": dict(inputs)}, indent=1))


def restore_run(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, config: TrainConfig,
             losses: list[float]) -> list[float]:
    """Load the checkpoint `check_resume` accepted (its `losses`) into the parameters, optimizer, schedule and
    torch's random state."""
    try:
        tensors = load_file(str(directory / "trainable.safetensors"))
        state = torch.load(directory / "state.pt", weights_only=True)
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise InputError(f"{directory}: the checkpoint cannot be read ({e}); start in another --output-dir") from None
    if set(tensors) != set(params):
        raise InputError(f"{directory} holds other parameters than part {config.part!r} trains")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(parallel.shard_like(param, tensors[name].to(param.dtype)))
    for i, param in enumerate(params.values()):  # whole moments, cut into this process's shards
        moments = state["optimizer"]["state"].get(i, {})
        for key, value in moments.items():
            if value.shape == param.shape:
                moments[key] = parallel.shard_like(param, value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"], next(iter(params.values())).device)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # `steps` may have grown: today's schedule
        group["lr"] = base * schedule(len(losses), config)
    return losses


def save_model(model: QwenAudio, source: str | Path, target: str | Path) -> Path:
    """The fine-tuned model as a checkpoint in the official layout at `target` (a new or empty directory, never
    `source`, built aside and renamed: `checkpoint.writing_checkpoint`): every tensor under its official name, and
    the other files of `source` (config, vocabulary, generation config) copied, so `qwenaudio.load(target)` and the
    official code read it like the original.
    Under torchrun every process calls it (a sharded model's tensors are gathered whole) and process 0 writes.
    Weights that are not finite are refused (TrainingError), a failed write is OutputError."""
    expect(model, QwenAudio, "model", "a QwenAudio model")
    expect(source, (str, Path), "source", "the base checkpoint's directory")
    expect(target, (str, Path), "target", "a directory path")
    source, target = Path(source), Path(target)
    state = {model.family.official_name(owner, name): parallel.full(tensor) for owner in ("encoder", "decoder")
             for name, tensor in getattr(model, owner).state_dict().items()}
    _finite(state, f"the model {target}")
    if Processes.current().rank != 0:
        return target
    with output_errors(target), writing_checkpoint(target, source) as partial:
        save_checkpoint(state, partial)
    return target


def export(model: QwenAudio, config: TrainConfig, source: str | Path, target: str | Path, *,
           base_model: str = "") -> Path:
    """What a run trained with `config`, at `target`: the whole model in the official layout (`save_model`, from
    the base checkpoint `source`) or, with `config.lora`, the adapter alone in peft's format
    (`lora.save_adapter`, naming `base_model`). Under torchrun every process calls it (a sharded model is gathered)
    and process 0 writes. A failed write is OutputError; weights that are not finite are never written."""
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    if not config.lora:
        return save_model(model, source, target)
    if Processes.current().rank == 0:
        with output_errors(Path(target)):
            return lora.save_adapter(model, target, base_model=base_model)
    return Path(target)

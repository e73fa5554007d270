"""Activation traces: record what every stage of one run computes, and compare two recordings layer by layer.

A trace is one safetensors file. Its tensors are named by stage (`mel.0`, `encoder.conv1`, `encoder.block7`,
`encoder.span0`, `decoder.embeds`, `decoder.block31`, `decoder.ln_f`, `logits`), in fp32, and its metadata holds a
JSON manifest: the names with shapes, what produced the trace (qwenaudio or the official code), the model, the
prompt and the audio files. `tools/record_official.py` writes the same names from the official code, so
`qwenaudio verify ours.safetensors official.safetensors` can say where the two first part. Qwen2-Audio's stages
are named alike, block j being its layer j, with its own names where its modules differ (`encoder.layer_norm`,
`encoder.projector`, `decoder.norm`; `STAGE_MODULES`); `tools/record_transformers.py` writes them from
transformers' `Qwen2AudioForConditionalGeneration`, which runs every clip as 30 s: the conv stem's and blocks'
positions are kept up to those the clips of the batch fill (`POSITIONS_PER_BLOCK_POSITION`). With the model at hand,
`isolate` also runs each of our layers on the reference's own input to it, so that a layer's error shows there
and does not compound, or hide under bf16 rounding of the whole stream.

Full-size hidden states are large (32 encoder blocks × 1500 × 1280 floats for a 30 s clip), so `project=k`
multiplies the last dimension of every tensor but the waveform and mel by a fixed random k-column matrix when it is
wider than k: the features of [.., T, C] tensors, the time axis of the conv stem's and pooler's [B, C, T] outputs.
The matrix comes from numpy's PCG64 with `PROJECTION_SEED` (scaled by 1/√k), so both sides compute it without
torch, and a random projection keeps relative errors and cosines close to those of the full tensors.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .core.audio import load_audio, log_mel_spectrogram
from .core.checks import expect
from .core.errors import AudioTagError, InputError, OutputError
from .core.families import FAMILIES, QWEN2_AUDIO, QWEN_AUDIO, Family
from .core.files import writing
from .core.model import QwenAudio, expect_model
from .core.tokenizer import audio_regions

FORMAT = "qwenaudio-trace/1"
PROJECTION_SEED = 20231115

# Where each family's stages are traced, besides the blocks (`encoder.blocks`, `decoder.blocks`: the input of the
# first is `encoder.blocks_in` / `decoder.embeds`, each one's output `encoder.block{j}` / `decoder.block{i}`):
# (stage, module path in the model), the module's output being the stage.
STAGE_MODULES = {
    QWEN_AUDIO: (("encoder.conv1", "encoder.conv1"), ("encoder.conv2", "encoder.conv2"),
                 ("encoder.pooled", "encoder.avg_pooler"), ("encoder.ln_post", "encoder.ln_post"),
                 ("encoder.proj", "encoder.proj"), ("decoder.ln_f", "decoder.ln_f")),
    QWEN2_AUDIO: (("encoder.conv1", "encoder.audio_tower.conv1"), ("encoder.conv2", "encoder.audio_tower.conv2"),
                  ("encoder.pooled", "encoder.audio_tower.avg_pooler"),
                  ("encoder.layer_norm", "encoder.audio_tower.layer_norm"),
                  ("encoder.projector", "encoder.multi_modal_projector.linear"),
                  ("decoder.norm", "decoder.model.norm")),
}
# The conv stem's outputs [B, C, T] are kept up to the positions that feed the blocks' T (the blocks' input length):
# 2T of conv1, T of conv2. Qwen-Audio computes just those; Qwen2-Audio's stem here computes a frame or two more,
# and transformers' all 3,000 and 1,500, whatever the clips' lengths.
POSITIONS_PER_BLOCK_POSITION = {"encoder.conv1": 2, "encoder.conv2": 1}
# What records each family's reference trace, writing every stage (see tools/README.md).
RECORDERS = {QWEN_AUDIO: "tools/record_official.py", QWEN2_AUDIO: "tools/record_transformers.py"}


def projection(width: int, k: int) -> Tensor:
    """The fixed [width, k] projection both sides use: PCG64(PROJECTION_SEED) normals / √k, in fp32."""
    rng = np.random.Generator(np.random.PCG64(PROJECTION_SEED + width))
    return torch.from_numpy(rng.standard_normal((width, k), dtype=np.float32) / np.float32(math.sqrt(k)))


def reduce(x: Tensor, project: int | None) -> Tensor:
    """fp32 copy on the CPU, its last dimension projected to `project` columns when it is wider. Always a copy: a
    stage may be a view of another (Qwen2-Audio's spans are rows of the projector's output), which safetensors
    refuses to save."""
    x = x.detach().to("cpu", torch.float32, copy=True)
    if project is not None and x.shape[-1] > project:
        x = x @ projection(x.shape[-1], project)
    return x.contiguous()


@dataclass
class Trace:
    tensors: dict[str, Tensor]
    manifest: dict

    def save(self, path: str | Path) -> None:
        """Write the trace under a temporary name and rename it into place: a full disk or a read-only directory
        raises OutputError and leaves no partial file."""
        manifest = {**self.manifest, "tensors": {n: list(t.shape) for n, t in self.tensors.items()}}
        try:
            with writing(path) as tmp:
                save_file(self.tensors, str(tmp), metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise OutputError(f"{path}: could not write the trace ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace, checking that it is one and that its manifest lists exactly its tensors."""
        expect(path, (str, Path), "path", "a trace file's path")
        if Path(path).exists() and not Path(path).is_file():  # opening a pipe waits for a writer, past SIGTERM
            raise InputError(f"{path}: not a regular file (a directory, a pipe or a device): give a trace file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata, tensors = f.metadata() or {}, {n: f.get_tensor(n) for n in f.keys()}
        except Exception as e:  # safetensors' own error type, OSError, …
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        if metadata.get("format") != FORMAT or "manifest" not in metadata:
            raise InputError(f"{path}: not a qwenaudio trace (metadata format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); record one with `qwenaudio trace`, tools/record_official.py or "
                             "tools/record_transformers.py")
        manifest = json.loads(metadata["manifest"])
        listed = {n: tuple(s) for n, s in manifest.get("tensors", {}).items()}
        if listed != {n: tuple(t.shape) for n, t in tensors.items()}:
            raise InputError(f"{path}: the manifest does not match the tensors in the file")
        return cls(tensors, manifest)


def is_trace(path: str | Path) -> bool:
    """Whether `path` is a file in the trace format (its header alone is read), so that `--out` replaces an older
    trace but nothing else."""
    if not Path(path).is_file():  # a pipe would be waited on
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all
        return False


_TAG_PROBLEMS = {
    "nested": "the prompt opens an <audio> region inside another: close it with </audio> first",
    "unopened": "the prompt has a </audio> without its <audio>",
    "unclosed": "the prompt has an unclosed <audio> tag: end the clip's path with </audio>",
}


def prompt_clips(prompt: str) -> list[str]:
    """The clips a prompt names, read from its text alone (`tokenizer.audio_regions`), so a command can check them
    before the model loads; a prompt that is empty or only whitespace, a malformed tag or a region without a path is
    refused, whichever comes first."""
    expect(prompt, str, "prompt", "text with <audio>PATH</audio> regions")
    if not prompt.strip():
        raise InputError(f"the prompt is {'empty' if not prompt else 'only whitespace'}: give text, "
                         "<audio>PATH</audio> regions and task tags to trace")
    try:
        paths, problem = audio_regions(unicodedata.normalize("NFC", prompt)), None
    except AudioTagError as e:
        paths, problem = e.regions, e.problem
    if any(not path.strip() for path in paths):
        raise InputError("the prompt has an <audio></audio> region without a path: <audio>PATH</audio>")
    if problem is not None:
        raise InputError(_TAG_PROBLEMS[problem])
    return paths


def record(model: QwenAudio, prompt: str, *, clips: Sequence[str] | None = None, project: int | None = None,
           logits: str = "last") -> Trace:
    """Run `prompt` once (a full-sequence prefill) and trace every stage. Clips are read relative to the working
    directory: a Qwen-Audio prompt names them in its `<audio>PATH</audio>` regions, as the official tokenizer reads
    them (`clips`, if given, must be those paths); a Qwen2-Audio prompt holds `<|audio_bos|><|AUDIO|><|audio_eos|>`
    once per clip, and `clips` are their paths, in order, as transformers' processor takes them apart from the text.

    `logits` "last" keeps the last position's logits in full; "all" keeps every position (projected over the
    vocabulary when `project` is set).
    """
    expect_model(model)
    named = prompt_clips(prompt)  # the clear errors for an empty prompt and malformed tags
    if project is not None and (not isinstance(project, int) or isinstance(project, bool) or project < 1):
        raise InputError(f"project must be a positive int (columns kept) or None, got {project!r}")
    if logits not in ("last", "all"):
        raise InputError(f"logits must be 'last' or 'all', got {logits!r}")
    audio_files = _clip_files(model, prompt, named, clips)
    waves = [load_audio(p) for p in audio_files]
    tensors: dict[str, Tensor] = {}
    for k, clip in enumerate(waves):
        tensors[f"waveform.{k}"] = clip
        tensors[f"mel.{k}"] = log_mel_spectrogram(clip, model.encoder.n_mels)
    ids = model.tokenizer.encode(prompt, audio_spans=[model.encoder.span_length(len(c)) for c in waves] or None)

    def keep(name: str) -> Callable:
        def hook(module, args, out=None):  # the conv stem's outputs whole: cut once the blocks' positions are known
            value = args[0] if out is None else out
            tensors[name] = reduce(value, None if name in POSITIONS_PER_BLOCK_POSITION else project)
        return hook

    with _hooked(model, keep, keep):
        spans = model.encode_audio(waves)
        out = model.decoder.logits(torch.tensor([ids], device=model.device), audio=spans)
    for name, per_position in POSITIONS_PER_BLOCK_POSITION.items():
        if name in tensors:
            tensors[name] = reduce(tensors[name][..., : per_position * tensors["encoder.blocks_in"].shape[1]], project)
    tensors |= {f"encoder.span{k}": reduce(s, project) for k, s in enumerate(spans)}
    tensors["logits"] = reduce(out[0, -1:], None) if logits == "last" else reduce(out[0], project)
    tensors = {n: t.float().contiguous() for n, t in tensors.items()}
    manifest = {"producer": "qwenaudio", "prompt": prompt, "audio": audio_files,
                "input_ids": ids, "project": project, "logits": logits,
                "model": {"model_type": model.family.model_type,
                          "dtype": str(model.decoder.embedding.weight.dtype).removeprefix("torch."),
                          "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers}}
    return Trace(tensors, manifest)


def _clip_files(model: QwenAudio, prompt: str, named: list[str], clips: Sequence[str] | None) -> list[str]:
    """The clips a prompt is run with, by its family's convention (`record`)."""
    if clips is not None and (not isinstance(clips, (list, tuple)) or not all(isinstance(c, str) for c in clips)):
        raise InputError(f"clips must be a list of audio file paths, got {clips!r}")
    if model.family is QWEN_AUDIO:
        paths = model.tokenizer.audio_paths(prompt)
        if clips is not None and list(clips) != paths:
            raise InputError(f"a Qwen-Audio prompt names its clips in <audio>PATH</audio> regions ({paths}); the "
                             f"clips given apart ({list(clips)}) must be none or those")
        return paths
    if named:
        raise InputError(f"the prompt names {named[0]} in an <audio> region, which Qwen2-Audio reads as text: write "
                         "<|audio_bos|><|AUDIO|><|audio_eos|> for each clip and give the clips apart (--audio PATH)")
    marked = prompt.count("<|AUDIO|>")
    if marked != len(clips or ()):
        raise InputError(f"the prompt holds {marked} <|AUDIO|> token(s) but {len(clips or ())} clip(s) were given: "
                         "one clip (--audio PATH) for each <|audio_bos|><|AUDIO|><|audio_eos|>, in order")
    return list(clips or ())


def _stage_modules(model: QwenAudio) -> list[tuple[nn.Module, str, bool]]:
    """(module, stage, whether the stage is its input) for every traced stage of `model`'s family."""
    enc, dec = model.encoder, model.decoder
    points = [(model.get_submodule(path), stage, False) for stage, path in STAGE_MODULES[model.family]]
    points += [(enc.blocks[0], "encoder.blocks_in", True), (dec.blocks[0], "decoder.embeds", True)]
    points += [(b, f"encoder.block{j}", False) for j, b in enumerate(enc.blocks)]
    points += [(b, f"decoder.block{i}", False) for i, b in enumerate(dec.blocks)]
    return points


@contextmanager
def _hooked(model: QwenAudio, pre: Callable[[str], Callable], post: Callable[[str], Callable]) -> Iterator[None]:
    """Run under no_grad with a hook on every traced stage: `pre(name)` on the modules whose input is the stage
    (the blocks' input), `post(name)` on those whose output is."""
    points = _stage_modules(model)
    hooks = [m.register_forward_pre_hook(pre(n)) if is_pre else m.register_forward_hook(post(n))
             for m, n, is_pre in points]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in hooks:
            h.remove()


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float  # max |a − b| / max |b|; isolated residual blocks: max |a − b| / max |b − b's input|
    cosine: float
    ok: bool
    rtol: float  # the tolerance this tensor was held to


# Default relative tolerance: fp32 parity, or what bf16/fp16 rounding leaves (measured on the tiny checkpoint
# against the official fp32 trace: bf16 ≤ 9.2e-3, fp16 ≤ 1.1e-3).
RTOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
# The log-mel is computed in fp32 on both sides, and fp32 FFT rounding depends on the CPU's FFT kernels: on the
# tiny test clips the exact (float64) log-mel differs from the official fp32 recording by up to 2.6e-5, and ours in
# fp32 by up to 2.6e-5 on a Xeon with AVX512-FP16 (< 1e-5 on an EPYC). So by default mel tensors are held to this
# floor, whatever the dtype.
MEL_RTOL = 1e-4


def check_tolerance(value: float | None, name: str) -> None:
    """A tolerance is None (the default by dtype) or a finite number ≥ 0: NaN would fail every tensor silently."""
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")


def default_rtol(ours: Trace, reference: Trace) -> float:
    """The loosest tolerance either trace's dtype calls for."""
    return max(RTOL.get(_dtype_of(t), 1e-5) for t in (ours, reference))


def _dtype_of(t: Trace) -> str:
    return t.manifest.get("model", {}).get("dtype", "float32")


def compare(ours: Trace, reference: Trace, *, rtol: float | None = None, atol: float = 0.0) -> list[Row]:
    """One row per tensor both traces hold, in pipeline order (`unmatched` lists the others: a reference from the
    official model's `output_hidden_states` lacks the waveform and the last block's raw output); a tensor passes
    when rel ≤ rtol or max_abs ≤ atol. `rtol` defaults to `default_rtol` (1e-5 when both traces are fp32), and to at
    least `MEL_RTOL` for the mel. Traces of different families (`check_family`), prompts or projections, with no
    tensor in common, or whose common tensors differ in shape cannot be compared (InputError)."""
    for which, t in (("ours", ours), ("reference", reference)):
        expect(t, Trace, which, "a Trace (Trace.load(path) or record(...))")
    check_tolerance(rtol, "rtol")
    check_tolerance(atol, "atol")
    given = rtol
    rtol = default_rtol(ours, reference) if rtol is None else rtol
    check_family(reference, ours)
    if ours.manifest.get("input_ids") != reference.manifest.get("input_ids"):
        raise InputError("the two traces ran different prompts (their input_ids differ)")
    if ours.manifest.get("project") != reference.manifest.get("project"):
        raise InputError(f"the traces use different projections ({ours.manifest.get('project')} vs "
                         f"{reference.manifest.get('project')}); record both with the same --project")
    common = sorted(ours.tensors.keys() & reference.tensors.keys(), key=_stage_order)
    if not common:
        raise InputError(f"the traces have no tensor in common: ours holds {name_list(ours.tensors)}; the reference "
                         f"{name_list(reference.tensors) or 'nothing'}")
    rows = []
    for name in common:
        ref = reference.tensors[name]
        if ours.tensors[name].shape != ref.shape:
            note = models_note(ours, reference)
            raise InputError(f"{name}: the reference has shape {tuple(ref.shape)}, ours "
                             f"{tuple(ours.tensors[name].shape)}" + (f"; {note}" if note else ""))
        tol = max(rtol, MEL_RTOL) if given is None and name.startswith("mel.") else rtol
        rows.append(_row(name, ours.tensors[name], ref, tol, atol))
    return rows


def trace_family(t: Trace) -> Family | None:
    """The family a trace was recorded from (its manifest's model.model_type); None for traces that do not say
    (recorded before the field, or by hand)."""
    kind = (t.manifest.get("model") or {}).get("model_type")
    return next((f for f in FAMILIES if f.model_type == kind), None)


def check_family(reference: Trace, ours: Trace | Family | None) -> None:
    """InputError when the reference comes from another family than ours (a trace, or the model to record it
    with): its prompt and stages mean other things there, so the first difference would wrongly blame the prompt.
    A trace that does not name its family passes."""
    theirs, mine = trace_family(reference), trace_family(ours) if isinstance(ours, Trace) else ours
    if theirs is None or mine is None or theirs is mine:
        return
    against = f"our {mine.name} trace" if isinstance(ours, Trace) else f"a {mine.name} model"
    raise InputError(f"a {theirs.name} reference trace against {against}: traces compare only "
                     f"within one family (record the reference with {RECORDERS[mine]}, or verify it with a "
                     f"{theirs.name} model)")


def unmatched(ours: Trace, reference: Trace) -> tuple[list[str], list[str]]:
    """(what the reference lacks, what ours lacks), each in pipeline order: the tensors `compare` cannot compare."""
    def absent(here: Trace, there: Trace) -> list[str]:
        return sorted(there.tensors.keys() - here.tensors.keys(), key=_stage_order)

    return absent(reference, ours), absent(ours, reference)


def models_note(ours: Trace, reference: Trace) -> str:
    """'the traces come from different models (…)' when both manifests state a model's dimensions and they differ,
    else '' (a hand-made reference may not say)."""
    a, b = ({k: t.manifest.get("model", {}).get(k) for k in ("hidden_size", "layers")} for t in (ours, reference))
    differ = any(a[k] is not None and b[k] is not None and a[k] != b[k] for k in a)
    return f"the traces come from different models (ours {a}, the reference {b})" if differ else ""


def name_list(names) -> str:
    """Tensor names in pipeline order, runs of numbered ones collapsed: 'waveform.0, encoder.block0..31, logits'."""
    out = []
    for stem, group in groupby(sorted(names, key=_stage_order), key=lambda n: n.rstrip("0123456789")):
        numbers = [int(n[len(stem):]) for n in group if n != stem]
        if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
            out.append(f"{stem}{numbers[0]}..{numbers[-1]}")
        else:
            out += [f"{stem}{k}" for k in numbers] or [stem]
    return ", ".join(out)


def _row(name: str, ours: Tensor, ref: Tensor, rtol: float, atol: float = 0.0, base: Tensor | None = None) -> Row:
    """How far `ours` is from `ref`, relative to max |ref − base| (base: what a residual block was given) and
    cosine-compared as changes from `base`."""
    a, ref = ours.double(), ref.double()
    base = torch.zeros_like(ref) if base is None else base.double()
    diff = (a - ref).abs().max().item() if ref.numel() else 0.0
    scale = (ref - base).abs().max().item() if ref.numel() else 0.0
    cosine = torch.nn.functional.cosine_similarity((a - base).flatten(), (ref - base).flatten(), dim=0).item()
    rel = diff / (scale or 1.0)
    return Row(name, tuple(ref.shape), diff, rel, cosine, rel <= rtol or diff <= atol, rtol)


def isolate(model: QwenAudio, reference: Trace, *, rtol: float | None = None, upcast: bool = True) -> list[Row]:
    """Each of our layers run on the reference's own input to it (the reference's previous stage) and compared with
    the reference's output of it: one row per traced stage from the conv stem to the logits, so an error shows in
    its own layer instead of compounding downstream.

    A residual block's row is relative to its own change of the stream, max |ours − ref| / max |ref − ref_in|:
    the stream passes through the block untouched, so relative to the stream a wrong weight would hide. Other rows
    are relative to max |ref|. Each layer computes in fp32 from its weights as loaded (bf16 and fp16 weights convert
    exactly), one layer at a time; `upcast=False` computes in the model's own dtype instead, where in bf16 the
    layer's own rounding is as large as a 1 % weight error's effect (see README). `rtol` defaults to `RTOL` of the
    looser of the dtype computed in and the reference's. Needs a reference recorded without `project`: a projected
    tensor cannot be fed to a layer.
    """
    expect_model(model)
    expect(reference, Trace, "reference", "a Trace (Trace.load(path))")
    check_tolerance(rtol, "rtol")
    reason = isolation_blocker(model, reference)
    if reason:
        raise InputError(reason)
    m, ref = reference.manifest, reference.tensors
    enc, dec, device = model.encoder, model.decoder, model.device
    compute = torch.float32 if upcast else dec.embedding.weight.dtype
    ours: dict[str, Tensor] = {}

    def given(name: str, like: Tensor) -> Tensor:
        """The reference's `name`, in place of our `like`: for the conv stem, in place of the positions it keeps
        (ours may compute a few more, which no block reads)."""
        kept = like[..., : ref[name].shape[-1]] if name in POSITIONS_PER_BLOCK_POSITION and name in ref else like
        if name not in ref or ref[name].shape != kept.shape:
            got = tuple(ref[name].shape) if name in ref else "missing"
            raise InputError(f"{name}: ours has shape {tuple(kept.shape)}, the reference {got}")
        value = ref[name].to(device, compute)
        return torch.cat([value, like[..., value.shape[-1] :].to(compute)], dim=-1) if kept is not like else value

    def swap_input(name: str) -> Callable:
        def hook(module, args):
            ours[name] = reduce(args[0], None)
            return given(name, args[0]), *args[1:]
        return hook

    def swap_output(name: str) -> Callable:
        def hook(module, args, out):
            ours[name] = reduce(out[..., : ref[name].shape[-1]] if name in POSITIONS_PER_BLOCK_POSITION else out, None)
            return given(name, out)
        return hook

    clips = range(sum(n.startswith("mel.") for n in ref))
    # The encoder (7 % of the weights) goes to fp32 whole, since it casts the mel to its dtype before conv1 runs.
    norm = next(model.get_submodule(p) for stage, p in STAGE_MODULES[model.family] if stage.startswith("decoder."))
    layers = [enc, dec.embedding, *dec.blocks, norm, dec.lm_head] if upcast else []
    with _in_float32(layers), _hooked(model, swap_input, swap_output):
        mel = torch.stack([ref[f"mel.{k}"] for k in clips]).to(device) if clips else None
        spans = enc.encode(mel, [len(ref[f"waveform.{k}"]) for k in clips]) if clips else []
        ours |= {f"encoder.span{k}": reduce(s, None) for k, s in enumerate(spans)}
        out = dec.logits(torch.tensor([m["input_ids"]], device=device),
                         audio=[given(f"encoder.span{k}", s) for k, s in enumerate(spans)])
    ours["logits"] = reduce(out[0, -1:] if m.get("logits", "last") == "last" else out[0], None)
    if rtol is None:
        rtol = max(RTOL.get(str(d).removeprefix("torch."), 1e-5) for d in (compute, _dtype_of(reference)))
    return [_row(n, ours[n], ref[n], rtol, base=ref.get(_residual_input(n))) for n in sorted(ours, key=_stage_order)]


def isolation_blocker(model: QwenAudio, reference: Trace) -> str | None:
    """Why `isolate` cannot run on `reference`, or None. It feeds each layer the reference's input to it, so it needs
    a reference of this model, not projected, holding every stage this model traces for the prompt (the waveform
    for each clip's length, every block's raw output): a reference from the official `output_hidden_states` lacks
    some, tools/record_official.py (Qwen2-Audio: tools/record_transformers.py) writes them all."""
    m = reference.manifest
    if m.get("project") is not None:
        return (f"the reference is projected (--project {m['project']}), so its tensors cannot be fed into our "
                "layers: record it without --project to check each layer on its own input")
    dims = {"hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers}
    if any(m.get("model", {}).get(k, v) != v for k, v in dims.items()):
        return f"the reference trace comes from another model ({m.get('model')}; this one has {dims})"
    ids, audio = list(m.get("input_ids") or []), model.tokenizer.audio_token_id
    clips = sum(t == audio and (i == 0 or ids[i - 1] != audio) for i, t in enumerate(ids))  # each clip: one run
    lacking = [n for n in stages(model, clips) if n not in reference.tensors]
    if lacking:
        return (f"the reference lacks {name_list(lacking)}, which the isolated comparison needs (each layer is fed "
                "the reference's input to it, and each clip's length comes from its waveform): record the reference "
                f"with {RECORDERS[model.family]}, without --project, which writes every stage")
    return None


def stages(model: QwenAudio, clips: int) -> list[str]:
    """Every tensor `record` writes for `model` and a prompt of `clips` clips, in pipeline order."""
    named = [stage for stage, _ in STAGE_MODULES[model.family]]
    encoder = [f"{stage}.{k}" for stage in ("waveform", "mel") for k in range(clips)]
    if clips:
        blocks = [f"encoder.block{j}" for j in range(len(model.encoder.blocks))]
        encoder += [*(n for n in named if n.startswith("encoder.")), "encoder.blocks_in", *blocks,
                    *(f"encoder.span{k}" for k in range(clips))]
    decoder = ["decoder.embeds", *(f"decoder.block{i}" for i in range(len(model.decoder.blocks))),
               *(n for n in named if n.startswith("decoder.")), "logits"]
    return sorted(encoder + decoder, key=_stage_order)


@contextmanager
def _in_float32(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Each of `layers` holds its weights in fp32 while it runs and returns to its dtype afterwards, so an fp32
    computation costs one layer's fp32 copy, not the model's. A loaded model holds all its floats in one dtype, and
    bf16 and fp16 go to fp32 and back exactly."""
    dtypes = {layer: next(t.dtype for t in layer.state_dict().values() if t.is_floating_point()) for layer in layers}

    def up(module: nn.Module, args: tuple) -> None:
        module.float()

    def down(module: nn.Module, args: tuple, out: Tensor) -> None:
        module.to(dtypes[module])

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(up), layer.register_forward_hook(down))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for layer, dtype in dtypes.items():
            layer.to(dtype)


def _residual_input(name: str) -> str | None:
    """The stage a residual block adds to: its input."""
    stem = name.rstrip("0123456789")
    first = {"encoder.block": "encoder.blocks_in", "decoder.block": "decoder.embeds"}.get(stem)
    if first is None or stem == name:
        return None
    j = int(name.removeprefix(stem))
    return f"{stem}{j - 1}" if j else first


STAGES = ["waveform", "mel", "encoder.conv1", "encoder.conv2", "encoder.blocks_in", "encoder.block", "encoder.pooled",
          "encoder.ln_post", "encoder.layer_norm", "encoder.proj", "encoder.projector", "encoder.span",
          "decoder.embeds", "decoder.block", "decoder.ln_f", "decoder.norm", "logits"]  # both families', in order


def _stage_order(name: str) -> tuple[int, int]:
    """Pipeline position of a tensor name: its stage, then its layer or clip number."""
    if name in STAGES:
        return STAGES.index(name), -1
    stem = name.rstrip("0123456789")
    number = int(name[len(stem):]) if len(stem) < len(name) else -1
    stem = stem.rstrip(".")
    return (STAGES.index(stem) if stem in STAGES else len(STAGES)), number


def format_table(rows: Sequence[Row], isolated: Sequence[Row] | None = None) -> str:
    """A fixed-width table; the first failing row is marked `<-- first divergence`. With `isolated` (rows from
    `isolate`), two more columns give each layer's error on the reference's own input, and the first failing one
    is marked `<-- first isolated failure`."""
    alone = {r.name: r for r in isolated or []}
    first = next((r.name for r in rows if not r.ok), None)
    first_alone = next((r.name for r in isolated or [] if not r.ok), None)
    head = f"{'tensor':<22} {'shape':<20} {'max abs':>10} {'rel':>10} {'cosine':>10}  status"
    lines = [head + (f"  {'isolated':>10}  status" if isolated is not None else "")]
    for r in rows:
        line = f"{r.name:<22} {str(list(r.shape)):<20} {r.max_abs:>10.3e} {r.rel:>10.3e} {r.cosine:>10.6f}  " \
               f"{'ok' if r.ok else 'FAIL':<6}"
        if isolated is not None:
            i = alone.get(r.name)
            line += f"  {i.rel:>10.3e}  {'ok' if i.ok else 'FAIL':<6}" if i else f"  {'-':>10}  {'':<6}"
        marks = [m for m, at in (("first divergence", first), ("first isolated failure", first_alone)) if at == r.name]
        lines.append((line + "  <-- " + ", ".join(marks)) if marks else line.rstrip())
    return "\n".join(lines)

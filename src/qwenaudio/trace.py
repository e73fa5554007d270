"""Activation traces: record what every stage of one run computes, and compare two recordings layer by layer.

A trace is one safetensors file. Its tensors are named by stage (`mel.0`, `encoder.conv1`, `encoder.block7`,
`encoder.span0`, `decoder.embeds`, `decoder.block31`, `decoder.ln_f`, `logits`), in fp32, and its metadata holds a
JSON manifest: the names with shapes, what produced the trace (qwenaudio or the official code), the model, the
prompt and the audio files. `tools/record_official.py` writes the same names from the official code, so
`qwenaudio verify ours.safetensors official.safetensors` can say where the two first part.

Full-size hidden states are large (32 encoder blocks × 1500 × 1280 floats for a 30 s clip), so `project=k`
multiplies the last dimension of every tensor but the waveform and mel by a fixed random k-column matrix when it is
wider than k: the features of [.., T, C] tensors, the time axis of the conv stem's and pooler's [B, C, T] outputs.
The matrix comes from numpy's PCG64 with `PROJECTION_SEED` (scaled by 1/√k), so both sides compute it without
torch, and a random projection keeps relative errors and cosines close to those of the full tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .audio import audio_span, load_audio, log_mel_spectrogram
from .errors import InputError
from .files import writing
from .model import QwenAudio

FORMAT = "qwenaudio-trace/1"
PROJECTION_SEED = 20231115


def projection(width: int, k: int) -> Tensor:
    """The fixed [width, k] projection both sides use: PCG64(PROJECTION_SEED) normals / √k, in fp32."""
    rng = np.random.Generator(np.random.PCG64(PROJECTION_SEED + width))
    return torch.from_numpy(rng.standard_normal((width, k), dtype=np.float32) / np.float32(math.sqrt(k)))


def reduce(x: Tensor, project: int | None) -> Tensor:
    """fp32 copy on the CPU, its last dimension projected to `project` columns when it is wider."""
    x = x.detach().float().cpu()
    if project is not None and x.shape[-1] > project:
        x = x @ projection(x.shape[-1], project)
    return x.contiguous()


@dataclass
class Trace:
    tensors: dict[str, Tensor]
    manifest: dict

    def save(self, path: str | Path) -> None:
        manifest = {**self.manifest, "tensors": {n: list(t.shape) for n, t in self.tensors.items()}}
        with writing(path) as tmp:
            save_file(self.tensors, str(tmp), metadata={"format": FORMAT, "manifest": json.dumps(manifest)})

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace, checking that it is one and that its manifest lists exactly its tensors."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata, tensors = f.metadata() or {}, {n: f.get_tensor(n) for n in f.keys()}
        except Exception as e:  # safetensors' own error type, OSError, …
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        if metadata.get("format") != FORMAT or "manifest" not in metadata:
            raise InputError(f"{path}: not a qwenaudio trace (metadata format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); record one with `qwenaudio trace` or tools/record_official.py")
        manifest = json.loads(metadata["manifest"])
        listed = {n: tuple(s) for n, s in manifest.get("tensors", {}).items()}
        if listed != {n: tuple(t.shape) for n, t in tensors.items()}:
            raise InputError(f"{path}: the manifest does not match the tensors in the file")
        return cls(tensors, manifest)


def record(model: QwenAudio, prompt: str, *, project: int | None = None, logits: str = "last") -> Trace:
    """Run `prompt` once (a full-sequence prefill) and trace every stage. Its `<audio>PATH</audio>` regions name
    the clips, read relative to the working directory, as the official tokenizer reads them.

    `logits` "last" keeps the last position's logits in full; "all" keeps every position (projected over the
    vocabulary when `project` is set).
    """
    if logits not in ("last", "all"):
        raise InputError(f"logits must be 'last' or 'all', got {logits!r}")
    audio_files = model.tokenizer.audio_paths(prompt)
    clips = [load_audio(p) for p in audio_files]
    tensors: dict[str, Tensor] = {}
    for k, clip in enumerate(clips):
        tensors[f"waveform.{k}"] = clip
        tensors[f"mel.{k}"] = log_mel_spectrogram(clip)
    ids = model.tokenizer.encode(prompt, audio_spans=[audio_span(len(c)) for c in clips] or None)

    def keep(name: str) -> Callable:
        def hook(module, args, out=None):
            tensors[name] = reduce(args[0] if out is None else out, project)
        return hook

    enc, dec = model.encoder, model.decoder
    points = [(enc.conv1, "encoder.conv1", False), (enc.conv2, "encoder.conv2", False),
              (enc.blocks[0], "encoder.blocks_in", True), (enc.avg_pooler, "encoder.pooled", False),
              (enc.ln_post, "encoder.ln_post", False), (enc.proj, "encoder.proj", False),
              (dec.h[0], "decoder.embeds", True), (dec.ln_f, "decoder.ln_f", False)]
    points += [(b, f"encoder.block{j}", False) for j, b in enumerate(enc.blocks)]
    points += [(b, f"decoder.block{i}", False) for i, b in enumerate(dec.h)]
    hooks = [m.register_forward_pre_hook(keep(n)) if pre else m.register_forward_hook(keep(n)) for m, n, pre in points]
    try:
        with torch.no_grad():
            spans = model.encode_audio(clips)
            dec.clear_cache()
            out = dec(torch.tensor([ids], device=model.device), audio=spans)
    finally:
        for h in hooks:
            h.remove()
    tensors |= {f"encoder.span{k}": reduce(s, project) for k, s in enumerate(spans)}
    tensors["logits"] = reduce(out[0, -1:], None) if logits == "last" else reduce(out[0], project)
    tensors = {n: t.float().contiguous() for n, t in tensors.items()}
    manifest = {"producer": "qwenaudio", "prompt": prompt, "audio": audio_files,
                "input_ids": ids, "project": project, "logits": logits,
                "model": {"dtype": str(dec.wte.weight.dtype).removeprefix("torch."),
                          "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers}}
    return Trace(tensors, manifest)


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float  # max |a − b| / max |b|
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


def default_rtol(ours: Trace, reference: Trace) -> float:
    """The loosest tolerance either trace's dtype calls for."""
    return max(RTOL.get(t.manifest.get("model", {}).get("dtype", "float32"), 1e-5) for t in (ours, reference))


def compare(ours: Trace, reference: Trace, *, rtol: float | None = None, atol: float = 0.0) -> list[Row]:
    """One row per tensor of the reference, in pipeline order; a tensor passes when rel ≤ rtol or max_abs ≤ atol.
    `rtol` defaults to `default_rtol` (1e-5 when both traces are fp32), and to at least `MEL_RTOL` for the mel."""
    given = rtol
    rtol = default_rtol(ours, reference) if rtol is None else rtol
    if ours.manifest.get("input_ids") != reference.manifest.get("input_ids"):
        raise InputError("the two traces ran different prompts (their input_ids differ)")
    if ours.manifest.get("project") != reference.manifest.get("project"):
        raise InputError(f"the traces use different projections ({ours.manifest.get('project')} vs "
                         f"{reference.manifest.get('project')}); record both with the same --project")
    rows = []
    for name in sorted(reference.tensors, key=_stage_order):
        ref = reference.tensors[name].double()
        if name not in ours.tensors or ours.tensors[name].shape != ref.shape:
            got = tuple(ours.tensors[name].shape) if name in ours.tensors else "missing"
            raise InputError(f"{name}: the reference has shape {tuple(ref.shape)}, ours {got}")
        a = ours.tensors[name].double()
        diff = (a - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() or 1.0
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), ref.flatten(), dim=0).item()
        tol = max(rtol, MEL_RTOL) if given is None and name.startswith("mel.") else rtol
        rows.append(Row(name, tuple(ref.shape), diff, diff / scale, cosine, diff / scale <= tol or diff <= atol, tol))
    return rows


STAGES = ["waveform", "mel", "encoder.conv1", "encoder.conv2", "encoder.blocks_in", "encoder.block", "encoder.pooled",
          "encoder.ln_post", "encoder.proj", "encoder.span", "decoder.embeds", "decoder.block", "decoder.ln_f", "logits"]


def _stage_order(name: str) -> tuple[int, int]:
    """Pipeline position of a tensor name: its stage, then its layer or clip number."""
    if name in STAGES:
        return STAGES.index(name), -1
    stem = name.rstrip("0123456789")
    number = int(name[len(stem):]) if len(stem) < len(name) else -1
    stem = stem.rstrip(".")
    return (STAGES.index(stem) if stem in STAGES else len(STAGES)), number


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table; the first failing row is marked `<-- first divergence`."""
    lines = [f"{'tensor':<22} {'shape':<20} {'max abs':>10} {'rel':>10} {'cosine':>10}  status"]
    first = next((r.name for r in rows if not r.ok), None)
    for r in rows:
        status = "ok" if r.ok else "FAIL" + ("  <-- first divergence" if r.name == first else "")
        lines.append(f"{r.name:<22} {str(list(r.shape)):<20} {r.max_abs:>10.3e} {r.rel:>10.3e} {r.cosine:>10.6f}  {status}")
    return "\n".join(lines)

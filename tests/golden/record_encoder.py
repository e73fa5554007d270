"""Record the official Qwen-Audio audio encoder's per-stage activations as a golden file.

What it records: the official ``AudioEncoder.encode`` (QwenLM/Qwen-Audio at commit
e81cc26, audio.py + modeling_qwen.py), loaded through transformers' remote code in
fp32 on CPU from ``qwenaudio.testing.make_tiny_checkpoint(seed=0)`` (default tiny
dims: n_state 64, 4 heads, 2 layers), run on three synthetic 16 kHz clips of
8000, 20800 and 32000 samples (0.5 s, 1.3 s, 2.0 s).

Cases: ``single0``, ``single1``, ``single2`` (each clip alone) and ``batch`` (all
three in one batch).  Tensors, all float32 except the two length tensors:

    {case}.waveform   [N] samples (singles only)
    {case}.mel        [B, 80, 2*max(T)] official log-mel, cropped to the frames the encoder reads
    {case}.conv1      [B, C, 2*max(T)] conv1 output (before GELU)
    {case}.conv2      [B, C, max(T)]   conv2 output (before GELU)
    {case}.blocks_in  [B, max(T), C]   input of blocks[0] (positional embedding added, padding zeroed)
    {case}.block{i}   [B, max(T), C]   output of blocks[i]
    {case}.pooled     [B, C, max(T)//2] avg_pooler output, in the layout the module returns
    {case}.ln_post    [B, max(T)//2, C]
    {case}.proj       [B, max(T)//2, D]
    {case}.span{n}    [span_n, D]      what encode() returns for clip n: BOS row, frames, EOS row
    {case}.lengths    int32 [B, 2]     input_audio_lengths: [T after the conv stem, token count]
    {case}.spans      int64 [B]        audio_span_tokens (token count + 2)

Inputs are built exactly as the official tokenizer's ``process_audio`` builds them,
using the official ``pad_or_trim``, ``log_mel_spectrogram`` and ``get_T_after_cnn``.

How to run (in a venv with the official code's dependencies, e.g. /work/official/venv:
transformers==4.32.0, torch, numpy<2, tiktoken, einops, transformers_stream_generator,
plus safetensors and soundfile for qwenaudio.testing), from the repository root:

    /work/official/venv/bin/python tests/golden/record_encoder.py --official-files DIR

where DIR holds the official files modeling_qwen.py, configuration_qwen.py,
qwen_generation_utils.py, tokenization_qwen.py, audio.py, mel_filters.npz and
qwen.tiktoken from e81cc26, kept OUTSIDE this repository.  It writes
``encoder_official.safetensors`` next to this script.  The test suite only reads that
file; it never runs this script.
"""

import argparse
import contextlib
import importlib
import json
import os
import shutil
import struct
import sys
import tempfile
from importlib.metadata import version

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PATH = os.path.join(HERE, "encoder_official.safetensors")
SRC = os.path.join(HERE, "..", "..", "src")
CODE_REF = "QwenLM/Qwen-Audio@e81cc26 audio.py+modeling_qwen.py"
OFFICIAL_FILES = [
    "modeling_qwen.py", "configuration_qwen.py", "qwen_generation_utils.py",
    "tokenization_qwen.py", "audio.py", "mel_filters.npz",
]
SAMPLE_RATE = 16000
CLIP_LENGTHS = [8000, 20800, 32000]  # 0.5 s, 1.3 s, 2.0 s


def make_waveform(k: int, n: int) -> np.ndarray:
    """Synthetic clip k with n samples at 16 kHz, float32, peak 0.5.

    x(t) = env(t) * [ sin(2 pi (f0 t + (f1 - f0) t^2 / (2 D)))        linear chirp 100 Hz -> 6 kHz over D
                    + 0.5 sin(2 pi f t + p1) + 0.25 sin(2 pi 2f t + p2)  tone f = 220 (k + 1) Hz and its octave
                    + 0.02 noise ]                                       white Gaussian noise
    env(t) = sin(pi t / D) (half-sine), then scaled so max |x| = 0.5.
    Phases p1, p2 and the noise come from PCG64(k), so each clip is reproducible.
    """
    rng = np.random.Generator(np.random.PCG64(k))
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    duration = n / SAMPLE_RATE
    f0, f1, f = 100.0, 6000.0, 220.0 * (k + 1)
    p1, p2 = rng.uniform(0.0, 2 * np.pi, size=2)
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration)))
    tones = 0.5 * np.sin(2 * np.pi * f * t + p1) + 0.25 * np.sin(2 * np.pi * 2 * f * t + p2)
    noise = 0.02 * rng.standard_normal(n)
    x = np.sin(np.pi * t / duration) * (chirp + tones + noise)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def load_official_model(official_dir: str, work_dir: str, seed: int = 0, **dims):
    """Tiny checkpoint (make_tiny_checkpoint(seed, **dims)) + official code in work_dir, loaded in fp32 on CPU.

    The checkpoint directory is ``work_dir/qwen_audio_tiny`` (= ``model.name_or_path``).
    """
    from transformers import AutoModelForCausalLM

    ckpt = official_checkpoint(official_dir, work_dir, seed, **dims)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, fp32=True)
    return model.eval()


def official_checkpoint(official_dir: str, work_dir: str, seed: int = 0, **dims) -> str:
    """``work_dir/qwen_audio_tiny``: make_tiny_checkpoint(seed, **dims) with the official code files beside it."""
    from qwenaudio.testing import make_tiny_checkpoint

    ckpt = os.path.join(work_dir, "qwen_audio_tiny")  # also the name of the dynamic module package
    make_tiny_checkpoint(ckpt, seed=seed, vocab_file=os.path.join(official_dir, "qwen.tiktoken"), **dims)
    for name in OFFICIAL_FILES:  # the official mel_filters.npz replaces ours, so the mel is fully official
        shutil.copyfile(os.path.join(official_dir, name), os.path.join(ckpt, name))
    open(os.path.join(ckpt, "cpp_kernels.py"), "w").close()  # imported by modeling_qwen.py, unused here
    return ckpt


def official_inputs(audio_module, waveforms):
    """input_audios, input_audio_lengths, audio_span_tokens as the official process_audio builds them."""
    mels, lengths, spans = [], [], []
    for wav in waveforms:
        L = min(wav.shape[0], 480000)
        mel_len = L // 160
        mels.append(audio_module.log_mel_spectrogram(audio_module.pad_or_trim(wav.flatten())))
        T = audio_module.get_T_after_cnn(mel_len)
        token_num = (T - 2) // 2 + 1
        lengths.append([T, token_num])
        spans.append(token_num + 2)
    return torch.stack(mels, dim=0), torch.IntTensor(lengths), spans


def record_case(encoder, audio_module, case, waveforms, out):
    """Run encode() on one batch of clips with hooks on its stages; add the tensors to `out`."""
    input_audios, input_audio_lengths, spans = official_inputs(audio_module, waveforms)
    seen = {}

    def save_output(name):
        return lambda module, args, output: seen.__setitem__(name, output.detach().clone())

    hooks = [
        encoder.conv1.register_forward_hook(save_output("conv1")),
        encoder.conv2.register_forward_hook(save_output("conv2")),
        encoder.blocks[0].register_forward_pre_hook(
            lambda module, args: seen.__setitem__("blocks_in", args[0].detach().clone())),
        encoder.avg_pooler.register_forward_hook(save_output("pooled")),
        encoder.ln_post.register_forward_hook(save_output("ln_post")),
        encoder.proj.register_forward_hook(save_output("proj")),
    ]
    hooks += [block.register_forward_hook(save_output(f"block{i}")) for i, block in enumerate(encoder.blocks)]
    try:
        outputs = encoder.encode(input_audios, input_audio_lengths, spans)
    finally:
        for hook in hooks:
            hook.remove()

    if len(waveforms) == 1:
        out[f"{case}.waveform"] = torch.from_numpy(waveforms[0])
    max_t = int(input_audio_lengths[:, 0].max())
    out[f"{case}.mel"] = input_audios[:, :, : 2 * max_t]
    for name, tensor in seen.items():
        out[f"{case}.{name}"] = tensor
    for n, span in enumerate(outputs):
        assert span.shape[0] == spans[n]
        out[f"{case}.span{n}"] = span
    out[f"{case}.lengths"] = input_audio_lengths.to(torch.int32)
    out[f"{case}.spans"] = torch.tensor(spans, dtype=torch.int64)


def save_deterministic(tensors, path, metadata):
    """safetensors.torch.save, with the metadata keys sorted so that reruns give identical bytes.

    (The Rust writer stores ``__metadata__`` from a hash map, whose key order changes from run to run.)
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    with open(path, "wb") as f:
        f.write(blob[:8] + text.ljust(n, b" ") + blob[8 + n :])


def parse_args(description: str, out_path: str) -> argparse.Namespace:
    """The recorders' common command line: where the official files are, and where to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--official-files", required=True, help="directory with the official e81cc26 files")
    parser.add_argument("--out", default=out_path)
    return parser.parse_args()


@contextlib.contextmanager
def official_workdir():
    """A temporary directory for tiny checkpoints in which transformers also keeps its copy of the remote code
    (and the mel_filters.npz it puts there); the hub stays offline and qwenaudio (for the checkpoints) importable."""
    with tempfile.TemporaryDirectory() as work_dir:
        os.environ["HF_MODULES_CACHE"] = os.path.join(work_dir, "modules")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        sys.path.insert(0, os.path.abspath(SRC))
        torch.manual_seed(0)  # nothing here is random in torch; set anyway
        yield work_dir


def main():
    args = parse_args(__doc__.split("\n\n")[0], OUT_PATH)
    official_dir = os.path.abspath(args.official_files)

    with official_workdir() as work_dir:
        model = load_official_model(official_dir, work_dir)
        encoder = model.transformer.audio
        # The official audio.py module exactly as transformers loaded it (sibling of modeling_qwen).
        audio_module = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".audio")
        assert type(encoder) is audio_module.AudioEncoder

        waveforms = [make_waveform(k, n) for k, n in enumerate(CLIP_LENGTHS)]
        out = {}
        with torch.no_grad():
            for k, wav in enumerate(waveforms):
                record_case(encoder, audio_module, f"single{k}", [wav], out)
            record_case(encoder, audio_module, "batch", waveforms, out)

    out = {name: (t.float() if t.is_floating_point() else t).contiguous() for name, t in out.items()}
    metadata = {
        "code": CODE_REF,
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "checkpoint": "qwenaudio.testing.make_tiny_checkpoint(seed=0) default dims",
        "dtype": "float32",
    }
    save_deterministic(out, args.out, metadata)
    print(f"wrote {len(out)} tensors, {os.path.getsize(args.out)} bytes to {args.out}")


if __name__ == "__main__":
    main()

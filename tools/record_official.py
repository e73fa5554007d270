"""Record an activation trace of the official Qwen-Audio code, for `qwenaudio verify`.

Runs one prompt through the official model (transformers remote code: modeling_qwen.py, audio.py,
tokenization_qwen.py next to the weights), one forward pass and no generation, and writes what every stage computed
in the "qwenaudio-trace/1" format that `qwenaudio trace` writes for our implementation:

    python tools/record_official.py --model CHECKPOINT_DIR \\
        --prompt "<audio>clip.wav</audio><|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>" \\
        --out reference.safetensors [--project K] [--logits last|all] [--dtype float32|bfloat16] [--device cpu|cuda]

    qwenaudio verify ours.safetensors reference.safetensors     # or: qwenaudio verify reference.safetensors --model DIR

Audio paths in the prompt are read relative to the working directory, by the official loader (the ffmpeg CLI).
This script runs in the official environment (transformers 4.32-4.53), so it does not import qwenaudio: FORMAT,
PROJECTION_SEED and projection() repeat src/qwenaudio/trace.py, and tests/ check that they still agree.
"""

import argparse
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import struct
import sys

import numpy as np
import torch

FORMAT = "qwenaudio-trace/1"  # = qwenaudio.trace.FORMAT
PROJECTION_SEED = 20231115  # = qwenaudio.trace.PROJECTION_SEED
OFFICIAL_FILES = ["configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "audio.py",
                  "qwen_generation_utils.py", "cpp_kernels.py"]
KNOWN_CODE = {  # sha256 of modeling_qwen.py + audio.py (the Hugging Face Qwen/Qwen-Audio copies are identical)
    ("3ac7b938eb36f093c1f5e2722ad9b2cbbbeea118c6a4364936b38cd8ddfb0389",
     "dc020148f4b3cb99a26f62c4a5a42a1b20d6c1f558d850cb36069885a4489ac9"): "QwenLM/Qwen-Audio@e81cc26",
}


def projection(width, k):
    """The fixed [width, k] projection: PCG64(PROJECTION_SEED + width) standard normals / sqrt(k), float32."""
    rng = np.random.Generator(np.random.PCG64(PROJECTION_SEED + width))
    return torch.from_numpy(rng.standard_normal((width, k), dtype=np.float32) / np.float32(math.sqrt(k)))


def reduce(x, project):
    """fp32 copy on the CPU, its last dimension projected to `project` columns when it is wider."""
    x = x.detach().float().cpu()
    if project is not None and x.shape[-1] > project:
        x = x @ projection(x.shape[-1], project)
    return x.contiguous()


def save_trace(tensors, manifest, path):
    """safetensors file with metadata {format, manifest}; metadata keys sorted so reruns give identical bytes."""
    from safetensors.torch import save

    manifest = {**manifest, "tensors": {n: list(t.shape) for n, t in tensors.items()}}
    blob = save(tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(blob[:8] + text.ljust(n, b" ") + blob[8 + n:])


def code_note(model_dir):
    """transformers/torch versions and which official code ran (commit when the files are known ones)."""
    import transformers

    digests = tuple(hashlib.sha256(open(os.path.join(model_dir, f), "rb").read()).hexdigest()
                    for f in ("modeling_qwen.py", "audio.py"))
    which = KNOWN_CODE.get(digests, f"unknown commit (sha256 modeling_qwen.py {digests[0][:12]}, "
                                    f"audio.py {digests[1][:12]})")
    return f"{which}; transformers {transformers.__version__}; torch {torch.__version__.split('+')[0]}"


def fail(message):
    sys.exit(f"record_official.py: error: {message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory holding the official .py files")
    parser.add_argument("--prompt", required=True, help="prompt text, audio as <audio>PATH</audio>")
    parser.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    parser.add_argument("--project", type=int, default=None, help="project feature dims wider than K to K columns")
    parser.add_argument("--logits", choices=["last", "all"], default="last",
                        help="last position in full (default) or every position (projected when --project is set)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    if not os.path.isdir(args.model):
        fail(f"{args.model}: not a directory")
    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(args.model, f))]
    if missing:
        fail(f"{args.model} lacks the official code file(s) {', '.join(missing)}: copy them in from the official "
             "repository (QwenLM/Qwen-Audio) or Hugging Face; an empty cpp_kernels.py is enough")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    urls = tokenizer.extract_audio_urls(args.prompt)
    absent = [u for u in urls if not re.match(r"https?://", u) and not os.path.isfile(u)]
    if absent:
        fail(f"audio file(s) not found (paths are relative to {os.getcwd()}): {', '.join(absent)}")
    if urls and shutil.which("ffmpeg") is None:
        fail("the official audio loader needs the ffmpeg CLI on PATH")

    precision = {"fp32": True} if args.dtype == "float32" else {"bf16": True}
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, **precision)
    model = model.to(args.device).eval()
    # The official audio.py as transformers loaded it (a sibling of modeling_qwen in the dynamic-module package).
    audio = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".audio")
    audio_info = tokenizer.process_audio(args.prompt)  # needs the mel_filters.npz that from_pretrained put in place
    inputs = tokenizer(args.prompt, return_tensors="pt", audio_info=audio_info).to(args.device)

    tensors = {}
    for k, url in enumerate(audio_info["audio_urls"] if audio_info else []):
        wav = audio.load_audio(url)
        tensors[f"waveform.{k}"] = torch.from_numpy(wav).float()
        tensors[f"mel.{k}"] = audio.log_mel_spectrogram(audio.pad_or_trim(wav.flatten())).float()
        assert torch.equal(tensors[f"mel.{k}"], audio_info["input_audios"][k].float())

    def keep(name):
        def hook(module, hook_args, out=None):
            value = hook_args[0] if out is None else (out[0] if isinstance(out, tuple) else out)
            tensors[name] = reduce(value, args.project)
        return hook

    enc, tr = model.transformer.audio, model.transformer
    points = [(enc.conv1, "encoder.conv1", False), (enc.conv2, "encoder.conv2", False),
              (enc.blocks[0], "encoder.blocks_in", True), (enc.avg_pooler, "encoder.pooled", False),
              (enc.ln_post, "encoder.ln_post", False), (enc.proj, "encoder.proj", False),
              (tr.h[0], "decoder.embeds", True), (tr.ln_f, "decoder.ln_f", False)]
    points += [(b, f"encoder.block{j}", False) for j, b in enumerate(enc.blocks)]
    points += [(b, f"decoder.block{i}", False) for i, b in enumerate(tr.h)]
    hooks = [m.register_forward_pre_hook(keep(n)) if pre else m.register_forward_hook(keep(n)) for m, n, pre in points]
    spans, encode = [], enc.encode

    def encode_and_keep(*a, **kw):  # what the decoder splices in, one [span, D] tensor per clip
        out = encode(*a, **kw)
        spans.extend(out)
        return out

    enc.encode = encode_and_keep
    try:
        with torch.no_grad():
            logits = model(**inputs, audio_info=audio_info).logits
    finally:
        del enc.encode
        for h in hooks:
            h.remove()
    tensors.update({f"encoder.span{k}": reduce(s, args.project) for k, s in enumerate(spans)})
    tensors["logits"] = reduce(logits[0, -1:], None) if args.logits == "last" else reduce(logits[0], args.project)
    tensors = {n: t.float().contiguous() for n, t in tensors.items()}

    manifest = {"producer": "official", "code": code_note(args.model), "prompt": args.prompt,
                "audio": list(audio_info["audio_urls"]) if audio_info else [],
                "input_ids": inputs["input_ids"][0].tolist(), "project": args.project, "logits": args.logits,
                "model": {"model_type": model.config.model_type,
                          "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
                          "hidden_size": model.config.hidden_size, "layers": model.config.num_hidden_layers}}
    save_trace(tensors, manifest, args.out)
    print(f"wrote {len(tensors)} tensors ({len(manifest['input_ids'])} tokens) to {args.out}")


if __name__ == "__main__":
    main()

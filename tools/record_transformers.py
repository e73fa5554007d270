"""Record an activation trace of transformers' Qwen2-Audio, for `qwenaudio verify`.

Runs one prompt through `Qwen2AudioForConditionalGeneration` and its processor (a checkpoint directory in the
published layout: config.json, the safetensors, preprocessor_config.json, vocab.json, merges.txt,
tokenizer_config.json), one forward pass and no generation, and writes what every stage computed in the
"qwenaudio-trace/1" format that `qwenaudio trace` writes for our implementation:

    python tools/record_transformers.py --model CHECKPOINT_DIR \\
        --prompt "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>" \\
        --audio clip.wav --out reference.safetensors [--project K] [--logits last|all] [--dtype float32|bfloat16]
        [--device cpu|cuda]

    qwenaudio verify ours.safetensors reference.safetensors     # or: qwenaudio verify reference.safetensors --model DIR

The prompt holds `<|audio_bos|><|AUDIO|><|audio_eos|>` once per clip; each `--audio` (read relative to the working
directory, `read_clip`) is the next one's clip. transformers runs every clip as 30 s; the conv
stem's and the encoder's per-position outputs are kept up to the positions the clips of the batch fill (T, the
longest clip's positions after the conv stem: 2T of conv1, T of conv2 and the blocks, T // 2 after the pooler), as
qwenaudio computes them. This script does not import qwenaudio: the format's helpers are record_official.py's.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record_official import fail, reduce, save_trace  # noqa: E402  (the format's one copy outside qwenaudio)

CHECKPOINT_FILES = ["config.json", "preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"]


def read_clip(path, rate):
    """A clip as float32 samples at `rate`: read with soundfile, and resampled by transformers' `load_audio` (which
    needs soxr) only when stored at another rate."""
    import soundfile

    wave, stored = soundfile.read(path, dtype="float32", always_2d=True)
    if stored != rate:
        from transformers.audio_utils import load_audio

        return load_audio(path, sampling_rate=rate, backend="soundfile")
    return wave.mean(axis=1)


def record(model_dir, prompt, audio, project=None, logits="last", dtype="float32", device="cpu"):
    """(tensors, manifest) of one forward pass of transformers' model over `prompt` with the clips `audio`."""
    import transformers
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    rate = processor.feature_extractor.sampling_rate
    waves = [read_clip(path, rate) for path in audio]
    inputs = processor(text=prompt, audio=waves or None, sampling_rate=rate, return_tensors="pt").to(device)

    tensors = {}
    for k, wave in enumerate(waves):
        tensors[f"waveform.{k}"] = torch.from_numpy(wave).float()
        tensors[f"mel.{k}"] = inputs["input_features"][k].float().cpu()
    if waves:  # the positions each clip fills after the conv stem (transformers' own arithmetic), and the longest
        feat_lengths, out_lengths = model.model.audio_tower._get_feat_extract_output_lengths(
            inputs["feature_attention_mask"].sum(-1))
        positions = int(feat_lengths.max())
    # What each stage keeps of a per-position tensor: its positions axis and how many positions per block position.
    kept = {"encoder.conv1": (-1, 2), "encoder.conv2": (-1, 1), "encoder.blocks_in": (1, 1), "encoder.block": (1, 1),
            "encoder.pooled": (-1, 0.5), "encoder.layer_norm": (1, 0.5), "encoder.projector": (1, 0.5)}

    def keep(name):
        def hook(module, hook_args, out=None):
            value = hook_args[0] if out is None else (out[0] if isinstance(out, tuple) else out)
            axis, per_position = kept.get(name) or kept.get(name.rstrip("0123456789"), (None, None))
            if axis is not None:
                value = value.narrow(axis, 0, int(positions * per_position))
            tensors[name] = reduce(value, project)
        return hook

    tower, text = model.model.audio_tower, model.model.language_model
    points = [(tower.conv1, "encoder.conv1", False), (tower.conv2, "encoder.conv2", False),
              (tower.layers[0], "encoder.blocks_in", True), (tower.avg_pooler, "encoder.pooled", False),
              (tower.layer_norm, "encoder.layer_norm", False),
              (model.model.multi_modal_projector, "encoder.projector", False),
              (text.layers[0], "decoder.embeds", True), (text.norm, "decoder.norm", False)]
    points += [(b, f"encoder.block{j}", False) for j, b in enumerate(tower.layers)]
    points += [(b, f"decoder.block{i}", False) for i, b in enumerate(text.layers)]
    hooks = [m.register_forward_pre_hook(keep(n)) if pre else m.register_forward_hook(keep(n)) for m, n, pre in points]
    spans = []
    hooks.append(model.model.multi_modal_projector.register_forward_hook(  # each clip's span: its own positions
        lambda module, hook_args, out: spans.extend(out[k, :n] for k, n in enumerate(out_lengths.tolist()))))
    try:
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    tensors.update({f"encoder.span{k}": reduce(s, project) for k, s in enumerate(spans)})
    tensors["logits"] = reduce(out[0, -1:], None) if logits == "last" else reduce(out[0], project)
    tensors = {n: t.float().contiguous() for n, t in tensors.items()}
    code = f"transformers {transformers.__version__} Qwen2AudioForConditionalGeneration; " \
           f"torch {torch.__version__.split('+')[0]}"
    manifest = {"producer": "transformers", "code": code, "prompt": prompt, "audio": list(audio),
                "input_ids": inputs["input_ids"][0].tolist(), "project": project, "logits": logits,
                "model": {"model_type": model.config.model_type,
                          "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
                          "hidden_size": model.config.text_config.hidden_size,
                          "layers": model.config.text_config.num_hidden_layers}}
    return tensors, manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory in the published layout")
    parser.add_argument("--prompt", required=True, help="prompt text, <|audio_bos|><|AUDIO|><|audio_eos|> per clip")
    parser.add_argument("--audio", action="append", default=[], help="the next <|AUDIO|>'s clip (repeat, in order)")
    parser.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    parser.add_argument("--project", type=int, default=None, help="project feature dims wider than K to K columns")
    parser.add_argument("--logits", choices=["last", "all"], default="last",
                        help="last position in full (default) or every position (projected when --project is set)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    if not os.path.isdir(args.model):
        fail(f"{args.model}: not a directory")
    missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(args.model, f))]
    if missing:
        fail(f"{args.model} lacks {', '.join(missing)}: give a checkpoint directory in the published layout")
    absent = [a for a in args.audio if not os.path.isfile(a)]
    if absent:
        fail(f"audio file(s) not found (paths are relative to {os.getcwd()}): {', '.join(absent)}")
    if args.prompt.count("<|AUDIO|>") != len(args.audio):
        fail(f"the prompt holds {args.prompt.count('<|AUDIO|>')} <|AUDIO|> token(s) but {len(args.audio)} --audio "
             "clip(s) were given")
    tensors, manifest = record(args.model, args.prompt, args.audio, args.project, args.logits, args.dtype,
                               args.device)
    save_trace(tensors, manifest, args.out)
    print(f"wrote {len(tensors)} tensors ({len(manifest['input_ids'])} tokens) to {args.out}")


if __name__ == "__main__":
    main()

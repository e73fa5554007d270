"""Record Qwen2-Audio's front end, as transformers computes it, as a golden file.

What it records: transformers' ``WhisperFeatureExtractor(feature_size=128)`` (Qwen2-Audio's preprocessor: n_fft 400,
hop 160, 16 kHz, padded to 30 s, ``return_attention_mask=True``), called once on a batch of three clips, and the
number of ``<|AUDIO|>`` tokens ``Qwen2AudioProcessor`` expands each clip's placeholder to (with a tiny byte-level
tokenizer: only the count of the audio token matters). The clips, all 16 kHz on the 16-bit grid:

    speech  ../shared/audio/1272-128104-0000.flac (16 kHz FLAC, 5.86 s), loaded with qwenaudio.load_audio
    glass   ../shared/audio/glass-breaking-151256.mp3 (48 kHz stereo MP3, 4.03 s), loaded with qwenaudio.load_audio
    chirp   synthetic: 20,961 samples (131 hops + 1) of a chirp plus noise, numpy default_rng(25)

Tensors, per clip NAME:

    NAME.waveform          int16 [samples]     the input, × 32768 (the 16-bit grid load_audio rounds to)
    NAME.input_features    float32 [128, F]    the extractor's log-mel, cropped to F = real frames + 4: the frames
                                               past that hold only padding (each equals the clip's floor)
    NAME.attention_mask    int32 [3000]        the extractor's frame mask
    NAME.num_audio_tokens  int64 []            `<|AUDIO|>` tokens in the processor's input_ids for this clip

The metadata names the transformers, torch and numpy versions. Whether the extractor took its torch or numpy path is
recorded as ``path`` (torch whenever torch is installed).

How to run (any venv with transformers, torch, soundfile and safetensors; recorded with transformers 5.25.0), from
the repository root, with the shared recordings at ../shared/audio:

    PYTHONPATH=src python tests/golden/record_qwen2_front_end.py

It writes ``qwen2_front_end_transformers.safetensors`` next to this script; the tests only read that file.
"""

import os
import sys
from importlib.metadata import version

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helper: deterministic save)

OUT_PATH = os.path.join(HERE, "qwen2_front_end_transformers.safetensors")
SHARED_AUDIO = os.path.join(HERE, "..", "..", "..", "shared", "audio")
RECORDINGS = {"speech": "1272-128104-0000.flac", "glass": "glass-breaking-151256.mp3"}
CHIRP_SAMPLES = 131 * 160 + 1
EXTRA_FRAMES = 4  # a frame's window reaches 200 samples past its start, so 2 frames past the clip are padding only


def chirp() -> torch.Tensor:
    """A rising chirp plus a little noise, on the 16-bit grid."""
    t = np.arange(CHIRP_SAMPLES) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.01 * np.random.default_rng(25).standard_normal(len(t))
    return torch.from_numpy(np.round(x * 32768) / 32768).float()


def tiny_processor():
    """Qwen2AudioProcessor over Qwen2-Audio's feature extractor and a byte-level tokenizer of printable ASCII."""
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor

    vocab = {c: i for i, c in enumerate([chr(i) for i in range(33, 127)] + ["Ġ", "<|endoftext|>"])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)


def main() -> None:
    import transformers.models.whisper.feature_extraction_whisper as fe_module

    from qwenaudio.core.audio import feature_frames, load_audio

    clips = {name: load_audio(os.path.join(SHARED_AUDIO, file)) for name, file in RECORDINGS.items()}
    clips["chirp"] = chirp()
    waves = [c.numpy() for c in clips.values()]
    processor = tiny_processor()
    features = processor.feature_extractor(waves, sampling_rate=16000, return_attention_mask=True,
                                           return_tensors="np")
    prompt = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    expanded = processor(text=[prompt] * len(waves), audio=waves, sampling_rate=16000, padding=True,
                         return_tensors="np")
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    counts = (expanded["input_ids"] == audio_id).sum(-1)

    out = {}
    for i, (name, wave) in enumerate(clips.items()):
        pcm = torch.round(wave * 32768)
        assert torch.equal(pcm / 32768, wave), f"{name} is not on the 16-bit grid"
        frames = feature_frames(len(wave)) + EXTRA_FRAMES
        out[f"{name}.waveform"] = pcm.to(torch.int16)
        out[f"{name}.input_features"] = torch.from_numpy(features["input_features"][i, :, :frames].copy())
        out[f"{name}.attention_mask"] = torch.from_numpy(features["attention_mask"][i].astype(np.int32))
        out[f"{name}.num_audio_tokens"] = torch.tensor(int(counts[i]), dtype=torch.int64)
    metadata = {
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "extractor": "WhisperFeatureExtractor(feature_size=128), one batched call, sampling_rate=16000, "
                     "return_attention_mask=True",
        "path": "torch" if fe_module.is_torch_available() else "numpy",
        "clips": ", ".join(f"{name}={len(w)}" for name, w in clips.items()),
    }
    record_encoder.save_deterministic(out, OUT_PATH, metadata)
    print(f"wrote {len(out)} tensors, {os.path.getsize(OUT_PATH)} bytes to {OUT_PATH}")


if __name__ == "__main__":
    main()

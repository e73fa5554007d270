"""Transcribe an audio file with Qwen-Audio.

The decoder is still being built, so for now this runs what exists and prints the rest: it loads and resamples
the clip, computes its log-mel, encodes it with the checkpoint's audio encoder, and shows the ASR prompt the
decoder will read (checking the whole checkpoint on the meta device, which reads only the safetensors headers).
"""

import argparse

import torch

import qwenaudio
from qwenaudio.audio import audio_span
from qwenaudio.hub import weights_home

ASR_TAGS = "<|startoftranscript|><|{lang}|><|transcribe|><|{lang}|><|notimestamps|><|wo_itn|>"


def main() -> None:
    parser = argparse.ArgumentParser(description="Transcribe an audio file with Qwen-Audio.")
    parser.add_argument("audio", help="an audio file (wav, flac, ogg, mp3; any rate, mono or stereo)")
    parser.add_argument("--model", default=str(weights_home() / "Qwen-Audio"), help="checkpoint directory")
    parser.add_argument("--language", default="en", help="spoken language tag: en zh de es ko fr ja it")
    args = parser.parse_args()

    audio = qwenaudio.load_audio(args.audio)  # mono, 16 kHz
    span = audio_span(len(audio))
    prompt = f"<audio>{args.audio}</audio>" + ASR_TAGS.format(lang=args.language)
    print(f"audio   {args.audio}: {len(audio) / 16000:.2f} s -> {span} prompt tokens")
    try:
        tensors = qwenaudio.load_checkpoint(args.model, device="meta")
        ids = qwenaudio.Tokenizer.from_pretrained(args.model).encode(prompt, audio_spans=[span])
        encoder = qwenaudio.load_encoder(args.model, dtype=torch.float32)  # fp32: what runs fast on a CPU
    except qwenaudio.QwenAudioError as e:
        print(f"model   not ready: {e}")
        print("        get it with: python -c \"import qwenaudio; qwenaudio.download('Qwen/Qwen-Audio')\" "
              "(see weights/README.md)")
        return
    print(f"model   {args.model}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e9:.3f} B "
          "parameters")
    with torch.no_grad():
        features = encoder.encode(qwenaudio.log_mel_spectrogram(audio)[None], [len(audio)])[0]
    print(f"encoder {tuple(features.shape)} features: BOS + {span - 2} audio tokens + EOS")
    print(f"prompt  {len(ids)} ids: {prompt}")
    print("next    the decoder reads the prompt with the features spliced in, then decodes greedily "
          "(arrives with the language and inference issues)")


if __name__ == "__main__":
    main()

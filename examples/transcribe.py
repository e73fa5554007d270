"""Transcribe an audio file with Qwen-Audio.

The audio encoder and decoder are still being built, so for now this prints what it would run: the clip's length
and the number of prompt tokens it occupies, the ASR prompt and its token ids, and the checkpoint it would load
(checked tensor by tensor on the meta device, which reads only the safetensors headers).
"""

import argparse

import soundfile as sf

import qwenaudio
from qwenaudio.audio import SAMPLE_RATE, audio_span
from qwenaudio.hub import weights_home

ASR_TAGS = "<|startoftranscript|><|{lang}|><|transcribe|><|{lang}|><|notimestamps|><|wo_itn|>"


def main() -> None:
    parser = argparse.ArgumentParser(description="Transcribe an audio file with Qwen-Audio.")
    parser.add_argument("audio", help="an audio file soundfile can read (wav, flac, ogg, mp3)")
    parser.add_argument("--model", default=str(weights_home() / "Qwen-Audio"), help="checkpoint directory")
    parser.add_argument("--language", default="en", help="spoken language tag: en zh de es ko fr ja it")
    args = parser.parse_args()

    info = sf.info(args.audio)
    samples = round(info.frames * SAMPLE_RATE / info.samplerate)  # length once resampled to 16 kHz
    span = audio_span(samples)
    prompt = f"<audio>{args.audio}</audio>" + ASR_TAGS.format(lang=args.language)
    print(f"audio   {args.audio}: {info.frames / info.samplerate:.2f} s at {info.samplerate} Hz, "
          f"{info.channels} channel(s) -> {span} prompt tokens")
    print(f"prompt  {prompt}")
    try:
        tensors = qwenaudio.load_checkpoint(args.model, device="meta")
        ids = qwenaudio.Tokenizer.from_pretrained(args.model).encode(prompt, audio_spans=[span])
    except qwenaudio.QwenAudioError as e:
        print(f"model   not ready: {e}")
        print("        get it with: python -c \"import qwenaudio; qwenaudio.download('Qwen/Qwen-Audio')\" "
              "(see weights/README.md)")
        return
    params = sum(t.numel() for t in tensors.values())
    print(f"model   {args.model}: {len(tensors)} tensors, {params / 1e9:.3f} B parameters")
    print(f"ids     {len(ids)} prompt ids: {ids[:3]} … {ids[-6:]}")
    print("next    log-mel -> audio encoder -> spliced into the decoder -> greedy decoding "
          "(arrives with the audio, language and inference issues)")


if __name__ == "__main__":
    main()

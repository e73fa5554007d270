"""Transcribe an audio file with Qwen-Audio: load, log-mel, encode, then greedy decoding with a KV cache.

A plain loop for now; sampling, batching, stop strings and the other tasks arrive with `qwenaudio.generate`.
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
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()

    audio = qwenaudio.load_audio(args.audio)  # mono, 16 kHz, at most 30 s are heard
    span = audio_span(len(audio))
    prompt = f"<audio>{args.audio}</audio>" + ASR_TAGS.format(lang=args.language)
    try:
        tokenizer = qwenaudio.Tokenizer.from_pretrained(args.model)
        encoder = qwenaudio.load_encoder(args.model, dtype=torch.float32)  # fp32: what runs fast on a CPU
        decoder = qwenaudio.load_decoder(args.model, dtype=torch.float32)
    except qwenaudio.QwenAudioError as e:
        print(f"model not ready: {e}\nget it with: python -c \"import qwenaudio; qwenaudio.download('Qwen/Qwen-Audio')\""
              " (see weights/README.md)")
        return
    ids = tokenizer.encode(prompt, audio_spans=[span])
    print(f"{args.audio}: {len(audio) / 16000:.2f} s, {span} audio tokens, {len(ids)} prompt ids")

    decoder.setup_cache(1, len(ids) + args.max_new_tokens)
    reply: list[int] = []
    with torch.no_grad():
        features = encoder.encode(qwenaudio.log_mel_spectrogram(audio)[None], [len(audio)])
        logits = decoder(torch.tensor([ids]), audio=features)
        for step in range(args.max_new_tokens):
            token = int(logits[0, -1, : len(tokenizer)].argmax())  # only ids the tokenizer can decode
            if token == tokenizer.eod_id:
                break
            reply.append(token)
            logits = decoder(torch.tensor([[token]]), torch.tensor([len(ids) + step]))
    print(tokenizer.decode(reply, skip_special_tokens=True))


if __name__ == "__main__":
    main()

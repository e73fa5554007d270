"""The reading core: the math and checkpoint I/O of Qwen-Audio and of its successor Qwen2-Audio, and nothing else
(docs/MODEL.md states each formula).

Read it in this order, each file building only on those before it (Qwen-Audio's first; Qwen2-Audio's differences
then fit in one file, qwen2_audio.py, plus its tokenizer):

    config.py      the dimensions, from config.json and generation_config.json
    audio.py       waveform -> 80- or 128-bin log-mel, as Whisper computes it
    tokenizer.py   tiktoken BPE + Qwen-Audio's tags; `<audio>path</audio>` -> a span of placeholder ids
    encoder.py     Whisper-large-v2's encoder, average pooling, projection to the decoder's width
    decoder.py     Qwen-7B: rotary attention with dynamic NTK and logn, one forward path for training and inference
    int8.py        int8 weight-only linears, for quantized checkpoints (int4.py: the same in 4 bits)
    checkpoint.py  official tensor names, the quantization table, reading / writing shards and checkpoint dirs
    generate.py    prefill / decode_one_token over a KV cache that generation owns
    qwen2_audio.py Qwen2-Audio: its config, Whisper-large-v3 audio tower + projector, Qwen2 decoder, on the math above
    qwen2_tokenizer.py  Qwen2's BPE from vocab.json + merges.txt; `<|AUDIO|>` -> one token per audio position
    families.py    the two families: which config, modules, tokenizer and tensor names; chosen by config.json
    model.py       QwenAudio = config + tokenizer + encoder + decoder of either family, loaded from a directory;
                   generate/stream, the one entry every product path generates through

errors.py holds the exception types, checks.py the argument checks and files.py the
write-to-a-temporary-name-and-rename rule. The product
(`qwenaudio.tasks`, `chat`, `cli`, …) is built on these modules; nothing here imports it.
"""

"""Record transformers' Qwen2-Audio tokenizer, processor expansion and chat template as a golden file.

What it records, all from transformers (test-only reference), on the tokenizer files that
`qwenaudio.testing.write_qwen2_vocab` writes from the real qwen.tiktoken (the `dashscope` wheel's copy):

- `cases`: for fixed strings (CASES below), `Qwen2Tokenizer(text).input_ids` (with `split_special_tokens=True` where
  a case says so: every special token read as text), `decode(ids)` and `decode(ids, skip_special_tokens=True)`;
- `decode_only`: `decode` of id lists that no text encodes to (cut UTF-8, specials inside a character);
- `processor`: `Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer)` on texts with
  `<|AUDIO|>` and silent clips of given sample counts: the feature attention mask's sum per clip (f) and the
  expanded `input_ids`;
- `chats`: conversations (in `render_qwen2_chat`'s form, converted to transformers' messages) rendered by
  `apply_chat_template` with the Instruct template (`Qwen2AudioProcessor.default_chat_template`): the text, its
  ids (one `<|AUDIO|>` per clip, before the processor's expansion), which of those ids lie inside an assistant
  reply or are the `<|im_end|>` closing it (from the tokenizer's offset mapping: the training labels), and the
  processor's ids for the text with silent clips of 1 s, 1.5 s, 2 s, … (`samples`).

Run (from the repository root, in the venv that has transformers 5.25.0, tokenizers 0.23.3 and dashscope):

    PYTHONPATH=src python tests/golden/record_qwen2_tokenizer.py

It writes `qwen2_tokenizer_transformers.json` next to this script; the tests read it and also compare live.
"""

import hashlib
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

OUT_PATH = Path(__file__).resolve().parent / "qwen2_tokenizer_transformers.json"

# (name, text, split_special_tokens)
CASES = [
    ("hello", "Hello world!", False),
    ("newline", "\n", False),
    ("empty", "", False),
    ("contractions", "I'm sure they'll say it's 'fine', we'd've CAN'T", False),
    ("chinese", "你好，世界！今天天气很好。语音识别和翻译。", False),
    ("japanese_korean", "こんにちは世界。안녕하세요 세계", False),
    ("mixed_scripts", "Привет мир, مرحبا بالعالم, γειά σου κόσμε", False),
    ("code", "def f(x):\n\treturn x**2  # square\n\nif __name__ == '__main__':\n    print(f(3))\n", False),
    ("emoji", "🎉🎉 party 👩‍👩‍👧‍👦 family 🇨🇳🇺🇸 flags", False),
    ("whitespace_runs", "a  b   c\t\td\n\n\ne \r\n f      \n   g   ", False),
    ("numbers", "3.14159 1,000,000 2024-07-15 $5.99 1e-10 ٣٤٥ ⅷ", False),
    ("nfc", "e\u0301 cafe\u0301 A\u030a \u1e9b\u0323 Å", False),
    ("special_tokens", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|endoftext|>", False),
    ("special_glued", "a<|im_end|>b<|endoftext|><|endoftext|>c<|AUDIO|>", False),
    ("special_then_combining", "<|im_end|>\u0338x <|audio_eos|>\u0338", False),
    ("audio_prompt", "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:", False),
    ("audio_two_clips", "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
     "Which is louder?", False),
    ("v1_tags_are_text", "<audio>a.wav</audio><|en|><|transcribe|><|extra_0|><|0.00|>", False),
    ("near_specials", "<|im_start <|AUDIO| <|audio_bos|| <|Audio|> <|endoftext|", False),
    ("split_special", "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>hi<|im_end|>", True),
    ("split_special_plain", "plain text, no tags", True),
    ("url_path", "https://huggingface.co/Qwen/Qwen2-Audio-7B-Instruct/blob/main/tokenizer_config.json?x=1", False),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism", False),
    ("symbols", "!!! ??? ... --- ___ *** ~~~ <<< >>> ((( ))) ''' \"\"\" ``` ### @@@", False),
    ("control_chars", "a\x00b\x07c\x1bd\x7fe\u200bf\ufeffg", False),
    ("private_use", "\ue000\uf8ff\U000f0000 \U0010fffd", False),
    ("repeated", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa hahahahahaha 哈哈哈哈哈哈哈哈", False),
]

DECODE_ONLY = [
    ("cut_utf8", [11162, 151645, 236, 231]),  # " " and half of "🎉", a special, then its other half
    ("lone_continuation", [236, 231, 151646, 11162]),
    ("all_specials", list(range(151643, 151649))),
]

# (name, text, clip sample counts): f = ceil(min(n, 480000) / 160) mel frames, tokens = ((f-1)//2+1-2)//2+1
PROCESSOR = [
    ("one_second", "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:", [16000]),
    ("thirty_seconds", "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech:", [480000]),
    ("over_thirty_seconds", "<|audio_bos|><|AUDIO|><|audio_eos|>", [500000]),
    ("shortest", "<|audio_bos|><|AUDIO|><|audio_eos|>x", [321]),
    ("frame_edges", "A<|AUDIO|>B<|AUDIO|>C<|AUDIO|>D<|AUDIO|>", [480, 481, 640, 641]),
    ("chat_two_clips", "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|>"
     "<|AUDIO|><|audio_eos|>\nCompare.<|im_end|>\n<|im_start|>assistant\n", [23456, 160000]),
]

# (name, turns as render_qwen2_chat takes them, system or None for the default, add_generation_prompt)
CHATS = [
    ("one_clip", [["user", [{"audio": "glass.mp3"}, "What's that sound?"]]], None, True),
    ("multi_turn", [["user", [{"audio": "a.wav"}, {"text": "What's that sound?"}]],
                    ["assistant", "It is the sound of glass shattering."],
                    ["user", [{"audio": "b.wav"}, "How about this one?"]]], None, True),
    ("system_given", [["system", "You are a careful transcriber."],
                      ["user", [{"audio": "a.wav"}, {"audio": "b.wav"}, "Transcribe both."]]], None, True),
    ("system_argument", [["user", [{"audio": "a.wav"}, "Caption it."]]], "Answer in Chinese.", True),
    ("text_only", [["user", "Hello! 你好"], ["assistant", "Hi, how can I help?"], ["user", "Tell me a joke."]],
     None, True),
    ("no_generation_prompt", [["user", [{"audio": "a.wav"}, "What is said?"]],
                              ["assistant", "Mister Quilter is the apostle."]], None, False),
    ("text_between_clips", [["user", ["First ", {"audio": "a.wav"}, "then ", {"audio": "b.wav"}, "end"]],
                            ["assistant", "ok"], ["user", [{"audio": "c.wav"}]]], None, True),
    ("string_with_tokens", [["user", "<|audio_bos|><|AUDIO|><|audio_eos|>typed"]], None, True),
    ("replies_with_edges", [["user", [{"audio": "a.wav"}, "Say it."]], ["assistant", "\nHello\n\n"],
                            ["user", "Again"], ["assistant", "  two spaces"], ["user", "Once more"],
                            ["assistant", ""], ["user", "Last"], ["assistant", "Done. 好的！"]], None, False),
]


def messages(turns, system):
    """transformers' messages for `turns`: text parts as {"type": "text"}, clips as {"type": "audio"}; a system
    argument becomes a first system message (the template's default is used otherwise)."""
    out = [] if system is None else [{"role": "system", "content": system}]
    for role, content in turns:
        if not isinstance(content, str):
            content = [{"type": "audio", "audio_url": p["audio"]} if isinstance(p, dict) and "audio" in p
                       else {"type": "text", "text": p if isinstance(p, str) else p["text"]} for p in content]
        out.append({"role": role, "content": content})
    return out


def learned(tok, text, turns):
    """For each token of `text`: whether it lies inside an assistant reply or is the `<|im_end|>` that closes one,
    read from transformers' offset mapping (characters of `text`)."""
    spans, at = [], 0
    for role, content in turns:
        if role == "assistant":
            at = text.index(f"<|im_start|>assistant\n{content}<|im_end|>", at) + len("<|im_start|>assistant\n")
            spans.append((at, at + len(content) + len("<|im_end|>")))
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    return [any(a <= start and end <= b for a, b in spans) for start, end in offsets]


def main():
    import transformers
    from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

    from qwenaudio.testing import write_qwen2_vocab

    vocab = Path(__import__("dashscope").__file__).parent / "resources" / "qwen.tiktoken"
    with tempfile.TemporaryDirectory() as scratch:
        tok = AutoTokenizer.from_pretrained(write_qwen2_vocab(scratch, vocab))
        split = AutoTokenizer.from_pretrained(scratch, split_special_tokens=True)
        processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)
        template = processor.chat_template
        assert template == Qwen2AudioProcessor.default_chat_template.fget(processor)
        cases = []
        for name, text, split_special in CASES:
            ids = (split if split_special else tok)(text)["input_ids"]
            cases.append({"name": name, "text": text, "split_special_tokens": split_special, "ids": ids,
                          "decoded": tok.decode(ids), "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
        decode_only = [{"name": name, "ids": ids, "decoded": tok.decode(ids),
                        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)} for name, ids in DECODE_ONLY]
        expanded = []
        for name, text, lengths in PROCESSOR:
            out = processor(text=[text], audio=[np.zeros(n, np.float32) for n in lengths],
                            sampling_rate=16000, return_tensors="np")
            expanded.append({"name": name, "text": text, "samples": lengths,
                             "frames": out["feature_attention_mask"].sum(-1).tolist(),
                             "ids": out["input_ids"][0].tolist()})
        chats = []
        for name, turns, system, prompt in CHATS:
            text = tok.apply_chat_template(messages(turns, system), chat_template=template, tokenize=False,
                                           add_generation_prompt=prompt)
            samples = [16000 + 8000 * i for i in range(text.count("<|AUDIO|>"))]
            expanded_ids = processor(text=[text], audio=[np.zeros(n, np.float32) for n in samples] or None,
                                     sampling_rate=16000, return_tensors="np")["input_ids"][0].tolist()
            chats.append({"name": name, "turns": turns, "system": system, "add_generation_prompt": prompt,
                          "text": text, "ids": tok(text)["input_ids"], "learned": learned(tok, text, turns),
                          "samples": samples, "processor_ids": expanded_ids})
        special = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    golden = {
        "reference": {"transformers": transformers.__version__, "tokenizers": version("tokenizers"),
                      "python": sys.version.split()[0],
                      "vocab_md5": hashlib.md5(vocab.read_bytes()).hexdigest(),
                      "tokenizer_class": type(tok).__name__, "len": len(tok), "special_tokens": special},
        "cases": cases, "decode_only": decode_only, "processor": expanded, "chats": chats,
    }
    OUT_PATH.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT_PATH}: {len(cases)} cases, {len(expanded)} processor cases, {len(chats)} chats")


if __name__ == "__main__":
    main()

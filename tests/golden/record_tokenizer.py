"""Record the official Qwen-Audio tokenizer's output as a golden file.

What it records: for a fixed list of test strings (CASES below), the token ids
that the official ``QWenTokenizer`` produces, via

    tok.convert_tokens_to_ids(tok.tokenize(text, allowed_special=...,
                                           audio_info={"audio_span_tokens": spans} or None))

plus ``tok.decode(ids)`` and ``tok.decode(ids, skip_special_tokens=True)`` for
the cases without audio, and the complete official special-token table
(surface form -> id, for every id >= 151643).  It also asserts a few facts
about the official tokenizer that our implementation treats as its spec.

Which official code: QwenLM/Qwen-Audio at commit e81cc26 -- the files
tokenization_qwen.py, audio.py, qwen.tiktoken and tokenizer_config.json,
placed together in one directory OUTSIDE this repository.

How to run (in a venv that has the official code's dependencies:
transformers==4.32.0, tiktoken, torch, numpy, pillow, matplotlib, requests):

    python tests/golden/record_tokenizer.py /path/to/official/ckpt

It writes ``tokenizer_official.json`` next to this script.  It is not run by
the test suite; the tests only read the JSON it wrote.
"""

import hashlib
import json
import os
import platform
import sys
from importlib.metadata import version

CODE_REF = "QwenLM/Qwen-Audio@e81cc26 tokenization_qwen.py"
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_official.json")

# (name, text, allowed_special, audio_spans); order is kept in the output.
CASES = [
    ("hello", "Hello world!", "all", None),
    ("newline", "\n", "all", None),
    ("assistant", "assistant", "all", None),
    ("audio_label", "Audio 1:", "all", None),
    ("librispeech", "mister quilter is the apostle of the middle classes and we are glad to welcome his gospel", "all", None),
    ("edge_spaces", "  leading and trailing spaces   ", "all", None),
    ("whitespace_mix", "tabs\tand\nnewlines\r\n\r\nmixed", "all", None),
    ("whitespace_run", "   \n\n\t  ", "all", None),
    ("digits", "1234567890 and 3.14159, 1,000,000", "all", None),
    ("cjk_zh", "我们是阿里巴巴的通义千问团队。", "all", None),
    ("cjk_ja", "日本語のテキストとカタカナ、ひらがな", "all", None),
    ("hangul", "한국어 텍스트입니다", "all", None),
    ("emoji", "emoji 😀👍🏽👨‍👩‍👧 🇨🇳", "all", None),
    ("combining", "Cafe\u0301 nai\u0308ve A\u030a", "all", None),
    ("compat_chars", "\u212b \ufb01 \u00bd", "all", None),
    ("contractions", "I'm, you're, they'll, it's, we'd, I've, DON'T", "all", None),
    ("endoftext", "<|endoftext|>", "all", None),
    ("chatml", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "all", None),
    ("extras", "<|extra_0|><|extra_204|>", "all", None),
    ("asr_tags", "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>", "all", None),
    ("caption_tags", "<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_clotho|>", "all", None),
    ("languages", "<|en|><|zh|><|de|><|es|><|ko|><|fr|><|ja|><|it|><|zh_tr|>", "all", None),
    ("timestamps", "<|0.00|><|sil|><|0.54|>word<|0.86|>next<|1.17|><|29.99|><|30.00|><|timestamps|>", "all", None),
    ("caption_styles", "<|caption_audiocaps|><|audioset_ontology|><|caption_plain|><|itn|><|translate|><|keyword|>", "all", None),
    ("entities", "<|startofentityvalue|>Paris<|endofentityvalue|><|startofentitytype|>LOC<|endofentitytype|>"
                 "<|named_entity_recognition|><|audio_grounding|><|startofword|>x<|endofword|><|delim|>", "all", None),
    ("notes", "<|note_analysis|><|pitch|><|midi_pitch_0|><|midi_pitch_127|><|velocity|><|midi_velocity_0|>"
              "<|midi_velocity_127|><|sonic|><|instrument|>", "all", None),
    ("analysis_tags", "<|emotion_recognition|><|music_description|><|speaker_meta|><|song_meta|><|question|>What is it?"
                      "<|answer|><|choice|><|scene|><|event|><|vocal_classification|><|speech_understanding|><|scenario|>"
                      "<|action|><|entities|><|speech_edit|>", "all", None),
    ("audio_pad_literal", "[[[AUDIO:modality]]]", "all", None),
    ("near_miss", "<|30.01|> <|midi_pitch_128|> <|EN|> <| en |> <|extra_205|> <audio ", "all", None),
    ("nbsp", "\u00a0\u2003 nbsp and em space", "all", None),
    ("latin", "Español: ¿Dónde está la biblioteca? Français: garçon, œuvre. Deutsch: Straße", "all", None),
    ("code", "def f(x):\n    return x**2  # comment\n", "all", None),
    ("rtl", "مرحبا بالعالم שלום", "all", None),
    ("zero_width", "zero\u200bwidth\u200djoiner", "all", None),
    ("long_run", "a" * 1000 + " " + "ab" * 300, "all", None),
    ("plain_specials", "<|im_start|>hi<|transcribe|><audio>x</audio>", [], None),
    ("audio_only_special", "<|im_start|>user\nAudio 1:<audio>a.wav</audio>\n<|en|><|im_end|>", ["</audio>", "<audio>"], [4]),
    ("asr_prompt", "<audio>/data/a b/clip.wav</audio><|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>", "all", [27]),
    ("two_clips", "<|im_start|>user\nAudio 1:<audio>x.flac</audio>\nAudio 2:<audio>音频/测试.mp3</audio>\nwhat do you hear?<|im_end|>", "all", [5, 9]),
    ("tags_in_path", "<audio>weird<|en|>path.wav</audio>done", "all", [3]),
    ("empty_path", "<audio></audio>", "all", [2]),
    ("full_clip", "<audio>long.wav</audio><|startofanalysis|><|en|><|question|>what?<|answer|>", "all", [752]),
]

# Facts about the official tokenizer that our tokenizer is built on (docs/MODEL.md#special-tokens).
EXPECTED_LEN = 155165
EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|extra_204|>": 151850,
    "[[[AUDIO:modality]]]": 151851,
    "<|0.00|>": 151871,
    "<|30.00|>": 154871,
    "<|midi_pitch_0|>": 154891,
    "<|speech_edit|>": 155162,
    "<audio>": 155163,
    "</audio>": 155164,
}


def check_expected(tok):
    problems = []
    if len(tok) != EXPECTED_LEN:
        problems.append(f"len(tok) = {len(tok)}, expected {EXPECTED_LEN}")
    for surface, want in EXPECTED_IDS.items():
        got = tok.convert_tokens_to_ids(surface)
        if got != want:
            problems.append(f"id of {surface!r} = {got}, expected {want}")
    if problems:
        raise SystemExit("official tokenizer differs from docs/MODEL.md#special-tokens:\n  " + "\n  ".join(problems))


def record_case(tok, name, text, allowed, spans):
    allowed_arg = "all" if allowed == "all" else set(allowed)  # tiktoken wants a set
    audio_info = {"audio_span_tokens": spans} if spans else None
    ids = tok.convert_tokens_to_ids(tok.tokenize(text, allowed_special=allowed_arg, audio_info=audio_info))
    if any(not isinstance(i, int) for i in ids):
        raise SystemExit(f"case {name}: a token has no id: {ids}")
    decoded = skip = None
    if not spans:
        decoded = tok.decode(ids)
        skip = tok.decode(ids, skip_special_tokens=True)
    return {
        "name": name,
        "text": text,
        "allowed_special": "all" if allowed == "all" else sorted(allowed),
        "audio_spans": spans,
        "ids": ids,
        "decoded": decoded,
        "decoded_skip_special": skip,
    }


def dumps(obj, level=0):
    """json.dumps(indent=1, ensure_ascii=False), except that a list holding no
    dict or list (and a [surface, id] pair) stays on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        return "[\n" + ",\n".join(inner + dumps(x, level + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    ckpt = os.path.abspath(sys.argv[1])

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
    check_expected(tok)

    with open(os.path.join(ckpt, "qwen.tiktoken"), "rb") as f:
        vocab_md5 = hashlib.md5(f.read()).hexdigest()

    special = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    assert special[0][1] == EXPECTED_IDS["<|endoftext|>"] and len(special) == EXPECTED_LEN - special[0][1]

    out = {
        "reference": {
            "code": CODE_REF,
            "transformers": transformers.__version__,
            "tiktoken": version("tiktoken"),
            "python": platform.python_version(),
            "vocab_md5": vocab_md5,
        },
        "cases": [record_case(tok, *case) for case in CASES],
        "special_tokens": [[s, i] for s, i in special if i >= EXPECTED_IDS["<|endoftext|>"]],
    }
    with open(OUT_PATH, "w", encoding="utf-8") as f:
        f.write(dumps(out) + "\n")
    print(f"wrote {len(CASES)} cases and {len(out['special_tokens'])} special tokens to {OUT_PATH}")


if __name__ == "__main__":
    main()

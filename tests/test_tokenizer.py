"""The tag tokenizer against three references: ids recorded from the official tokenizer (tests/golden,
record_tokenizer.py), dashscope's own Qwen tokenizer run live, and ids checked by hand (docs/MODEL.md#bpe)."""

import json
import unicodedata

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwenaudio import Tokenizer, TokenizerError
from qwenaudio.core.errors import AudioTagError
from qwenaudio.core.tokenizer import AUDIO_TAGS, SPECIAL_TOKENS, audio_regions

from .conftest import GOLDEN, reference

OFFICIAL = json.loads((GOLDEN / "tokenizer_official.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in OFFICIAL["cases"]}
QWEN7B_SPECIAL_END = 151851  # dashscope knows Qwen-7B's specials (< this id), not the audio tags


def allowed(case):
    return "all" if case["allowed_special"] == "all" else set(case["allowed_special"])


@pytest.fixture(scope="module")
def dashscope_tokenizer(vocab_file):
    return reference("dashscope.tokenizers.qwen_tokenizer").QwenTokenizer(str(vocab_file))


def test_golden_covers_the_tricky_strings():
    assert len(CASES) >= 30
    assert OFFICIAL["reference"]["vocab_md5"] == "f0bffbad8c413a41d51fe6da4a7e99d7"


@pytest.mark.parametrize("name", CASES)
def test_ids_equal_official_tokenizer(tokenizer, name):
    case = CASES[name]
    ids = tokenizer.encode(case["text"], allowed_special=allowed(case), audio_spans=case["audio_spans"])
    assert ids == case["ids"]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["decoded"] is not None])
def test_decode_equals_official_tokenizer(tokenizer, name):
    case = CASES[name]
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


DASHSCOPE_CASES = [n for n, c in CASES.items() if max(c["ids"]) < QWEN7B_SPECIAL_END and c["audio_spans"] is None]


@pytest.mark.parametrize("name", DASHSCOPE_CASES)
def test_ids_equal_dashscope_tokenizer(tokenizer, dashscope_tokenizer, name):
    case = CASES[name]
    expected = dashscope_tokenizer.encode(case["text"], allowed_special=allowed(case))
    assert tokenizer.encode(case["text"], allowed_special=allowed(case)) == expected
    assert tokenizer.decode(expected) == dashscope_tokenizer.decode(expected)


@pytest.mark.parametrize("text, ids", [
    ("Hello world!", [9707, 1879, 0]), ("\n", [198]), ("assistant", [77091]), ("Audio 1:", [14755, 220, 16, 25]),
])
def test_hand_checked_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids


# First and last id of every special-token group of the official table (docs/MODEL.md#special-tokens).
GROUP_BOUNDARIES = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|extra_0|>": 151646, "<|extra_204|>": 151850, "[[[AUDIO:modality]]]": 151851,
    "<|startoftranscript|>": 151852, "<|startofanalysis|>": 151853,
    "<|translate|>": 151854, "<|keyword|>": 151857, "<|unknown|>": 151858,
    "<|en|>": 151859, "<|it|>": 151866, "<|zh_tr|>": 151867,
    "<|notimestamps|>": 151868, "<|timestamps|>": 151870, "<|0.00|>": 151871, "<|30.00|>": 154871,
    "<|caption_audiocaps|>": 154872, "<|wo_itn|>": 154877,
    "<|startofentityvalue|>": 154878, "<|endofentitytype|>": 154881,
    "<|named_entity_recognition|>": 154882, "<|delim|>": 154886,
    "<|emotion_recognition|>": 154887, "<|pitch|>": 154890,
    "<|midi_pitch_0|>": 154891, "<|midi_pitch_127|>": 155018, "<|velocity|>": 155019,
    "<|midi_velocity_0|>": 155020, "<|midi_velocity_127|>": 155147,
    "<|sonic|>": 155148, "<|speech_edit|>": 155162, "<audio>": 155163, "</audio>": 155164,
}


@pytest.mark.parametrize("token, expected", GROUP_BOUNDARIES.items())
def test_special_group_boundary_ids(tokenizer, token, expected):
    assert tokenizer.special_ids[token] == expected
    assert tokenizer.decode([expected]) == token
    if token not in AUDIO_TAGS:  # a lone audio tag is malformed input (tested below)
        assert tokenizer.encode(token) == [expected]


def test_special_table_equals_official(tokenizer):
    assert [[t, i] for t, i in tokenizer.special_ids.items()] == OFFICIAL["special_tokens"]
    assert len(tokenizer) == 155165 == 151643 + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("seconds", [0.0, 0.01, 0.29, 0.54, 1.17, 9.99, 12.3, 29.99, 30.0])
def test_timestamp_ids(tokenizer, seconds):
    cs = round(seconds * 100)
    assert tokenizer.timestamp_id(seconds) == 151871 + cs
    assert tokenizer.decode([151871 + cs]) == f"<|{seconds:.2f}|>"


@pytest.mark.parametrize("seconds", [-0.01, 30.01, 31])
def test_timestamp_out_of_range(tokenizer, seconds):
    with pytest.raises(TokenizerError, match="outside the 0.00–30.00 s range"):
        tokenizer.timestamp_id(seconds)


# Text holding <audio> or </audio> needs audio spans (or raises when unbalanced), so with every special form
# allowed the round trip is stated for text without them; with none allowed it holds for any text.
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_random_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)
    assume(not any(tag in unicodedata.normalize("NFC", text) for tag in AUDIO_TAGS))
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from([t for t in SPECIAL_TOKENS if t not in AUDIO_TAGS]))))
def test_roundtrip_text_mixed_with_tags(tokenizer, pieces):
    text = "".join(pieces)
    assert tokenizer.decode(tokenizer.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)
    assume(not any(tag in unicodedata.normalize("NFC", text) for tag in AUDIO_TAGS))
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_audio_region_expands_to_span(tokenizer):
    ids = tokenizer.encode("x<audio>a.wav</audio>y<audio>b.wav</audio>", audio_spans=[27, 3])
    start, pad, end = 155163, 151851, 155164
    x, y = tokenizer.encode("x"), tokenizer.encode("y")
    assert ids == x + [start] + [pad] * 25 + [end] + y + [start, pad, end]


def test_audio_paths(tokenizer):
    text = "Audio 1:<audio>/data/a b.wav</audio>\nAudio 2:<audio>音频/测试.mp3</audio>"
    assert tokenizer.audio_paths(text) == ["/data/a b.wav", "音频/测试.mp3"]
    assert tokenizer.audio_paths(text, allowed_special=set()) == []


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(st.sampled_from(["<audio>", "</audio>", "a.wav", " ", "<|en|>", "e\u0301", "<audio", "io>", "\n"]),
                max_size=8))
def test_audio_regions_of_text_are_the_tokenizer_s(tokenizer, pieces):
    """The text-level reading (trace and fine-tuning read prompts before a tokenizer loads) finds what the tokenizer
    finds, and refuses what it refuses."""
    text = unicodedata.normalize("NFC", "".join(pieces))
    try:
        theirs = tokenizer.audio_paths(text)
    except TokenizerError:
        with pytest.raises(AudioTagError):
            audio_regions(text)
    else:
        assert audio_regions(text) == theirs


@pytest.mark.parametrize("text, problem, before", [("<audio>a<audio>b</audio>", "nested", []),
                                                    ("<audio>a</audio></audio>", "unopened", ["a"]),
                                                    ("x</audio>", "unopened", []), ("<audio>a", "unclosed", [])])
def test_audio_regions_say_the_first_problem(text, problem, before):
    with pytest.raises(AudioTagError) as caught:
        audio_regions(text)
    assert (caught.value.problem, caught.value.regions) == (problem, before)
    assert isinstance(caught.value, TokenizerError)


@pytest.mark.parametrize("text, spans, message", [
    ("<audio>a.wav", [27], "unclosed <audio> tag"),
    ("a.wav</audio>", [27], "</audio> at token 2 has no matching <audio>"),
    ("<audio>a<audio>b</audio>", [27], "opens inside the <audio> region"),
    ("<audio>a.wav</audio>", None, "1 <audio>…</audio> region.* but no audio_spans"),
    ("<audio>a</audio><audio>b</audio>", [27], "2 <audio>…</audio> region.* but 1 audio_spans"),
    ("no audio here", [27], "audio_spans has 1 entries but the text has no <audio> region"),
    ("<audio>a.wav</audio>", [1], "audio span 1 must be an int ≥ 2"),
    ("<audio>a.wav</audio>", [27.0], "audio span 27.0 must be an int"),
])
def test_malformed_audio_regions(tokenizer, text, spans, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer.encode(text, audio_spans=spans)


def test_allowed_special_rejects_unknown_names(tokenizer):
    with pytest.raises(TokenizerError, match=r"unknown special tokens: \['<\|im_begin\|>'\]"):
        tokenizer.encode("hi", allowed_special={"<|im_begin|>", "<|im_start|>"})


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TokenizerError, match="text must be a str, got bytes"):
        tokenizer.encode(b"hi")


def test_decode_rejects_unknown_ids(tokenizer):
    assert tokenizer.decode(torch.tensor([9707, 1879, 0])) == "Hello world!"
    for bad in (155947, -1):  # past the embedding's last row, negative
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the model's range 0..155946"):
            tokenizer.decode([9707, bad])


def test_decode_shows_rows_without_text_as_placeholders(tokenizer):
    """Ids 155165–155946 are embedding rows with no text (the official decode raises KeyError on them); generation
    over the full vocabulary can choose them, so they show as `<|id_N|>` and go with the tags when skipped."""
    hello, world = tokenizer.encode("Hello world")
    ids = [hello, 155165, 155946, world, tokenizer.special_ids["<|en|>"]]
    assert tokenizer.decode(ids) == "Hello<|id_155165|><|id_155946|> world<|en|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_and_mask(tokenizer, side):
    texts = ["Hello world!", "<audio>a.wav</audio><|en|>", "\n"]
    batch = tokenizer.encode_batch(texts, audio_spans=[None, [4], None], padding_side=side)
    rows = [tokenizer.encode(texts[0]), tokenizer.encode(texts[1], audio_spans=[4]), tokenizer.encode(texts[2])]
    width = max(map(len, rows))
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, width)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    for row, ids, mask in zip(rows, batch.input_ids.tolist(), batch.attention_mask.tolist()):
        pad = width - len(row)
        if side == "left":
            assert ids == [151643] * pad + row and mask == [0] * pad + [1] * len(row)
        else:
            assert ids == row + [151643] * pad and mask == [1] * len(row) + [0] * pad


def test_batch_errors(tokenizer):
    with pytest.raises(TokenizerError, match="padding_side must be 'left' or 'right', got 'middle'"):
        tokenizer.encode_batch(["a"], padding_side="middle")
    with pytest.raises(TokenizerError, match="audio_spans has 1 entries for 2 texts"):
        tokenizer.encode_batch(["a", "b"], audio_spans=[None])


def test_vocab_from_checkpoint_directory(tiny_ckpt, tokenizer):
    assert Tokenizer.from_pretrained(tiny_ckpt).encode("Hello world!") == tokenizer.encode("Hello world!")


def test_missing_vocab(tmp_path):
    with pytest.raises(TokenizerError, match=f"vocabulary file not found: {tmp_path}/qwen.tiktoken"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_vocab_line(tmp_path, vocab_file):
    lines = vocab_file.read_bytes().splitlines(keepends=True)
    lines[1000] = b"not*base64 1000\n"
    (tmp_path / "qwen.tiktoken").write_bytes(b"".join(lines))
    with pytest.raises(TokenizerError, match=r"qwen.tiktoken:1001: corrupt vocabulary line b'not\*base64 1000'"):
        Tokenizer.from_pretrained(tmp_path)


def test_truncated_vocab(tmp_path, vocab_file):
    (tmp_path / "qwen.tiktoken").write_bytes(b"".join(vocab_file.read_bytes().splitlines(keepends=True)[:150000]))
    with pytest.raises(TokenizerError, match="expected the 151643 ranks .* found 150000 tokens"):
        Tokenizer.from_pretrained(tmp_path)

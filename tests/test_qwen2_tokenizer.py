"""Qwen2-Audio's tokenizer and Instruct chat template against transformers: ids, decodes, the processor's
`<|AUDIO|>` expansion and `apply_chat_template` recorded in tests/golden (record_qwen2_tokenizer.py) and run live,
on the tokenizer files `write_qwen2_vocab` makes from the real qwen.tiktoken."""

import json
import re
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qwenaudio.core.errors import InputError, TokenizerError
from qwenaudio.core.qwen2_tokenizer import MAX_AUDIO_TOKENS, SPECIAL_TOKENS, Qwen2Tokenizer
from qwenaudio.core.model import IGNORE_INDEX
from qwenaudio.prompts import qwen2_chat_clips, render_qwen2_chat, render_qwen2_chat_ids
from qwenaudio.testing import write_qwen2_vocab

from .conftest import GOLDEN, reference

RECORDED = json.loads((GOLDEN / "qwen2_tokenizer_transformers.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in RECORDED["cases"]}
PROCESSOR = {case["name"]: case for case in RECORDED["processor"]}
CHATS = {case["name"]: case for case in RECORDED["chats"]}
AUDIO_ID = 151646


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, vocab_file):
    return write_qwen2_vocab(tmp_path_factory.mktemp("qwen2-tokenizer"), vocab_file)


@pytest.fixture(scope="module")
def qwen2(qwen2_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_dir)


@pytest.fixture(scope="module")
def theirs(qwen2_dir):
    """transformers' tokenizer on the same files."""
    return reference("transformers").AutoTokenizer.from_pretrained(qwen2_dir)


def allowed(case):
    return set() if case["split_special_tokens"] else "all"


def one_each(text):
    """audio_spans that leave each `<|AUDIO|>` single, as the tokenizer alone (without the processor) does."""
    return [1] * text.count("<|AUDIO|>") or None


def test_golden_covers_the_tricky_strings():
    assert len(CASES) >= 25 and len(PROCESSOR) >= 5 and len(CHATS) >= 6
    assert RECORDED["reference"]["vocab_md5"] == "f0bffbad8c413a41d51fe6da4a7e99d7"


@pytest.mark.parametrize("name", CASES)
def test_ids_and_decode_equal_recorded(qwen2, name):
    case = CASES[name]
    ids = qwen2.encode(case["text"], allowed_special=allowed(case), audio_spans=one_each(case["text"]) if
                       not case["split_special_tokens"] else None)
    assert ids == case["ids"]
    assert qwen2.decode(ids) == case["decoded"]
    assert qwen2.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("case", RECORDED["decode_only"], ids=lambda c: c["name"])
def test_decode_equals_recorded(qwen2, case):
    assert qwen2.decode(case["ids"]) == case["decoded"]
    assert qwen2.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("name", CASES)
def test_ids_equal_transformers_live(qwen2, theirs, name):
    text = CASES[name]["text"]
    if CASES[name]["split_special_tokens"]:
        assert qwen2.encode(text, allowed_special=set()) == theirs(text, split_special_tokens=True)["input_ids"]
    else:
        assert qwen2.encode(text, audio_spans=one_each(text)) == theirs(text)["input_ids"]


def test_special_table(qwen2, theirs):
    expected = dict(zip(SPECIAL_TOKENS, range(151643, 151649)))
    assert RECORDED["reference"]["special_tokens"] == expected == qwen2.special_ids
    assert {t: theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == expected
    assert (qwen2.eod_id, qwen2.im_start_id, qwen2.im_end_id) == (151643, 151644, 151645)
    assert (qwen2.audio_id, qwen2.audio_bos_id, qwen2.audio_eos_id) == (151646, 151647, 151648)
    assert len(qwen2) == qwen2.vocab_size == RECORDED["reference"]["len"] == len(theirs) == 151649


# Text without surrogates (transformers cannot take them): any characters, typed special tokens among them.
TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
                          st.sampled_from(SPECIAL_TOKENS), st.sampled_from([" ", "\n", "  ", "\u0338", "\u0301"])),
                max_size=10).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_random_text_equals_transformers(qwen2, theirs, text):
    assert qwen2.encode(text, audio_spans=one_each(text)) == theirs(text)["input_ids"]
    assert qwen2.encode(text, allowed_special=set()) == theirs(text, split_special_tokens=True)["input_ids"]


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_roundtrip_random_unicode(qwen2, text):
    """Text comes back NFC-normalised: as a whole when specials are text, between the specials otherwise."""
    assert qwen2.decode(qwen2.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)
    assume("<|AUDIO|>" not in text)
    between = re.split("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text)
    assert qwen2.decode(qwen2.encode(text)) == "".join(unicodedata.normalize("NFC", p) for p in between)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 151648), max_size=12))
def test_decode_random_ids_equals_transformers(qwen2, theirs, ids):
    assert qwen2.decode(ids) == theirs.decode(ids)
    assert qwen2.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def audio_tokens(frames):
    """Audio positions of a clip with `frames` valid mel frames: the encoder's stride-2 convolution, then the
    stride-2 pooling (transformers' Qwen2AudioProcessor computes the same, as num_audio_tokens)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@pytest.mark.parametrize("name", PROCESSOR)
def test_processor_expansion_equals_recorded(qwen2, name):
    """f, the feature attention mask's sum, is ceil(n / 160) for n ≤ 480,000 samples (the mask over samples taken
    every hop of 160) and 3,000 past 30 s (the clip is cut there)."""
    case = PROCESSOR[name]
    assert case["frames"] == [min(-(-n // 160), 3000) for n in case["samples"]]
    spans = [audio_tokens(f) for f in case["frames"]]
    assert qwen2.encode(case["text"], audio_spans=spans) == case["ids"]


@pytest.mark.parametrize("name", PROCESSOR)
def test_processor_expansion_equals_transformers_live(qwen2, theirs, name):
    transformers = reference("transformers")
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000), tokenizer=theirs)
    case = PROCESSOR[name]
    out = processor(text=[case["text"]], audio=[np.zeros(n, np.float32) for n in case["samples"]],
                    sampling_rate=16000, return_tensors="np")
    spans = [audio_tokens(f) for f in out["feature_attention_mask"].sum(-1).tolist()]
    assert qwen2.encode(case["text"], audio_spans=spans) == out["input_ids"][0].tolist()


def test_thirty_seconds_is_the_most(qwen2):
    assert audio_tokens(3000) == MAX_AUDIO_TOKENS == 750
    assert qwen2.encode("<|AUDIO|>", audio_spans=[750]) == [AUDIO_ID] * 750


@pytest.mark.parametrize("text, spans, message", [
    ("<|AUDIO|>", None, r"1 <\|AUDIO\|> token.* but no audio_spans"),
    ("<|AUDIO|><|AUDIO|>", [3], r"2 <\|AUDIO\|> token.* but 1 audio_spans"),
    ("no audio here", [3], r"audio_spans has 1 entries but the text has no <\|AUDIO\|> token"),
    ("<|AUDIO|>", [0], "audio span 0 must be an int from 1 to 750"),
    ("<|AUDIO|>", [751], "audio span 751 must be an int from 1 to 750"),
    ("<|AUDIO|>", [2.0], "audio span 2.0 must be an int"),
    ("<|AUDIO|>", 3, "audio_spans must be a list of ints"),
])
def test_audio_span_errors(qwen2, text, spans, message):
    with pytest.raises(TokenizerError, match=message):
        qwen2.encode(text, audio_spans=spans)


def test_audio_as_text_needs_no_spans(qwen2):
    assert AUDIO_ID not in qwen2.encode("<|AUDIO|>", allowed_special={"<|audio_bos|>"})


def test_decode_shows_rows_without_text_as_placeholders(qwen2):
    hello, world = qwen2.encode("Hello world")
    ids = [hello, 151649, 156031, world, qwen2.audio_id]
    assert qwen2.decode(torch.tensor(ids)) == "Hello<|id_151649|><|id_156031|> world<|AUDIO|>"
    assert qwen2.decode(ids, skip_special_tokens=True) == "Hello world"
    with pytest.raises(TokenizerError, match="token id 156032 is outside the model's range 0..156031"):
        qwen2.decode([156032])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_pads_with_endoftext(qwen2, side):
    texts = ["Hello world!", "<|audio_bos|><|AUDIO|><|audio_eos|>Caption:"]
    batch = qwen2.encode_batch(texts, audio_spans=[None, [5]], padding_side=side)
    rows = [qwen2.encode(texts[0]), qwen2.encode(texts[1], audio_spans=[5])]
    width = max(map(len, rows))
    for row, ids, mask in zip(rows, batch.input_ids.tolist(), batch.attention_mask.tolist()):
        pad = [151643] * (width - len(row))
        assert ids == (pad + row if side == "left" else row + pad)
        assert mask == ([0] * len(pad) + [1] * len(row) if side == "left" else [1] * len(row) + [0] * len(pad))
    with pytest.raises(TokenizerError, match="audio_spans has 1 entries for 2 texts"):
        qwen2.encode_batch(texts, audio_spans=[None])


def test_stand_in_vocabulary(tmp_path):
    """Without qwen.tiktoken the files still load, here and in transformers, with the real special ids."""
    stand_in = Qwen2Tokenizer.from_pretrained(write_qwen2_vocab(tmp_path))
    text = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>héllo<|im_end|>"
    ids = stand_in.encode(text, audio_spans=[2])
    assert ids[:6] == [151644, 117, 115, 101, 114, 10] and ids[6:9] == [151647, AUDIO_ID, AUDIO_ID]
    assert stand_in.decode(ids) == text.replace("<|AUDIO|>", "<|AUDIO|>" * 2)
    transformers = reference("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == \
        stand_in.encode(text, audio_spans=[1])


# ------------------------------------------------------------------------------------------------ bad files

def test_specials_without_a_tokenizer_config(tmp_path, qwen2_dir, qwen2):
    """A checkpoint without tokenizer_config.json, or one that does not list its added tokens, gets the six."""
    copy(qwen2_dir, tmp_path, tokenizer_config_json='{"model_max_length": 32768}')
    assert Qwen2Tokenizer.from_pretrained(tmp_path).special_ids == qwen2.special_ids
    (tmp_path / "tokenizer_config.json").unlink()
    assert Qwen2Tokenizer.from_pretrained(tmp_path).special_ids == qwen2.special_ids


def test_surrogates_read_as_utf16(qwen2):
    assert qwen2.encode("a\ud83c\udf89b") == qwen2.encode("a🎉b")
    assert qwen2.encode("a\ud83cb<|im_end|>") == qwen2.encode("a\ufffdb<|im_end|>")


def test_missing_files(tmp_path, qwen2_dir):
    with pytest.raises(TokenizerError, match=f"vocabulary file not found: {tmp_path}/vocab.json"):
        Qwen2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_bytes((qwen2_dir / "vocab.json").read_bytes())
    with pytest.raises(TokenizerError, match=f"merges file not found: {tmp_path}/merges.txt"):
        Qwen2Tokenizer.from_pretrained(tmp_path)


def copy(qwen2_dir, to, **replace):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (to / name).write_text(replace.get(name.replace(".", "_"), (qwen2_dir / name).read_text(encoding="utf-8")),
                               encoding="utf-8")
    return to


def test_corrupt_vocab_json(tmp_path, qwen2_dir):
    lines = (qwen2_dir / "vocab.json").read_text(encoding="utf-8").splitlines()
    lines[1000] = lines[1000].replace(":", "")
    with pytest.raises(TokenizerError, match=r"vocab.json:1001: corrupt JSON \(Expecting ':' delimiter"):
        Qwen2Tokenizer.from_pretrained(copy(qwen2_dir, tmp_path, vocab_json="\n".join(lines)))


def test_vocab_json_with_a_missing_id(tmp_path, qwen2_dir):
    vocab = json.loads((qwen2_dir / "vocab.json").read_text(encoding="utf-8"))
    del vocab["Ġthe"]
    with pytest.raises(TokenizerError, match="expected the 151643 ids .* found 151642 tokens"):
        Qwen2Tokenizer.from_pretrained(copy(qwen2_dir, tmp_path, vocab_json=json.dumps(vocab)))


@pytest.mark.parametrize("line, message", [
    ("Ġ Ġ Ġ", "merges.txt:1001: corrupt merge 'Ġ Ġ Ġ'"),  # three parts
    ("ÿ ÿ", "merges.txt:1001: corrupt merge 'ÿ ÿ'"),  # bytes ff ff: both tokens, their join is not
    ("a 你", "merges.txt:1001: corrupt merge 'a 你'"),  # 你 is not a byte-level character
    ("Ġ Ġ", "merges.txt:1001: merge 'Ġ Ġ' makes id 256, after a merge that made id 1254"),  # out of rank order
])
def test_corrupt_merges_line(tmp_path, qwen2_dir, line, message):
    lines = (qwen2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1000] = line
    with pytest.raises(TokenizerError, match=re.escape(message)):
        Qwen2Tokenizer.from_pretrained(copy(qwen2_dir, tmp_path, merges_txt="\n".join(lines)))


def test_added_tokens_must_be_qwen2_audio_s(tmp_path, qwen2_dir):
    config = json.loads((qwen2_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["151647"]["content"] = "<|object_ref_end|>"
    with pytest.raises(TokenizerError, match="tokenizer_config.json: added_tokens_decoder lists .*object_ref_end"):
        Qwen2Tokenizer.from_pretrained(copy(qwen2_dir, tmp_path, tokenizer_config_json=json.dumps(config)))


# ------------------------------------------------------------------------------- the Instruct chat template

def test_chat_template_is_transformers_default():
    """The golden chats were rendered by the template transformers' processor uses when the checkpoint has none."""
    transformers = reference("transformers")
    assert "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>" in \
        transformers.Qwen2AudioProcessor.default_chat_template.fget(None)


def render(case):
    turns = [tuple(turn) for turn in case["turns"]]
    system = {} if case["system"] is None else {"system": case["system"]}
    return render_qwen2_chat(turns, add_generation_prompt=case["add_generation_prompt"], **system)


@pytest.mark.parametrize("name", CHATS)
def test_chat_equals_recorded(qwen2, name):
    case = CHATS[name]
    text = render(case)
    assert text == case["text"]
    assert qwen2.encode(text, audio_spans=one_each(text)) == case["ids"]


@pytest.mark.parametrize("name", CHATS)
def test_chat_equals_apply_chat_template_live(qwen2, theirs, name):
    from .golden.record_qwen2_tokenizer import messages

    transformers = reference("transformers")
    case = CHATS[name]
    template = transformers.Qwen2AudioProcessor.default_chat_template.fget(None)
    expected = theirs.apply_chat_template(messages(case["turns"], case["system"]), chat_template=template,
                                          tokenize=False, add_generation_prompt=case["add_generation_prompt"])
    text = render(case)
    assert text == expected
    assert qwen2.encode(text, audio_spans=one_each(text)) == theirs(expected)["input_ids"]


def audio_tokens_of(samples):
    return [audio_tokens(min(-(-n // 160), 3000)) for n in samples]


@pytest.mark.parametrize("name", CHATS)
def test_chat_ids_and_labels_equal_recorded(qwen2, name):
    """The ids are the processor's (each clip's `<|AUDIO|>` expanded); the labels keep the ids that transformers'
    offset mapping places inside an assistant reply or on the `<|im_end|>` closing it."""
    case = CHATS[name]
    turns = [tuple(turn) for turn in case["turns"]]
    system = {} if case["system"] is None else {"system": case["system"]}
    expanded = render_qwen2_chat_ids(qwen2, turns, audio_spans=audio_tokens_of(case["samples"]),
                                     add_generation_prompt=case["add_generation_prompt"], **system)
    assert expanded.ids == case["processor_ids"]
    assert expanded.clips == qwen2_chat_clips(turns)  # a typed <|AUDIO|> (string_with_tokens) has a span, no clip
    single = render_qwen2_chat_ids(qwen2, turns, audio_spans=[1] * len(case["samples"]),
                                   add_generation_prompt=case["add_generation_prompt"], **system)
    assert single.ids == case["ids"]
    assert single.labels == [i if learned else IGNORE_INDEX for i, learned in zip(case["ids"], case["learned"])]
    audio = [n for n, i in enumerate(expanded.ids) if i == AUDIO_ID]
    assert all(expanded.labels[n] == IGNORE_INDEX for n in audio)
    assert [i for i in expanded.labels if i != IGNORE_INDEX] == [i for i in single.labels if i != IGNORE_INDEX]


def test_chat_labels_hold_each_reply(qwen2):
    """Independently of the recording: each run of learned ids decodes to a reply and its <|im_end|>; the reply
    that starts with a newline shares that token with the head's newline, so it is learned from "Hello" on."""
    turns = [tuple(turn) for turn in CHATS["replies_with_edges"]["turns"]]
    rendered = render_qwen2_chat_ids(qwen2, turns, audio_spans=[7])
    runs, run = [], []
    for label in rendered.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(qwen2.decode(run))
            run = []
    assert runs == ["Hello\n\n<|im_end|>", "  two spaces<|im_end|>", "<|im_end|>", "Done. 好的！<|im_end|>"]
    assert len(rendered.labels) == len(rendered.ids) and rendered.ids.count(AUDIO_ID) == 7


def test_chat_ids_need_one_span_per_clip(qwen2):
    turns = [("user", [{"audio": "a.wav"}, {"audio": "b.wav"}, "Compare."])]
    with pytest.raises(TokenizerError, match=r"2 <\|AUDIO\|> token.* but 1 audio_spans"):
        render_qwen2_chat_ids(qwen2, turns, audio_spans=[5])
    with pytest.raises(TokenizerError, match=r"2 <\|AUDIO\|> token.* but no audio_spans"):
        render_qwen2_chat_ids(qwen2, turns)


def test_chat_clips_in_order():
    turns = [("user", ["First ", {"audio": "a.wav"}, {"audio": "b.wav"}]), ("assistant", "ok"),
             ("user", [{"text": "and"}, {"audio": "c.wav"}])]
    assert qwen2_chat_clips(turns) == ["a.wav", "b.wav", "c.wav"]
    assert render_qwen2_chat(turns).count("<|AUDIO|>") == 3


@pytest.mark.parametrize("turns, message", [
    ("hello", "turns must be a list of"),
    ([("robot", "hi")], "turn 0 must be a .role, content. pair with role one of system, user, assistant"),
    ([("user", "hi", "extra")], "turn 0 must be a"),
    ([("user", [{"video": "v.mp4"}])], "a query part must be a str"),
])
def test_chat_rejects_bad_turns(turns, message):
    with pytest.raises(InputError, match=message):
        render_qwen2_chat(turns)

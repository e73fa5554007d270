"""Generation: greedy ids against the official generate (tests/golden/generation_official.json, made by
tests/golden/record_generation.py), and the sampling pipeline on crafted logits through a scripted decoder."""

import json
from types import SimpleNamespace

import pytest
import torch

import qwenaudio
from qwenaudio import GenerationConfig, QwenAudioConfig, load_audio
from qwenaudio.core import generate as generation
from qwenaudio.core.audio import audio_span
from qwenaudio.core.decoder import KVCache
from qwenaudio.core.generate import (Session, choose, decode_one_token, generate, generate_steps, prefill,
                                     process_logits, stream_text)
from qwenaudio.testing import make_tiny_checkpoint, tiny_config

from .conftest import GOLDEN, ROOT

OFFICIAL = json.loads((GOLDEN / "generation_official.json").read_text(encoding="utf-8"))
CASES = OFFICIAL["generation"]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)


def official_config(model, **changes):
    kwargs = OFFICIAL["reference"]["generate_kwargs"]
    return model.generation_config.replace(do_sample=False, max_new_tokens=kwargs["max_new_tokens"],
                                           min_new_tokens=kwargs["min_new_tokens"], **changes)


def generate_case(model, c, **changes):
    """Our ids for a recorded case, its prompts batched as the official evaluation does."""
    clips = [load_audio(ROOT / url) for urls in c["audio_urls"] for url in urls]
    batch = model.tokenizer.encode_batch(c["texts"], audio_spans=c["audio_span_tokens"], padding_side="left")
    assert batch.input_ids.tolist() == c["input_ids"] and batch.attention_mask.tolist() == c["attention_mask"]
    # The official stop words keep their tokens and then force <|endoftext|>; stop strings do the same here.
    stops = [model.tokenizer.decode(w) for w in c.get("stop_words_ids", [])]
    with torch.no_grad():
        return generate(model.decoder, model.tokenizer, batch.input_ids, attention_mask=batch.attention_mask,
                        audio=model.encode_audio(clips), config=official_config(model, stop_strings=stops, **changes))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_ids_equal_official(model, case):
    """Over the full vocabulary, as the official generate chooses; timestamps_clip0 and batch_undecodable choose
    an embedding row without text at step 8."""
    c = CASES[case]
    replies = generate_case(model, c, full_vocab=True)
    assert replies == c["pred"]
    if c["first_undecodable"]:  # the official decode raises on those ids; with tags skipped it drops them
        assert [model.tokenizer.decode(r, skip_special_tokens=True) for r in replies] == c["text_skip_special"]
    else:
        assert [model.tokenizer.decode(r) for r in replies] == c["text"]


@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c["first_undecodable"]])
def test_default_keeps_to_decodable_ids(model, case):
    """By default a row follows the official ids up to their first undecodable choice (step 8 in clip0's row),
    then a decodable id instead; a row without one is the official row."""
    for reply, official in zip(generate_case(model, CASES[case]), CASES[case]["pred"]):
        step = next((k for k, i in enumerate(official) if i >= len(model.tokenizer)), len(official))
        assert reply[:step] == official[:step] and max(reply) < len(model.tokenizer)
        assert step in (8, len(official))


def test_stream_text_over_the_full_vocabulary(model):
    """Streamed text of a reply holding an undecodable id: the official decode with tags (and that id) skipped,
    down to the incomplete character it ends with (shown as U+FFFD, as decode does, once the reply is over)."""
    c = CASES["timestamps_clip0"]
    audio = model.encode_audio([load_audio(ROOT / c["audio_urls"][0][0])])
    config = official_config(model, full_vocab=True)
    with torch.no_grad():
        pieces = list(stream_text(model.decoder, model.tokenizer, torch.tensor(c["input_ids"]), audio=audio,
                                  config=config))
        reply = generate(model.decoder, model.tokenizer, torch.tensor(c["input_ids"]), audio=audio, config=config)
    assert reply == [c["pred"][0]] and "".join(pieces) == c["text_skip_special"][0]


def test_task_function_reproduces_official_asr(model):
    """The same ASR prompt built by qwenaudio.tasks from the wav file alone."""
    from qwenaudio import tasks

    kwargs = OFFICIAL["reference"]["generate_kwargs"]
    replies = tasks.run(model, [str(ROOT / "tests/golden/clip1.wav")], tasks.asr_task("en"),
                        max_new_tokens=kwargs["max_new_tokens"], min_new_tokens=1)
    assert replies == CASES["asr"]["pred"]


def test_timestamps_task_over_the_full_vocabulary(model):
    """qwenaudio.tasks on the prompt whose official reply holds an undecodable id: the same ids, and words whose
    text is the official text (tags and that id skipped) up to spacing."""
    from qwenaudio import tasks

    c = CASES["timestamps_clip0"]
    clip = str(ROOT / c["audio_urls"][0][0])
    options = {"max_new_tokens": OFFICIAL["reference"]["generate_kwargs"]["max_new_tokens"], "min_new_tokens": 1,
               "full_vocab": True}
    assert tasks.run(model, [clip], tasks.asr_task("en", timestamps=True), **options) == c["pred"]
    words = tasks.transcribe(model, clip, timestamps=True, **options)
    assert "".join(w.text for w in words).split() == c["text_skip_special"][0].split()


# --- the logits pipeline on crafted logits --------------------------------------------------------------------------

def sample_config(**changes):
    return GenerationConfig(do_sample=True, **changes)


def test_temperature_reshapes_but_keeps_order():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    seen = torch.zeros(1, 0, dtype=torch.long)
    hot = process_logits(logits, seen, 5, sample_config(temperature=2.0))
    torch.testing.assert_close(hot, logits / 2)
    assert hot.softmax(-1)[0, 2] < logits.softmax(-1)[0, 2]


def test_top_k_keeps_k_best():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0]])
    out = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), 5, sample_config(top_k=2))
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for top_p, kept in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.99, 4)]:
        out = process_logits(probs.log(), torch.zeros(1, 0, dtype=torch.long), 5, sample_config(top_p=top_p))
        assert int(torch.isfinite(out).sum()) == kept, top_p


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = process_logits(logits, torch.tensor([[0, 1]]), 5, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_min_new_tokens_suppresses_stops():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    config = GenerationConfig(min_new_tokens=2, stop_token_ids=(1,))
    assert process_logits(logits, torch.zeros(1, 0, dtype=torch.long), 1, config).argmax().item() == 2
    assert process_logits(logits, torch.zeros(1, 0, dtype=torch.long), 2, config).argmax().item() == 1


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(4, 1000)
    config = sample_config(top_p=0.9)
    draw = lambda seed: choose(logits, config, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


# --- the loop, through a scripted decoder ---------------------------------------------------------------------------

class ScriptedDecoder:
    """Stands in for `Decoder` in generation: its logits put all mass on the next id of each row's script."""

    def __init__(self, scripts, vocab=155947):
        self.scripts, self.vocab, self.turn, self.calls = scripts, vocab, 0, []
        self.config = QwenAudioConfig.from_dict(tiny_config(num_hidden_layers=1))  # for the KV cache's shapes
        self.embedding = SimpleNamespace(weight=torch.zeros(1))

    def embed(self, ids, audio=()):
        return ids

    def rope_base(self, valid):
        return torch.ones(valid.shape[0], dtype=torch.float64)

    def __call__(self, ids, positions, mask, base, cache=None, slots=None, *, last_only=False):
        self.calls.append(ids.shape[1])
        logits = torch.zeros(ids.shape[0], 1, self.vocab)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[min(self.turn, len(script) - 1)]] = 10.0
        self.turn += 1
        return logits


def test_rows_stop_on_their_own(tokenizer):
    decoder = ScriptedDecoder([[9707, 1879, 151643, 42], [9707, 0, 0, 0, 0, 0]])
    out = generate(decoder, tokenizer, torch.zeros(2, 3, dtype=torch.long), config=GenerationConfig(max_new_tokens=5))
    assert out == [[9707, 1879], [9707, 0, 0, 0, 0]]
    assert decoder.calls == [3, 1, 1, 1, 1]  # one prefill, then one token per step until the last row is done


def test_generate_looks_at_the_device_every_few_steps_and_replies_as_step_by_step_decoding(tokenizer, monkeypatch):
    """`generate` keeps the ids on the device and looks every CHECK_EVERY steps: a batch whose rows end by a stop id,
    by a stop string in the middle of a block (that row keeps making tokens, cut away), and by the budget gives
    the replies `generate_steps` gives step by step, with one host look per block instead of one per step."""
    from qwenaudio.core import generate as generation

    hello, world, bang = tokenizer.encode("Hello world!")
    scripts = [[hello, 151643, 42], [hello, world, bang, 42], [bang] * 30]
    config = GenerationConfig(max_new_tokens=20, stop_strings=("world",))
    stepwise = [[] for _ in scripts]
    done = [False] * len(scripts)
    for ids, finished in generate_steps(ScriptedDecoder(scripts), tokenizer, torch.zeros(3, 2, dtype=torch.long),
                                        config=config):
        for row, (token, end) in enumerate(zip(ids.tolist(), finished.tolist())):
            if not done[row] and not (end and token in config.stop_token_ids):
                stepwise[row].append(token)
            done[row] = done[row] or end
    looks = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: looks.append(t.shape) or real_tolist(t))
    decoder = ScriptedDecoder(scripts)
    assert generate(decoder, tokenizer, torch.zeros(3, 2, dtype=torch.long), config=config) == stepwise
    assert stepwise == [[hello], [hello, world], [bang] * 20]
    assert looks == [(3, 8), (3, 8), (3, 8), (3, 8), (3, 4), (3, 4)]  # ids and stop flags, after steps 8, 16, 20
    assert decoder.calls == [2] + [1] * 19 and generation.CHECK_EVERY == 8


def test_stop_strings_end_a_row(tokenizer):
    hello, world, bang = tokenizer.encode("Hello world!")
    decoder = ScriptedDecoder([[hello, world, bang, 42, 42]])
    config = GenerationConfig(max_new_tokens=5, stop_strings=("world",))
    assert generate(decoder, tokenizer, torch.zeros(1, 2, dtype=torch.long), config=config) == [[hello, world]]


def test_undecodable_ids_are_never_generated(tokenizer):
    decoder = ScriptedDecoder([[155900, 155165]])  # embedding rows the tokenizer has no text for
    out = generate(decoder, tokenizer, torch.zeros(1, 2, dtype=torch.long), config=GenerationConfig(max_new_tokens=2))
    assert all(i < len(tokenizer) for i in out[0])


def test_full_vocab_generates_rows_without_text(tokenizer):
    decoder = ScriptedDecoder([[155900, 155165]])
    config = GenerationConfig(max_new_tokens=2, full_vocab=True, stop_strings=("never",))  # stop strings decode
    out = generate(decoder, tokenizer, torch.zeros(1, 2, dtype=torch.long), config=config)
    assert out == [[155900, 155165]]


def test_stream_yields_text_pieces(tokenizer):
    ids = tokenizer.encode("Hello 世界!") + [151643]
    decoder = ScriptedDecoder([ids])
    pieces = list(stream_text(decoder, tokenizer, torch.zeros(1, 2, dtype=torch.long),
                              config=GenerationConfig(max_new_tokens=10)))
    assert "".join(pieces) == "Hello 世界!" and len(pieces) > 1 and "\ufffd" not in "".join(pieces)


def test_steps_report_finished_rows(tokenizer):
    decoder = ScriptedDecoder([[5, 151643], [5, 5, 5]])
    steps = list(generate_steps(decoder, tokenizer, torch.zeros(2, 1, dtype=torch.long),
                                config=GenerationConfig(max_new_tokens=3)))
    assert [f.tolist() for _, f in steps] == [[False, False], [True, False], [False, True]]


# --- configuration ----------------------------------------------------------------------------------------------

def test_generation_config_follows_the_checkpoint(tmp_path, vocab_file):
    base = GenerationConfig.from_json(make_tiny_checkpoint(tmp_path / "base"))
    assert (base.do_sample, base.top_k, base.top_p, base.max_new_tokens, base.stop_token_ids) == (
        True, 0, 0.8, 512, (151643,))
    chat = GenerationConfig.from_json(make_tiny_checkpoint(tmp_path / "chat", chat=True))
    assert (chat.chat_format, chat.top_p, chat.max_window_size) == ("chatml", 0.5, 6144)
    assert set(chat.stop_token_ids) == {151643, 151645, 151644}
    with pytest.raises(qwenaudio.ConfigError, match=r"unknown generation settings: \['topp'\]"):
        chat.replace(topp=0.9)


def test_full_sequence_call_after_generation(model):
    """`model(ids)` after generating with another batch size attends within its own ids: generation's KV cache
    is its own, not the model's."""
    ids = torch.randint(0, 151643, (1, 6))
    two = torch.randint(0, 151643, (2, 9))
    with torch.no_grad():
        before = model(two)
        generate(model.decoder, model.tokenizer, ids, config=GenerationConfig(max_new_tokens=2))
        assert torch.equal(model(two), before)


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_dtype_follows_native_bf16(monkeypatch, native_bf16, expected):
    """bf16 on CPUs whose oneDNN multiplies it in hardware (2-3x faster than fp32 there), fp32 elsewhere."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    assert qwenaudio.core.model.default_dtype(torch.device("cpu")) == expected


# --- settings are checked before anything runs ------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"do_sample": True, "temperature": 0}, r"temperature must be > 0, got 0; for greedy decoding use do_sample=False"),
    ({"temperature": -0.5}, r"temperature must be > 0, got -0.5"),
    ({"temperature": float("nan")}, r"temperature must be > 0, got nan"),
    ({"do_sample": True, "top_p": 0}, r"top_p must be in \(0, 1\] \(1: off\), got 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(1: off\), got 1.5"),
    ({"top_k": -1}, r"top_k must be an int >= 0 \(0: off\), got -1"),
    ({"top_k": 2.5}, r"top_k must be an int >= 0 \(0: off\), got 2.5"),
    ({"repetition_penalty": 0}, r"repetition_penalty must be > 0 \(1: off\), got 0"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1, got 0"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an int >= 1, got True"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be an int >= 0, got -1"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, r"min_new_tokens \(9\) must not exceed max_new_tokens \(8\)"),
    ({"do_sample": "yes"}, r"do_sample must be True or False, got 'yes'"),
    ({"full_vocab": 1}, r"full_vocab must be True or False, got 1"),
    ({"seed": 1.5}, r"seed must be an int >= 0 or None, got 1.5"),
    ({"stop_token_ids": ["a"]}, r"stop_token_ids must hold ints >= 0, got \('a',\)"),
    ({"stop_strings": ("",)}, r"stop_strings must hold non-empty strings, got \('',\)"),
    ({"stop_strings": "</s>"}, r"stop_strings must hold non-empty strings, got '</s>'"),
    ({"chat_format": "alpaca"}, r"chat_format must be 'raw' or 'chatml', got 'alpaca'"),
    ({"max_window_size": 0}, r"max_window_size must be an int >= 1, got 0"),
])
def test_bad_generation_settings_are_refused(changes, message):
    with pytest.raises(qwenaudio.ConfigError, match=message):
        GenerationConfig().replace(**changes)
    with pytest.raises(qwenaudio.ConfigError, match=message):
        GenerationConfig(**changes)


def test_bad_generation_config_file_names_the_file(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt")
    raw = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**raw, "top_p": 0}))
    with pytest.raises(qwenaudio.ConfigError, match=rf"{path}/generation_config.json: top_p must be in \(0, 1\]"):
        GenerationConfig.from_json(path)
    (path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(qwenaudio.ConfigError, match="generation_config.json: expected a JSON object, got list"):
        GenerationConfig.from_json(path)


def test_new_tokens_are_capped_by_the_context(model, monkeypatch):
    """A budget past the model's context (max_position_embeddings, 8192) is cut to what fits, with a warning,
    instead of allocating a KV cache for a billion positions."""
    ids = torch.randint(0, 151643, (1, 10))
    seen = {}
    original = qwenaudio.core.generate.KVCache

    def spy(config, batch, capacity, dtype, device):
        seen["slots"] = capacity
        return original(config, batch, capacity, dtype, device)

    monkeypatch.setattr(qwenaudio.core.generate, "KVCache", spy)
    with pytest.warns(UserWarning, match=r"max_new_tokens=1000000000 is cut to 8182: the prompt's 10 tokens and "
                                         r"the new ones must fit the model's context of 8192"):
        steps = generate_steps(model.decoder, model.tokenizer, ids,
                               config=GenerationConfig(max_new_tokens=10**9, stop_token_ids=(), min_new_tokens=0))
        next(steps)
    assert seen["slots"] == 8192


# --- the model's entry --------------------------------------------------------------------------------------------

def test_prefill_called_directly_builds_no_autograd_graph(model):
    """The loaded parameters keep requires_grad=True; the core's generation functions run under no_grad themselves,
    as gpt-fast's and whisper's do, so a library user who calls them needs no `with torch.no_grad()`."""
    assert next(model.decoder.parameters()).requires_grad
    ids = torch.tensor([model.tokenizer.encode("hello there")])
    session = Session(KVCache(model.config, 1, ids.shape[1] + 1, torch.float32))
    assert not prefill(model.decoder, session, ids).requires_grad
    step = decode_one_token(model.decoder, session.cache, ids[:, -1:], torch.tensor([ids.shape[1]]), session.rope_base)
    assert not step.requires_grad and not session.cache.k[0].requires_grad


def test_model_generate_equals_the_core_generate(model):
    """`QwenAudio.generate` is encode_batch, encode_audio, the settings and `generate`, put together once."""
    clips = [0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(0)), torch.zeros(8000)]
    texts = [f"<audio>{p}</audio>hi" for p in ("a.wav", "b.wav")]
    ours = model.generate(texts, [[clips[0]], [clips[1]]], max_new_tokens=5, do_sample=False, top_k=None)
    batch = model.tokenizer.encode_batch(texts, audio_spans=[[audio_span(16000)], [audio_span(8000)]])
    config = model.generation_config.replace(max_new_tokens=5, do_sample=False)
    expected = generate(model.decoder, model.tokenizer, batch.input_ids, attention_mask=batch.attention_mask,
                        audio=model.encode_audio(clips), config=config)
    assert ours == expected and all(len(r) <= 5 for r in ours)


def test_compiling_one_model_changes_no_other_generation(tiny_ckpt):
    a = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    b = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    a.compile_decoding()  # torch.compile is lazy: nothing compiles until a step runs
    assert a.decode_step is not generation.decode_one_token
    assert b.decode_step is generation.decode_one_token and not hasattr(generation, "_compiled_step")

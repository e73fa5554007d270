"""The continuous-batching engine (qwenaudio.serve.engine) on tiny checkpoints of both families, with real clips.

The reference for every reply is `model.generate` on that prompt alone with the same settings: the engine must
give the same ids whether a prompt runs alone or beside others that join and leave at other steps. Joins happen
at known step boundaries, whatever the timing: prompts are submitted from an `on_update`, which the engine thread
calls between steps.
"""

import logging
import re
import threading
import warnings

import pytest
import torch

from qwenaudio import ConfigError, GenerationConfig, InputError, cli, load_audio
from qwenaudio.core.model import load_model, prompt_batch
from qwenaudio.serve import Engine, EngineClosed, EngineStats
from qwenaudio.serve import engine as engine_module

PROMPTS = {  # (text, which clips)
    "qwen-audio": [("<audio>a.flac</audio>what do you hear?", "a"), ("<audio>b.wav</audio>", "b"),
                   ("tell me about the sea", ""), ("<audio>c.wav</audio>first<audio>a.flac</audio>then: compare", "ca"),
                   ("<audio>b.wav</audio>caption it in English please", "b"), ("hi", "")],
    "qwen2-audio": [("<|audio_bos|><|AUDIO|><|audio_eos|>What do you hear?", "a"),
                    ("<|audio_bos|><|AUDIO|><|audio_eos|>", "b"), ("Tell me about the sea.", ""),
                    ("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
                     "Compare them.", "ca"),
                    ("<|audio_bos|><|AUDIO|><|audio_eos|>Caption it in English, please.", "b"), ("Hi", "")],
}


@pytest.fixture(scope="module")
def clips(shared_audio):
    """Three real clips, 1.5 to 3 s (short, so prefill stays quick)."""
    speech, reading = load_audio(shared_audio / "1272-128104-0000.flac"), load_audio(shared_audio /
                                                                                      "1089_134686_000007_000004.wav")
    return {"a": speech[:32_000], "b": reading[16_000:64_000], "c": reading[:24_000]}


@pytest.fixture(scope="module")
def v1(tiny_ckpt):
    return load_model(tiny_ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def v2(tiny_qwen2_instruct_ckpt):
    return load_model(tiny_qwen2_instruct_ckpt, device="cpu", dtype="float32")


@pytest.fixture(params=["qwen-audio", "qwen2-audio"])
def family(request):
    return request.param


@pytest.fixture
def model(family, request):
    return request.getfixturevalue("v1" if family == "qwen-audio" else "v2")


@pytest.fixture
def engine(request):
    """An engine factory; every engine made is closed (cancelling what is left) when the test ends."""
    made = []

    def make(model, **options):
        made.append(Engine(model, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.close(drain=False, timeout=10)


def prompts(family, clips):
    return [(text, [clips[k] for k in keys]) for text, keys in PROMPTS[family]]


def ids_of(model, text, own):
    return prompt_batch(model.tokenizer, [text], [own], model.encoder.span_length).input_ids[0].tolist()


def alone(model, text, own, **settings):
    """The reference: `model.generate` on the prompt by itself."""
    return model.generate([text], [own], **settings)[0]


def submit_over_time(engine, work, joins):
    """Submit work[0] (ids, clips, config), start, and submit work[i] once joins[i] steps have run; the replies once
    all are done, and the longest queue seen. Every join must come before work[0] ends (its on_update submits
    them)."""
    replies, queued = [None] * len(work), [0]

    def on_update(reply):
        queued.append(engine.stats().queued)
        for i, at in enumerate(joins):
            if replies[i] is None and at <= engine.stats().steps:
                replies[i] = engine.submit(*work[i], on_update=on_update)

    replies[0] = engine.submit(*work[0], on_update=on_update)
    engine.start()
    replies[0].wait(timeout=60)
    assert None not in replies, "a join came after the first prompt ended"
    for reply in replies:
        reply.wait(timeout=60)
    return replies, max(queued)


# --- the same ids alone and together --------------------------------------------------------------------------------

def test_greedy_ids_equal_model_generate_alone_and_beside_others(model, family, clips, engine):
    """Six prompts of different lengths and budgets, three rows: they join at steps 0 to 9, two at once while the
    rows are full (so one queues), rows free and are taken again mid-flight; each reply equals `model.generate`
    on its prompt alone, and the same prompt through an engine by itself."""
    work, expected = [], []
    budgets = [24, 5, 8, 3, 6, 4]
    for (text, own), budget in zip(prompts(family, clips), budgets):
        config = model.generation_config.replace(do_sample=False, max_new_tokens=budget)
        work.append((ids_of(model, text, own), own, config))
        expected.append(alone(model, text, own, do_sample=False, max_new_tokens=budget))
    assert len({len(ids) for ids, _, _ in work}) == 6 and len({tuple(e) for e in expected}) == 6

    batched = engine(model, rows=3)
    replies, queued = submit_over_time(batched, work, joins=[0, 1, 2, 2, 5, 9])
    assert [r.tokens for r in replies] == expected and queued >= 1  # some waited for a row
    assert [r.finish_reason for r in replies] == ["stop" if len(e) < b else "length" for e, b in zip(expected, budgets)]
    stats = batched.stats()
    assert (stats.prompts, stats.tokens, stats.queued, stats.active) == (6, sum(map(len, expected)), 0, 0)
    assert stats.steps < sum(map(len, expected)) - 6  # rows shared steps

    by_itself = engine(model, rows=3)
    for (text, own), budget, want in zip(prompts(family, clips), budgets, expected):
        assert by_itself.generate([text], [own], do_sample=False, max_new_tokens=budget) == [want]


def test_rows_that_cross_the_attention_window_keep_their_ids(v1, engine):
    """Attention reads the slots up to the longest busy row's, rounded up to 256: a row that crosses 256 widens it
    for every row beside it, and neither row's ids change."""
    long, short = "the sea " * 123, "a short one"
    assert len(ids_of(v1, long, [])) == 247
    settings = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
    expected = [alone(v1, long, [], **settings), alone(v1, short, [], **settings)]
    assert engine(v1, rows=2, context=512).generate([long, short], **settings) == expected


def test_generate_answers_a_batch_as_the_model_does(model, family, clips, engine):
    """`Engine.generate` takes `QwenAudio.generate`'s arguments (a batch of prompts and their clips) and gives its
    result, each prompt a row of its own."""
    texts = [text for text, _ in prompts(family, clips)[:4]]
    own = [c for _, c in prompts(family, clips)[:4]]
    assert engine(model, rows=2).generate(texts, own, do_sample=False, max_new_tokens=6) == \
        [alone(model, t, c, do_sample=False, max_new_tokens=6) for t, c in zip(texts, own)]


def test_each_row_keeps_its_own_settings(model, family, clips, engine):
    """Side by side in three rows: a seeded sampled prompt, greedy ones, a stop id, a stop string, min_new_tokens
    and full_vocab; each reply equals `model.generate` alone with its settings, and a stop ends only its row."""
    work = prompts(family, clips)
    greedy = [alone(model, text, own, do_sample=False, max_new_tokens=12) for text, own in work[:4]]
    stop_id, stop_text = greedy[1][3], model.tokenizer.decode(greedy[2][2:4])
    settings = [dict(do_sample=True, seed=7, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=10),
                dict(do_sample=False, max_new_tokens=12, stop_token_ids=(stop_id,)),
                dict(do_sample=False, max_new_tokens=12, stop_strings=(stop_text,)),
                dict(do_sample=False, max_new_tokens=8, stop_token_ids=(greedy[3][0],), min_new_tokens=4),
                dict(do_sample=False, max_new_tokens=9, full_vocab=True, repetition_penalty=1.3),
                dict(do_sample=False, max_new_tokens=7)]
    expected = [alone(model, text, own, **s) for (text, own), s in zip(work, settings)]
    assert expected[1] == greedy[1][: greedy[1].index(stop_id)] and len(expected[2]) <= 4 and len(expected[3]) >= 4
    items = [(ids_of(model, text, own), own, model.generation_config.replace(**s)) for (text, own), s in
             zip(work, settings)]
    replies, _ = submit_over_time(engine(model, rows=3), items, joins=[0, 0, 1, 1, 3, 4])
    assert [r.tokens for r in replies] == expected
    assert [r.finish_reason for r in replies][1:3] == ["stop", "stop"]


def test_submit_prompts_queues_a_batch_and_hands_back_its_replies(v1, clips, engine):
    """`submit_prompts` takes `generate`'s arguments and returns at once, a queued `Reply` per prompt (the engine is
    not even started); on_update follows every row; a queued reply and a running one can be cancelled, the others
    are `model.generate`'s ids. A batch with a prompt that fills a row queues nothing; `warn=False` cuts a budget
    silently."""
    work = prompts("qwen-audio", clips)[:4]
    one = engine(v1, rows=2, context=128)
    seen = {}

    def follow(reply):
        seen.setdefault(id(reply), []).append(len(reply.tokens))
        if reply is replies[2] and len(reply.tokens) == 2:
            reply.cancel()

    replies = one.submit_prompts([t for t, _ in work], [c for _, c in work], on_update=follow, do_sample=False,
                                 max_new_tokens=6, min_new_tokens=6)
    assert [r.prompt_tokens for r in replies] == [len(ids_of(v1, t, c)) for t, c in work]
    assert not any(r.done for r in replies) and one.stats().queued == 4
    replies[1].cancel()
    one.start()
    ids = [r.wait(timeout=60) for r in replies]
    settings = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert ids[0] == alone(v1, *work[0], **settings) and ids[3] == alone(v1, *work[3], **settings)
    assert (ids[1], ids[2]) == ([], alone(v1, *work[2], **settings)[:2])
    assert [r.finish_reason for r in replies] == ["length", "cancelled", "cancelled", "length"]
    assert [seen.get(id(r)) for r in replies] == [[1, 2, 3, 4, 5, 6], [0], [1, 2, 2], [1, 2, 3, 4, 5, 6]]

    with pytest.raises(InputError, match="the prompt's 161 tokens fill the engine's context of 128 slots per row: "
                                         r"shorten it, or give the engine a longer context \(--context\)"):
        one.submit_prompts(["hello", "the sea " * 80], max_new_tokens=8)
    assert one.stats().queued == 0 and one.stats().prompts == 4  # the good prompt before it was not queued
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut, = one.submit_prompts(["hello"], warn=False, do_sample=False, max_new_tokens=1000, min_new_tokens=1000)
        assert len(cut.wait(timeout=60)) == 127 and cut.finish_reason == "length"


# --- cancelling, callbacks, failures, closing -----------------------------------------------------------------------

def test_cancelled_prompts_free_their_rows(v1, clips, engine):
    """One row: a queued prompt cancelled never starts; a running one cancelled after 3 tokens stops there and its
    row takes the next prompt, whose reply is right."""
    (text, own), (text2, own2) = prompts("qwen-audio", clips)[:2]
    config = v1.generation_config.replace(do_sample=False, max_new_tokens=30)
    one = engine(v1, rows=1)

    def cancel_at_three(reply):
        if len(reply.tokens) == 3:
            reply.cancel()

    running = one.submit(ids_of(v1, text, own), own, config, on_update=cancel_at_three)
    queued = one.submit(ids_of(v1, text2, own2), own2, config)
    queued.cancel()
    one.start()
    assert running.wait(timeout=60) == alone(v1, text, own, do_sample=False, max_new_tokens=3)
    assert (running.finish_reason, queued.wait(timeout=60), queued.finish_reason) == ("cancelled", [], "cancelled")
    assert one.generate([text2], [own2], do_sample=False, max_new_tokens=5) == \
        [alone(v1, text2, own2, do_sample=False, max_new_tokens=5)]
    assert one.stats().active == 0


def test_on_update_sees_each_token_in_order_then_the_end(v1, clips, engine):
    text, own = prompts("qwen-audio", clips)[0]
    seen = []
    one = engine(v1, rows=2)
    one.start()

    def record(reply):
        seen.append((list(reply.tokens), reply.done))
        raise RuntimeError("a broken callback")  # logged and ignored: the reply goes on

    reply = one.submit(ids_of(v1, text, own), own, v1.generation_config.replace(max_new_tokens=6, min_new_tokens=6),
                        on_update=record)
    tokens = reply.wait(timeout=60)
    assert len(tokens) == 6 and reply.finish_reason == "length"
    assert seen == [(tokens[: i + 1], i == 5) for i in range(6)]


def test_bad_prompts_are_refused_and_the_next_one_is_answered(v1, clips, engine):
    one = engine(v1, rows=2, context=64)
    one.start()
    config = v1.generation_config.replace(max_new_tokens=8)
    with pytest.raises(InputError, match="input_ids is empty"):
        one.submit([], config=config)
    with pytest.raises(InputError, match="input_ids holds 155947: a token id is an int from 0 to 155946"):
        one.submit([1, 155947], config=config)
    with pytest.raises(InputError, match="input_ids holds 2.0: a token id is an int from 0 to 155946"):
        one.submit([1, 2.0], config=config)
    with pytest.raises(InputError, match="input_ids must be a list of token ids, got str 'hello'"):
        one.submit("hello", config=config)
    with pytest.raises(InputError, match="the prompt's 60 tokens and max_new_tokens=8 do not fit the engine's "
                                         "context of 64 slots per row"):
        one.submit([1] * 60, config=config)
    with pytest.raises(InputError, match="context must be an int from 2 to the model's context length"):
        Engine(v1, context=10**6)
    with pytest.raises(InputError, match="rows must be an int >= 1, got 0"):
        Engine(v1, rows=0)
    with pytest.warns(UserWarning, match="max_new_tokens=1000 is cut to 63: the prompt's 1 tokens and the new ones "
                                         "must fit the engine's context of 64 slots per row"):
        assert len(one.generate(["hello"], max_new_tokens=1000, min_new_tokens=70)[0]) == 63
    with pytest.raises(InputError, match="the prompt's 81 tokens fill the engine's context of 64 slots per row"):
        one.generate(["the sea " * 40])
    text, own = prompts("qwen-audio", clips)[2]
    assert one.generate([text], [own], do_sample=False, max_new_tokens=5) == \
        [alone(v1, text, own, do_sample=False, max_new_tokens=5)]


def test_a_failing_prefill_or_step_fails_only_its_replies(v1, clips, engine, monkeypatch):
    """A prompt whose audio region has no clip fails at its prefill, beside a prompt that is answered; a decoding
    step that raises fails the rows in it; the engine goes on to answer the next prompt."""
    (text, own), (text2, own2) = prompts("qwen-audio", clips)[:2]
    one = engine(v1, rows=2)
    config = v1.generation_config.replace(do_sample=False, max_new_tokens=5)
    broken = one.submit(ids_of(v1, text, own), [], config)  # the region's clip is missing
    fine = one.submit(ids_of(v1, text2, own2), own2, config)
    one.start()
    with pytest.raises(InputError, match=r"the ids hold 1 <audio>…</audio> region\(s\) but 0 encoded clip\(s\)"):
        broken.wait(timeout=60)
    assert broken.finish_reason == "error" and isinstance(broken.error, InputError)
    assert fine.wait(timeout=60) == alone(v1, text2, own2, do_sample=False, max_new_tokens=5)

    def out_of_memory(*args):
        raise MemoryError("no room for the step")

    monkeypatch.setattr(v1, "decode_step", out_of_memory)
    failed = [one.submit(ids_of(v1, t, c), c, config) for t, c in prompts("qwen-audio", clips)[:2]]
    for reply in failed:
        with pytest.raises(MemoryError, match="no room for the step"):
            reply.wait(timeout=60)
        assert len(reply.tokens) == 1  # chosen from the prefill's logits before the step failed
    monkeypatch.undo()
    assert one.generate([text], [own], do_sample=False, max_new_tokens=5) == \
        [alone(v1, text, own, do_sample=False, max_new_tokens=5)]


def test_a_row_whose_choice_fails_fails_alone(v1, clips, engine, monkeypatch):
    """Choosing is per row: one row's settings that make `choose` raise (a top_p or temperature so small the
    probabilities are NaN) fail that reply only; the row beside it gets `model.generate`'s ids."""
    real = engine_module.choose

    def choose(scores, config, generator=None):
        if config.seed == 13:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(scores, config, generator)

    monkeypatch.setattr(engine_module, "choose", choose)
    (text, own), (text2, own2) = prompts("qwen-audio", clips)[:2]
    greedy = v1.generation_config.replace(do_sample=False, max_new_tokens=8)
    one = engine(v1, rows=2)
    victim = one.submit(ids_of(v1, text, own), own, greedy)
    broken = one.submit(ids_of(v1, text2, own2), own2, greedy.replace(do_sample=True, seed=13))
    one.start()
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        broken.wait(timeout=60)
    assert broken.finish_reason == "error" and broken.tokens == []
    assert victim.wait(timeout=60) == alone(v1, text, own, do_sample=False, max_new_tokens=8)


def test_an_error_the_engine_did_not_expect_fails_its_replies_never_hangs_them(v1, engine):
    """A seed torch would refuse never reaches the engine (GenerationConfig refuses it), and the engine goes on.
    An error outside any reply's work ends the engine thread: every reply queued or running fails with it, new
    prompts are refused, and `running` says so (the server's /health turns 503); no waiter is left hanging."""
    one = engine(v1, rows=2)
    one.start()
    config = v1.generation_config.replace(max_new_tokens=3, min_new_tokens=3)
    with pytest.raises(ConfigError, match="seed must be at most"):
        config.replace(do_sample=True, seed=2**64)
    assert one.submit(ids_of(v1, "hi", []), config=config.replace(do_sample=False)).wait(timeout=60) == \
        alone(v1, "hi", [], do_sample=False, max_new_tokens=3, min_new_tokens=3) and one.running

    def bug(*args):
        raise KeyError("a bug in the engine")

    failing = engine(v1, rows=2)
    failing._admit = bug
    replies = [failing.submit([1, 2, 3], config=config) for _ in range(3)]  # two rows and one queued
    failing.start()
    for reply in replies:
        with pytest.raises(KeyError, match="a bug in the engine"):
            reply.wait(timeout=60)
        assert reply.finish_reason == "error"
    failing._thread.join(timeout=60)
    assert not failing.running and failing.stats().queued == 0
    with pytest.raises(EngineClosed, match="the engine is closed"):
        failing.submit([1, 2, 3])


def test_submit_does_no_device_work_and_a_row_keeps_no_clips(v1, clips, engine, monkeypatch):
    """`submit` runs on the caller's thread (the server's event loop): its ids stay on the CPU until the engine
    admits them, since a copy to a GPU would wait for the step running there. Once encoded, a row's clips are
    dropped, not kept for the whole reply."""
    text, own = prompts("qwen-audio", clips)[0]
    one = engine(v1, rows=1)
    held = []
    with monkeypatch.context() as patched:
        patched.setattr(type(v1), "device", property(lambda model: torch.device("meta")))
        reply = one.submit(ids_of(v1, text, own), own, v1.generation_config.replace(do_sample=False, max_new_tokens=4),
                           on_update=lambda r: held.append(len(one._active[0].clips) if one._active[0] else None))
        assert one._queue[0].ids.device.type == "cpu"
    one.start()
    assert reply.wait(timeout=60) == alone(v1, text, own, do_sample=False, max_new_tokens=4)
    assert held == [0, 0, 0, None]  # the last call comes once the row is freed


def test_fit_is_the_rule_for_a_budget(v1):
    """`fit` cuts a budget (and its floor) to the room a prompt leaves in a row, keeps one that fits, and refuses a
    prompt that fills the row; `submit_prompts` follows it."""
    eight = Engine(v1, rows=1, context=64)
    config = v1.generation_config.replace(max_new_tokens=100, min_new_tokens=80)
    assert (eight.fit(config, 60).max_new_tokens, eight.fit(config, 60).min_new_tokens) == (4, 4)
    small = config.replace(max_new_tokens=4, min_new_tokens=1)
    assert eight.fit(small, 60) is small
    with pytest.raises(InputError, match="the prompt's 64 tokens fill the engine's context of 64 slots per row"):
        eight.fit(config, 64)


def test_close_drains_or_cancels(v1, clips, engine):
    (text, own), (text2, own2) = prompts("qwen-audio", clips)[:2]
    config = v1.generation_config.replace(do_sample=False, max_new_tokens=6)
    draining = engine(v1, rows=1)
    draining.start()
    replies = [draining.submit(ids_of(v1, t, c), c, config) for t, c in ((text, own), (text2, own2))]
    draining.close(drain=True, timeout=60)
    assert [r.tokens for r in replies] == [alone(v1, t, c, do_sample=False, max_new_tokens=6)
                                           for t, c in ((text, own), (text2, own2))]
    with pytest.raises(EngineClosed, match="the engine is closed: it takes no new prompts"):
        draining.submit([1, 2, 3])
    assert not draining._thread.is_alive()

    cancelling = engine(v1, rows=1)
    started = threading.Event()
    long = v1.generation_config.replace(max_new_tokens=200)
    running = cancelling.submit(ids_of(v1, text, own), own, long, on_update=lambda r: started.set())
    queued = cancelling.submit(ids_of(v1, text2, own2), own2, long)
    cancelling.start()
    assert started.wait(timeout=60)
    cancelling.close(drain=False, timeout=60)
    assert (running.finish_reason, queued.finish_reason, queued.tokens) == ("cancelled", "cancelled", [])
    assert 0 < len(running.tokens) < 200 and not cancelling._thread.is_alive()


def test_stats_and_a_never_started_engine(v1):
    idle = Engine(v1, rows=4)
    reply = idle.submit([1, 2, 3], config=GenerationConfig(max_new_tokens=2))
    assert idle.stats() == EngineStats(queued=1, active=0, rows=4, tokens=0, prompts=0, steps=0)
    idle.close()  # nothing ever ran: the queue is cancelled
    assert (reply.done, reply.finish_reason, idle.stats().prompts) == (True, "cancelled", 1)
    with pytest.raises(TimeoutError, match="the reply is not done after 0.01 s"):
        Engine(v1).submit([1, 2, 3]).wait(timeout=0.01)


# --- the KV cache's memory ------------------------------------------------------------------------------------------

def test_start_logs_the_cache_size_and_says_one_that_does_not_fit(v1, engine, monkeypatch, caplog):
    """start() logs the size of what it allocated; an allocation that fails (CUDA's OutOfMemoryError, the CPU
    allocator's RuntimeError) is an InputError naming the size and the options, and the engine can start later.
    Another RuntimeError is not dressed as memory."""
    fits = engine(v1, rows=2, context=64)
    with caplog.at_level(logging.INFO, logger="qwenaudio.serve"):
        fits.start()
    cache = fits._cache
    allocated = sum(t.nelement() * t.element_size() for t in [*cache.k, *cache.v])
    assert [r.getMessage() for r in caplog.records] == [f"KV cache: 2 rows x 64 slots, {allocated / 2**30:.3g} GiB "
                                                        "(float32 on cpu)"]
    big = f"{allocated * 8 / 2**30:.3g} GiB"  # 8 rows x 128 slots: 8 times 2 x 64

    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 40000000000000 bytes. Error code 12")]
    for failure in failures:
        def fail(*args, failure=failure):
            raise failure

        monkeypatch.setattr(engine_module, "KVCache", fail)
        refused = engine(v1, rows=8, context=128)
        with pytest.raises(InputError, match=re.escape(f"the KV cache of 8 rows x 128 slots, {big} (float32 on cpu), "
                                                       "does not fit in memory: give fewer rows (--rows) or a shorter "
                                                       "context (--context)")):
            refused.start()
        assert refused._thread is None
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine_module, "KVCache", broken)
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access was encountered$"):
        engine(v1, rows=2).start()
    monkeypatch.undo()
    assert refused.generate(["hi"], do_sample=False, max_new_tokens=3) == \
        [alone(v1, "hi", [], do_sample=False, max_new_tokens=3)]


def test_serve_says_a_cache_that_does_not_fit_before_it_listens(tiny_ckpt, monkeypatch, capsys):
    """`qwenaudio serve` allocates the cache before uvicorn starts: one that does not fit is an `error:` line and
    exit status 2, and nothing listens."""
    uvicorn = pytest.importorskip("uvicorn")

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def listen(self):
        raise AssertionError("the server started listening")

    monkeypatch.setattr(engine_module, "KVCache", out_of_memory)
    monkeypatch.setattr(uvicorn.Server, "run", listen)
    server_log = logging.getLogger("qwenaudio.serve")  # the command adds a handler on stderr (captured here)
    monkeypatch.setattr(server_log, "handlers", list(server_log.handlers))
    monkeypatch.setattr(server_log, "level", server_log.level)
    assert cli.main(["serve", "--model", str(tiny_ckpt), "--port", "0", "--rows", "3", "--context", "32",
                     "--device", "cpu", "--dtype", "float32"]) == 2
    assert "error: the KV cache of 3 rows x 32 slots, " in capsys.readouterr().err

"""Record the official Qwen-Audio greedy generation ids and Qwen-Audio-Chat context ids as a golden file.

What it records, with the official code of QwenLM/Qwen-Audio at commit e81cc26 (modeling_qwen.py ``generate`` and
``chat``, qwen_generation_utils.py ``make_context`` and ``StopWordsLogitsProcessor``, tokenization_qwen.py
``process_audio`` and ``from_list_format``, audio.py ``load_audio``) loaded through transformers' remote code in fp32
on CPU (eval, no_grad) from tiny random checkpoints built by ``qwenaudio.testing.make_tiny_checkpoint`` with the real
qwen.tiktoken:

    base = make_tiny_checkpoint(seed=0)             default tiny dims, Qwen-Audio generation_config (chat_format raw)
    chat = make_tiny_checkpoint(seed=0, chat=True)  same weights, Qwen-Audio-Chat generation_config (chatml, 6144)

Audio: two 16-bit mono 16 kHz WAV files written next to this script, clip0.wav and clip1.wav =
``round(record_encoder.make_waveform(k, n) * 32767)`` as int16 for (k, n) = (0, 8000), (1, 20800) (spans 14 and 34).
Prompts name them by the path RELATIVE to the repository root (``tests/golden/clipK.wav``), which the official
tokenizer and ffmpeg loader resolve against the working directory, so the recorded text is machine independent.

``generation`` (base checkpoint): each case is tokenized and generated exactly as eval_audio/evaluate_asr.py does it
(tokenizer.padding_side = 'left', pad_token_id = eod; ``tokenizer(texts, return_tensors='pt', padding='longest',
audio_info=[process_audio(t) for t in texts])``; ``model.generate(..., do_sample=False, max_new_tokens=24,
min_new_tokens=1, length_penalty=1.0, num_return_sequences=1, repetition_penalty=1.0, use_cache=True,
pad_token_id=151643, eos_token_id=151643, audio_info=<that list>)``).  Cases ``asr`` and ``timestamps`` (clip1 alone,
batch of one), ``batch`` (asr prompt on clip0 + caption prompt on clip1, one left-padded batch), ``asr_clip0`` (batch's
row 0 alone) and ``batch_stop`` (batch again with ``stop_words_ids`` taken from batch's own ids, so the official
StopWordsLogitsProcessor forces eos in each row and generate pads the finished row: the random model never emits
eos by itself within 24 tokens).  Cases ``timestamps_clip0`` (the timestamps prompt on clip0, batch of one) and
``batch_undecodable`` (caption prompt on clip1 + that prompt, one left-padded batch): the official greedy choice
is an id the official tokenizer cannot decode (an embedding row >= 155165) at step 8 of clip0's row; found by
running these prompts through qwenaudio with ``GenerationConfig(full_vocab=True)`` and kept because the official
run agrees.  Per case: texts,
input_ids / attention_mask as fed, audio_span_tokens per row, ``generated`` = generate's output after the prompt
columns, exactly as returned (eos and any trailing pads included), ``pred`` = evaluate_asr.py's cut at the first
151643, ``text`` = official decode of ``pred`` (None where it holds an undecodable id: the official decode raises
KeyError on those), ``first_undecodable`` (whether any generated id is >= 155165) and, only where one is,
``text_skip_special`` = official decode of ``pred`` with skip_special_tokens=True (which drops every id >= 151643).

``chat`` (chat checkpoint's tokenizer): official ``make_context`` (chatml, system "You are a helpful assistant.",
max_window_size 6144) for a two-turn conversation with one clip per turn (``turns``), what ``model.chat`` feeds to
``generate`` for those turns (captured, not generated: ``chat_feeds_same_context``), and ``window``: a text-only
four-turn history under max_window_size 60 and 6144, under the boundary sizes 24/38/52/53 (``window_boundaries``)
and a long middle turn at 45 (``window_break``); each with ``kept_history_turns``.  ``checks``: the ids that show a
typed "<|im_start|>" stays plain text while a typed "<|en|>" becomes its special id inside chat content.

How to run (same venv and official files as record_encoder.py; ffmpeg on PATH), from the repository root:

    HF_HUB_OFFLINE=1 /work/official/venv/bin/python tests/golden/record_generation.py --official-files DIR

where DIR holds the official e81cc26 files (see record_encoder.py), kept OUTSIDE this repository.  It (re)writes
clip0.wav, clip1.wav and ``generation_official.json`` next to this script; the tests only read those files.
"""

import copy
import importlib
import json
import os
import sys
import wave
from importlib.metadata import version

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helpers: model loading, synthetic clips)

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT_PATH = os.path.join(HERE, "generation_official.json")
CODE_REF = "QwenLM/Qwen-Audio@e81cc26"
CODE_FILES = ("modeling_qwen.py (generate, chat) + qwen_generation_utils.py (make_context, StopWordsLogitsProcessor) "
              "+ tokenization_qwen.py (process_audio, from_list_format) + audio.py (load_audio via ffmpeg)")
EOD = 151643
FIRST_UNDECODABLE = 155165  # ids at or above this have no token in the official tokenizer
MAX_NEW_TOKENS = 24
SYSTEM = "You are a helpful assistant."

CLIPS = {"tests/golden/clip0.wav": (0, 8000), "tests/golden/clip1.wav": (1, 20800)}  # relative to REPO_ROOT
CLIP0, CLIP1 = CLIPS
ASR_TAGS = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
TS_TAGS = "<|startoftranscript|><|en|><|transcribe|><|en|><|timestamps|><|0.00|>"
CAPTION_TAGS = "<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_clotho|>"
GENERATION_CASES = {
    "asr": [f"<audio>{CLIP1}</audio>{ASR_TAGS}"],
    "timestamps": [f"<audio>{CLIP1}</audio>{TS_TAGS}"],
    "batch": [f"<audio>{CLIP0}</audio>{ASR_TAGS}", f"<audio>{CLIP1}</audio>{CAPTION_TAGS}"],
    "asr_clip0": [f"<audio>{CLIP0}</audio>{ASR_TAGS}"],  # batch row 0 alone: no padding, clip0 encoded alone
}
# Prompts whose official greedy ids include an undecodable id (recorded after batch_stop; see the docstring).
UNDECODABLE_CASES = {
    "timestamps_clip0": [f"<audio>{CLIP0}</audio>{TS_TAGS}"],
    "batch_undecodable": [f"<audio>{CLIP1}</audio>{CAPTION_TAGS}", f"<audio>{CLIP0}</audio>{TS_TAGS}"],
}
UNDECODABLE_STEP = 8  # where clip0's timestamps row first chooses an id >= 155165
# batch_stop: the batch prompts again with stop_words_ids taken from batch's own greedy ids (row 0's token at
# step 5; row 1's tokens at steps 9-10), so the official StopWordsLogitsProcessor forces eos at steps 6 and 11.
STOP_STEPS = (5, (9, 10))
TURN_TEXTS = ["What do you hear?", "And in this one? Say <|im_start|> and <|en|> literally."]
TURN_RESPONSE = "A short tone."
WINDOW_HISTORY = [("one?", "first answer"), ("two?", "second answer"), ("three?", "third answer")]
WINDOW_QUERY = "four?"
WINDOW_SIZES = [60, 6144]  # both keep all three history turns (the budget ignores the current query)
BOUNDARY_SIZES = [24, 38, 52, 53]  # keeps 0, 1, 2, 3 history turns: a turn is kept while the total stays < the size
# a long middle turn: at 45 the newest turn fits, the middle one does not, and make_context stops there
# although the oldest turn alone would still fit
WINDOW_BREAK_HISTORY = [("one?", "first answer"), ("two? " + "word " * 20, "second answer"), ("three?", "third answer")]
WINDOW_BREAK_SIZE = 45


def write_clips():
    """clip0.wav, clip1.wav: PCM_16 mono 16 kHz with the stdlib wave module (byte-identical on every run)."""
    for rel, (k, n) in CLIPS.items():
        pcm = np.round(record_encoder.make_waveform(k, n) * 32767).astype(np.int16)
        with wave.open(os.path.join(REPO_ROOT, rel), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(record_encoder.SAMPLE_RATE)
            f.writeframes(pcm.astype("<i2").tobytes())


def check_loader(audio_module):
    """The official ffmpeg loader returns exactly int16 / 32768 of our files."""
    for rel, (k, n) in CLIPS.items():
        pcm = np.round(record_encoder.make_waveform(k, n) * 32767).astype(np.int16)
        loaded = audio_module.load_audio(rel)
        assert loaded.dtype == np.float32 and np.array_equal(loaded, pcm.astype(np.float32) / 32768.0), rel


def record_generation(model, tokenizer, texts, stop_words_ids=None):
    """One case, batched and generated exactly as eval_audio/evaluate_asr.py does (plus stop_words_ids if given)."""
    extra = {"stop_words_ids": stop_words_ids} if stop_words_ids is not None else {}
    audio_info = [tokenizer.process_audio(t) for t in texts]
    tokens = tokenizer(texts, return_tensors="pt", padding="longest", audio_info=audio_info)
    input_ids, attention_mask = tokens.input_ids, tokens.attention_mask
    output_ids = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=1, length_penalty=1.0, num_return_sequences=1, repetition_penalty=1.0, use_cache=True,
        pad_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id, audio_info=audio_info, **extra)
    assert torch.equal(output_ids[:, : input_ids.size(1)], input_ids)
    generated = output_ids[:, input_ids.size(1):].tolist()
    preds = [row[: row.index(EOD)] if EOD in row else row for row in generated]  # evaluate_asr.py's cut
    undecodable = any(i >= FIRST_UNDECODABLE for row in generated for i in row)
    skip_special = {"text_skip_special": [tokenizer.decode(p, skip_special_tokens=True) for p in preds]}
    return {
        "texts": texts,
        **extra,
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "audio_span_tokens": [info["audio_span_tokens"] for info in audio_info],
        "audio_urls": [info["audio_urls"] for info in audio_info],
        "generated": generated,
        "pred": preds,
        "text": None if undecodable else [tokenizer.decode(p) for p in preds],
        "first_undecodable": undecodable,
        **(skip_special if undecodable else {}),
    }


def decode_fails(tokenizer, ids):
    """Whether the official decode (skip_special_tokens=False) raises on `ids`, as tiktoken does for an id it lacks."""
    try:
        tokenizer.decode(ids)
    except KeyError:
        return True
    return False


def context_record(make_context, tokenizer, query, history, max_window_size):
    """The official make_context (chatml) and the audio_info it returns (process_audio of the whole raw_text)."""
    raw_text, context_tokens, audio_info = make_context(
        tokenizer, query, history=copy.deepcopy(history), system=SYSTEM, max_window_size=max_window_size,
        chat_format="chatml")
    return {
        "query": query,
        "history": [list(turn) for turn in history],
        "max_window_size": max_window_size,
        "raw_text": raw_text,
        "context_tokens": context_tokens,
        "n_tokens": len(context_tokens),
        "audio_span_tokens": audio_info["audio_span_tokens"] if audio_info else None,
        "audio_urls": audio_info["audio_urls"] if audio_info else None,
        "kept_history_turns": raw_text.count("<|im_start|>user\n") - 1,
    }


class _Captured(Exception):
    pass


def chat_feed(model, tokenizer, query, history):
    """input_ids and audio_info that the official model.chat passes to generate (generation itself not run)."""
    seen = {}

    def fake_generate(input_ids, **kwargs):
        seen["input_ids"] = input_ids.tolist()
        seen["audio_info"] = kwargs.get("audio_info")
        seen["stop_words_ids"] = kwargs.get("stop_words_ids")
        raise _Captured

    model.generate = fake_generate
    try:
        model.chat(tokenizer, query, history=history)
    except _Captured:
        pass
    finally:
        del model.generate
    return seen


def special_id(tokenizer, surface):
    return tokenizer.special_tokens[surface]


def sanity_checks(tokenizer, out):
    """Facts the report relies on; raise if the official code disagrees."""
    spans = {c: out["generation"][c]["audio_span_tokens"] for c in GENERATION_CASES}
    assert spans == {"asr": [[34]], "timestamps": [[34]], "batch": [[14], [34]], "asr_clip0": [[14]]}, spans
    turns = out["chat"]["turns"]
    assert turns[0]["audio_span_tokens"] == [14] and turns[1]["audio_span_tokens"] == [14, 34]
    im_start, en = special_id(tokenizer, "<|im_start|>"), special_id(tokenizer, "<|en|>")
    ctx = turns[1]["context_tokens"]
    # structural <|im_start|>: system, turn-1 user, turn-1 assistant, user, assistant = 5; the typed one is plain text
    assert ctx.count(im_start) == 5, ctx.count(im_start)
    typed = " Say <|im_start|> and "
    plain = tokenizer.encode(typed, allowed_special=set())
    assert all(i < EOD for i in plain)
    assert any(ctx[i : i + len(plain)] == plain for i in range(len(ctx))), (plain, ctx)
    assert ctx.count(en) == 1  # the typed <|en|> is the special id
    return {"typed_im_start_text": typed, "typed_im_start_plain_ids": plain, "en_id": en, "im_start_id": im_start,
            "im_start_count_turn2": ctx.count(im_start), "en_count_turn2": ctx.count(en)}


def dumps(obj, indent=0):
    """json with indent=1, but every list that holds no dict on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(x, dict) for x in obj):
        return "[\n" + ",\n".join(inner + dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, separators=(",", ":"))


def main():
    args = record_encoder.parse_args(__doc__.split("\n\n")[0], OUT_PATH)
    official_dir = os.path.abspath(args.official_files)
    out_path = os.path.abspath(args.out)
    os.chdir(REPO_ROOT)  # the relative clip paths in the prompts resolve against the working directory
    write_clips()

    with record_encoder.official_workdir() as work_dir:
        from transformers import AutoTokenizer

        models = {}
        for name, kwargs in {"base": {}, "chat": {"chat": True}}.items():
            os.makedirs(os.path.join(work_dir, name))
            models[name] = record_encoder.load_official_model(official_dir, os.path.join(work_dir, name), **kwargs)
        package = type(models["base"]).__module__.rsplit(".", 1)[0]  # the official modules as transformers loaded them
        check_loader(importlib.import_module(package + ".audio"))
        make_context = importlib.import_module(package + ".qwen_generation_utils").make_context
        base_tok = AutoTokenizer.from_pretrained(models["base"].name_or_path, trust_remote_code=True)
        base_tok.padding_side = "left"
        base_tok.pad_token_id = base_tok.eod_id
        chat_tok = AutoTokenizer.from_pretrained(models["chat"].name_or_path, trust_remote_code=True)
        assert len(base_tok) == FIRST_UNDECODABLE, len(base_tok)

        out = {"reference": {}, "generation": {}, "chat": {}}
        with torch.no_grad():
            for case, texts in GENERATION_CASES.items():
                out["generation"][case] = record_generation(models["base"], base_tok, texts)
            free = out["generation"]["batch"]["generated"]
            (s0, (s1a, s1b)) = STOP_STEPS
            stop_words = [[free[0][s0]], [free[1][s1a], free[1][s1b]]]
            stop = out["generation"]["batch_stop"] = record_generation(
                models["base"], base_tok, GENERATION_CASES["batch"], stop_words_ids=stop_words)
            gen = stop["generated"]
            assert len(gen[0]) == s1b + 2 and gen[1][: s1b + 1] == free[1][: s1b + 1] and gen[1][s1b + 1] == EOD
            assert gen[0][: s0 + 1] == free[0][: s0 + 1] and gen[0][s0 + 1 :] == [EOD] * (len(gen[0]) - s0 - 1)
            for case, texts in UNDECODABLE_CASES.items():
                rec = out["generation"][case] = record_generation(models["base"], base_tok, texts)
                row = rec["generated"][-1]  # clip0's timestamps row
                first = next(k for k, i in enumerate(row) if i >= FIRST_UNDECODABLE)
                assert first == UNDECODABLE_STEP, first
                assert decode_fails(base_tok, row)

            chat_model = models["chat"]
            window = chat_model.generation_config.max_window_size
            q1 = chat_tok.from_list_format([{"audio": CLIP0}, {"text": TURN_TEXTS[0]}])
            q2 = chat_tok.from_list_format([{"audio": CLIP1}, {"text": TURN_TEXTS[1]}])
            turn_args = [(q1, []), (q2, [(q1, TURN_RESPONSE)])]
            turns = [context_record(make_context, chat_tok, q, h, window) for q, h in turn_args]
            chat_same = []
            for (q, h), rec in zip(turn_args, turns):
                fed = chat_feed(chat_model, chat_tok, q, h if h else None)
                chat_same.append(fed["input_ids"] == [rec["context_tokens"]]
                                 and fed["audio_info"]["audio_span_tokens"] == rec["audio_span_tokens"]
                                 and fed["audio_info"]["audio_urls"] == rec["audio_urls"])
            assert all(chat_same), chat_same
            out["chat"] = {
                "system": SYSTEM,
                "chat_format": chat_model.generation_config.chat_format,
                "generation_config_max_window_size": window,
                "stop_words_ids": fed["stop_words_ids"],
                "turns": turns,
                "chat_feeds_same_context": chat_same,
                "window": [context_record(make_context, chat_tok, WINDOW_QUERY, WINDOW_HISTORY, w)
                           for w in WINDOW_SIZES],
                "window_boundaries": [context_record(make_context, chat_tok, WINDOW_QUERY, WINDOW_HISTORY, w)
                                      for w in BOUNDARY_SIZES],
                "window_break": context_record(make_context, chat_tok, WINDOW_QUERY, WINDOW_BREAK_HISTORY,
                                               WINDOW_BREAK_SIZE),
            }
            assert [r["kept_history_turns"] for r in out["chat"]["window"]] == [3, 3]
            assert [r["kept_history_turns"] for r in out["chat"]["window_boundaries"]] == [0, 1, 2, 3]
            assert out["chat"]["window_break"]["kept_history_turns"] == 1
        out["checks"] = sanity_checks(chat_tok, out)
        out["reference"] = {
            "code": CODE_REF,
            "files": CODE_FILES,
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "dtype": "float32, CPU, eval, no_grad",
            "checkpoint": "qwenaudio.testing.make_tiny_checkpoint(seed=0, vocab_file=qwen.tiktoken) default tiny dims "
                          "(hidden 64, 4 heads, 2 layers; audio n_state 64, 4 heads, 2 layers); generation cases use "
                          "the base generation_config, chat cases make_tiny_checkpoint(..., chat=True)",
            "clips": {rel: f"round(record_encoder.make_waveform({k}, {n}) * 32767) as int16, 16 kHz mono PCM_16 WAV"
                      for rel, (k, n) in CLIPS.items()},
            "generate_kwargs": {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": 1,
                                "length_penalty": 1.0, "num_return_sequences": 1, "repetition_penalty": 1.0,
                                "use_cache": True, "pad_token_id": EOD, "eos_token_id": EOD},
            "batching": "eval_audio/evaluate_asr.py: padding_side left, pad = eod, padding longest, "
                        "audio_info = [process_audio(text) for text in texts]",
            "base_generation_config_stop_words_ids": models["base"].generation_config.stop_words_ids,
        }

    with open(out_path, "w") as f:
        f.write(dumps(out) + "\n")
    print(f"wrote {os.path.getsize(out_path)} bytes to {out_path}")
    for case, rec in out["generation"].items():
        print(f"  {case}: input {[sum(m) for m in rec['attention_mask']]} of {len(rec['input_ids'][0])}, "
              f"spans {rec['audio_span_tokens']}, generated {rec['generated']}, undecodable {rec['first_undecodable']}")
        print(f"    text {rec['text']!r}")
    for k, rec in enumerate(out["chat"]["turns"]):
        print(f"  turn {k + 1}: {rec['n_tokens']} tokens, spans {rec['audio_span_tokens']}")
    for rec in out["chat"]["window"] + out["chat"]["window_boundaries"] + [out["chat"]["window_break"]]:
        print(f"  window {rec['max_window_size']}: {rec['n_tokens']} tokens, kept {rec['kept_history_turns']}, "
              f"raw_text {rec['raw_text']!r}")
    print(f"  checks {out['checks']}")


if __name__ == "__main__":
    main()

"""Qwen-Audio's prompts, once: each builder against the official strings and budgets written out literally, every
benchmark's prompt against its script's, and the one ChatML renderer against fine-tuning's and the official
make_context's (tests/golden/generation_official.json)."""

import json
from pathlib import Path

import pytest

from qwenaudio import InputError, evaluation, finetune, prompts
from qwenaudio.core.audio import audio_span, load_audio
from qwenaudio.core.model import IGNORE_INDEX
from qwenaudio.core.tokenizer import AUDIO_SPECIAL_TOKENS

from .test_tasks import OFFICIAL_PROMPTS

GOLDEN = json.loads((Path(__file__).parent / "golden" / "generation_official.json").read_text(encoding="utf-8"))
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP0, CLIP1 = REPO_ROOT / "tests" / "golden" / "clip0.wav", REPO_ROOT / "tests" / "golden" / "clip1.wav"

BUILT = {  # the builders that make OFFICIAL_PROMPTS (tests/test_tasks.py, written out from eval_audio/evaluate_*.py)
    "transcribe": prompts.asr(), "transcribe_zh_itn": prompts.asr("zh", itn=True),
    "timestamps": prompts.asr(timestamps=True), "translate": prompts.translation("en", "zh"),
    "caption": prompts.caption(), "question": prompts.question("is it raining?"),
    **{name: prompts.ANALYSES[name] for name in ("emotion", "vocal_sound", "scene", "note_analysis")},
}


@pytest.mark.parametrize("name", OFFICIAL_PROMPTS)
def test_builders_give_the_official_tags_and_budgets(name):
    assert BUILT[name] == prompts.Prompt(*OFFICIAL_PROMPTS[name])


def test_caption_styles_and_languages_are_checked():
    assert prompts.caption("audiocaps").tags.endswith("<|caption_audiocaps|>")
    assert prompts.caption("plain").tags.endswith("<|caption_plain|>")
    with pytest.raises(InputError, match="caption style must be one of clotho, audiocaps, plain, got 'x'"):
        prompts.caption("x")
    with pytest.raises(InputError, match="language 'xx' has no tag; Qwen-Audio knows en, zh, de, es, ko, fr, ja, it"):
        prompts.check_language("xx")
    assert prompts.check_language("unknown", allow_unknown=True) == "unknown"
    with pytest.raises(InputError, match="language 'unknown' has no tag"):
        prompts.translation("unknown", "en")


def test_a_prompt_s_text_is_the_clip_then_the_tags():
    """One rule for the whole base-model prompt: tasks, evaluation and fine-tuning all write it with `Prompt.text`."""
    assert prompts.asr().text("a b.wav") == "<audio>a b.wav</audio>" + prompts.asr().tags
    assert prompts.audio_prompt(Path("/x/c.flac"), "<|en|>") == "<audio>/x/c.flac</audio><|en|>"


# eval_audio/evaluate_*.py at e81cc26: a representative row of each script's data and the prompt it writes after
# </audio>, exactly as the script's f-string formats it, and the script's max_new_tokens.
BENCHMARK_PROMPTS = {
    "asr": ({"source": "librispeech_test_clean"}, "en",
            "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>", 256),
    "st": ({"source": "covost2_de_en_test"}, None,
           "<|startoftranscript|><|de|><|translate|><|en|><|notimestamps|><|itn|>", 256),
    "srwt": ({"source": "industrial_data_pretrain"}, "zh",
             "<|startoftranscript|><|zh|><|transcribe|><|zh|><|timestamps|><|0.00|>", 256),
    "caption": ({"source": "clotho"}, None,
                "<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_clotho|>", 30),
    "aqa": ({"source": "clothoaqa", "question": "Is it raining?"}, None,
            "<|startofanalysis|><|en|><|question|>Is it raining?<|answer|>", 4),
    "emotion": ({"source": "meld"}, None,
                "<|startofanalysis|><|en|><|keyword|><|en|><|notimestamps|><|emotion_recognition|>", 4),
    "vocal_sound": ({"source": "vocalsound"}, None,
                    "<|startofanalysis|><|en|><|keyword|><|en|><|notimestamps|><|vocal_classification|>", 4),
    "scene": ({"source": "cochlscene"}, None,
              "<|startofanalysis|><|unknown|><|keyword|><|en|><|notimestamps|><|scene|>", 10),
    "note_analysis": ({"source": "nsynth"}, None,
                      "<|startofanalysis|><|unknown|><|keyword|><|en|><|notimestamps|><|note_analysis|>", 30),
}


def test_every_benchmark_has_its_official_prompt():
    assert list(BENCHMARK_PROMPTS) == list(evaluation.BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARK_PROMPTS)
def test_benchmark_prompts_equal_the_official_scripts(name):
    row, language, official, budget = BENCHMARK_PROMPTS[name]
    assert evaluation.prompt(name, row, language) == official
    assert evaluation.BENCHMARKS[name].max_new_tokens == budget


def test_other_caption_styles_as_the_caption_script_writes_them():
    for style in prompts.CAPTION_STYLES:
        assert evaluation.prompt("caption", {}, None, style) == (
            f"<|startofanalysis|><|unknown|><|caption|><|en|><|notimestamps|><|caption_{style}|>")


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def spans(paths):
    lengths = {str(p): audio_span(len(load_audio(p))) for p in paths}
    return lengths.__getitem__


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": [{"audio": str(CLIP0)}, {"text": "What is it?"}]},
                 {"role": "assistant", "content": "A tone."}],
    "system, clips in several turns, typed markers": [
        {"role": "system", "content": "Be brief. <|im_start|>system\nnot a turn<|im_end|>"},
        {"role": "user", "content": [{"audio": str(CLIP0)}, {"text": "What do you hear?"}]},
        {"role": "assistant", "content": "A short tone. <|im_end|><|im_start|>user"},
        {"role": "user", "content": "And now? Say <|im_start|> and <|en|> literally."},
        {"role": "assistant", "content": "<|im_start|> and <|en|>"},
        {"role": "user", "content": [{"audio": str(CLIP1)}, {"audio": str(CLIP0)}, "Which is longer?"]},
        {"role": "assistant", "content": "The first."}],
    "inline clips in the system message and a query": [
        {"role": "system", "content": f"Audio 1:<audio>{CLIP1}</audio>\nRemember this clip."},
        {"role": "user", "content": f"Audio 1:<audio>{CLIP0}</audio>\nIs this the same?"},
        {"role": "assistant", "content": "No."}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_fine_tuning_learns_each_reply_of_the_rendered_conversation(tokenizer, tmp_path, name):
    """Training: every turn kept, each reply and its <|im_end|> learned (nothing else), the clips in the order the
    ids hold them, and the ids before the last reply are the inference context of the last question."""
    (example,), problems = finetune.read_examples(write_rows(tmp_path / "chat.jsonl",
                                                             [{"messages": CONVERSATIONS[name]}]))
    assert problems == []
    span_of = spans(example.audio)
    rendered = prompts.render_chat(tokenizer, example.system, example.turns, span_of=span_of)
    assert (rendered.ids, rendered.labels) == finetune.encode(tokenizer, example, span_of)
    assert rendered.clips == [str(p) for p in example.audio]
    learned = [i for i, label in zip(rendered.ids, rendered.labels) if label != IGNORE_INDEX]
    replies = [tokenizer.encode(r, allowed_special=AUDIO_SPECIAL_TOKENS) + [tokenizer.im_end_id]
               for _, r in example.turns]
    assert learned == [i for reply in replies for i in reply]
    *history, (query, _) = example.turns
    context = prompts.render_chat(tokenizer, example.system, history, query, span_of=span_of,
                                  max_window_size=10**6)
    assert rendered.ids == context.ids + replies[-1]


@pytest.mark.parametrize("case", [c for c in GOLDEN["chat"]["turns"] if c["history"]],
                         ids=lambda c: f"{len(c['history'])}-turns")
def test_fine_tuning_s_conversation_is_the_official_context_then_the_reply(tokenizer, monkeypatch, case):
    """The training ids of history + (query, reply) are the official make_context ids for that query (recorded
    from the official code), then the reply and <|im_end|>."""
    monkeypatch.chdir(REPO_ROOT)
    turns = [*(tuple(h) for h in case["history"]), (case["query"], "A reply.")]
    rendered = prompts.render_chat(tokenizer, GOLDEN["chat"]["system"], turns,
                                   span_of=spans(case["audio_urls"] or []))
    assert rendered.ids == case["context_tokens"] + tokenizer.encode("A reply.") + [tokenizer.im_end_id]


def official_cases():
    chat = GOLDEN["chat"]
    return [*chat["turns"], *chat["window"], *chat["window_boundaries"], chat["window_break"]]


@pytest.mark.parametrize("case", official_cases(), ids=lambda c: f"window{c['max_window_size']}-{c['n_tokens']}")
def test_the_renderer_equals_make_context(tokenizer, monkeypatch, case):
    """Inference: the official context ids and clips, history kept newest first within the window; the kept
    replies are what training would learn there."""
    monkeypatch.chdir(REPO_ROOT)  # the golden prompts name the clips relative to the repository
    history = [tuple(h) for h in case["history"]]
    rendered = prompts.render_chat(tokenizer, GOLDEN["chat"]["system"], history, case["query"],
                                   span_of=spans(case["audio_urls"] or []), max_window_size=case["max_window_size"])
    assert rendered.ids == case["context_tokens"] and rendered.clips == (case["audio_urls"] or [])  # None: no audio
    kept = history[len(history) - case["kept_history_turns"]:] if case["kept_history_turns"] else []
    learned = [i for i, label in zip(rendered.ids, rendered.labels) if label != IGNORE_INDEX]
    assert learned == [i for _, reply in kept for i in tokenizer.encode(reply) + [tokenizer.im_end_id]]

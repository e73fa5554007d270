"""Qwen2-Audio's base-model tasks through the library, on a tiny random Qwen2-Audio checkpoint: the prompts are the
official ones (written out literally here, with where each comes from), their ids are what transformers'
Qwen2AudioProcessor makes of them, the whole path gives transformers' greedy ids, long recordings go in windows of
at most 30 s, and what Qwen2-Audio does not have (timestamps, ITN, question answering, scene, note analysis) is
refused naming the family and the tasks it has. Also: finding the Qwen2-Audio checkpoints by repo id."""

import json
import shutil
import sys

import pytest
import torch

import qwenaudio
from qwenaudio import InputError, prompts, tasks
from qwenaudio.core.audio import N_SAMPLES, qwen2_audio_tokens
from qwenaudio.core.families import QWEN2_AUDIO, QWEN_AUDIO
from qwenaudio.hub import FILE_PATTERNS, REPO_FAMILIES, family_of_checkpoint
from qwenaudio.longform import plan_windows, stitch_texts, text_of

from .conftest import ROOT, reference
from .test_cli import FAST, qwenaudio_cli, torchrun_cli, write_wav
from .test_hub import fake_hub

CLIP = ROOT / "tests" / "golden" / "clip1.wav"  # 1.3 s
AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"  # evaluate_*.py: "<|audio_bos|><|AUDIO|><|audio_eos|>"+data['prompt']
AUDIO_BOS, AUDIO_PAD, AUDIO_EOS = 151647, 151646, 151648  # transformers' integration test's expected input ids

OFFICIAL_INSTRUCTIONS = {  # what follows the clip, as each source writes it
    # QwenLM/Qwen2-Audio README.md and the Qwen2-Audio-7B model card, the one base-model example:
    # prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    "caption": "Generate the caption in English:",
    # The rows of eval_audio's ASR JSONLs, as the toolkits that read them write them (e.g. "from jsonl in:
    # https://github.com/QwenLM/Qwen2-Audio/blob/main/eval_audio/EVALUATION.md": f'Detect the language and recognize
    # the speech: <|{lang}|>'); the paper's Figure 2 shows the same instruction.
    "transcribe": "Detect the language and recognize the speech: <|en|>",
    "transcribe_yue": "Detect the language and recognize the speech: <|yue|>",
    "detect": "Detect the language and recognize the speech:",
    # meld_eval.jsonl and vocalsound_eval.jsonl rows, as the same toolkit quotes them
    "emotion": "Recognize the emotion with keywords in English:",
    "vocal_sound": "Classify the human vocal sound to VocalSound in English:",
    # covost2_eval.jsonl is not published in the repository; the form fine-tuning and evaluation scripts use:
    # "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and translate the speech into German: <|en|>"
    "translate_en_de": "Detect the language and translate the speech into German: <|en|>",
    "translate_zh_en": "Detect the language and translate the speech into English: <|zh|>",
}
CALLS = {
    "caption": tasks.caption,
    "transcribe": lambda m, a: tasks.transcribe(m, a),
    "transcribe_yue": lambda m, a: tasks.transcribe(m, a, language="yue"),
    "detect": lambda m, a: tasks.detect_language(m, a, max_new_tokens=256),
    "emotion": tasks.emotion,
    "vocal_sound": tasks.vocal_sound,
    "translate_en_de": lambda m, a: tasks.translate(m, a, source="en", target="de"),
    "translate_zh_en": lambda m, a: tasks.translate(m, a, source="zh", target="en"),
}


@pytest.fixture(scope="module")
def model(tiny_qwen2_ckpt):
    return qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def v1_model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)


def capture(monkeypatch, replies=None) -> list[dict]:
    """Record what each model.generate call would decode (ids, mask, the clips' spans, the settings) and reply with
    `replies(batch index)` (ids per row; none by default)."""
    seen = []

    def fake_generate(decoder, tokenizer, input_ids, *, attention_mask, audio, config, **_):
        seen.append(dict(ids=input_ids.tolist(), mask=attention_mask.tolist(), spans=[len(a) for a in audio],
                         config=config))
        return replies(len(seen) - 1, input_ids.shape[0]) if replies else [[]] * input_ids.shape[0]

    monkeypatch.setattr(qwenaudio.core.model, "generate", fake_generate)  # what model.generate runs
    return seen


@pytest.mark.parametrize("name", OFFICIAL_INSTRUCTIONS)
def test_each_task_sends_the_official_prompt_and_budget(model, monkeypatch, name):
    seen = capture(monkeypatch)
    CALLS[name](model, str(CLIP))
    span = qwen2_audio_tokens(len(qwenaudio.load_audio(CLIP)))
    expected = model.tokenizer.encode(AUDIO + OFFICIAL_INSTRUCTIONS[name], audio_spans=[span])
    assert expected[: span + 2] == [AUDIO_BOS] + [AUDIO_PAD] * span + [AUDIO_EOS]
    (call,) = seen
    assert call["ids"] == [expected] and call["mask"] == [[1] * len(expected)] and call["spans"] == [span]
    config = call["config"]  # evaluate_*.py: max_new_tokens=256, min_new_tokens=1, do_sample=False
    assert (config.max_new_tokens, config.min_new_tokens, config.do_sample) == (256, 1, False)


def test_prompt_texts_are_the_official_strings():
    assert prompts.QWEN2_ANALYSES["caption"].text() == \
        "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    assert prompts.qwen2_asr("zh").text("ignored.wav") == \
        "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|zh|>"
    assert prompts.family_tasks(QWEN2_AUDIO) is prompts.QWEN2_TASKS
    assert prompts.family_tasks(QWEN_AUDIO) is prompts.QWEN_AUDIO_TASKS
    assert prompts.QWEN2_TASKS.names == ("transcribe", "translate", "caption", "emotion", "vocal_sound")


def test_ids_equal_the_processors(tiny_qwen2_ckpt):
    """transformers' Qwen2AudioProcessor (its tokenizer from the checkpoint's files) makes the same ids of each
    prompt and clip: the `<|AUDIO|>` expanded to the clip's positions, the instruction tokenized alike."""
    transformers = reference("transformers")
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_qwen2_ckpt))
    ours = qwenaudio.core.qwen2_tokenizer.Qwen2Tokenizer(tiny_qwen2_ckpt)
    clip = qwenaudio.load_audio(CLIP)
    for instruction in OFFICIAL_INSTRUCTIONS.values():
        theirs = processor(text=AUDIO + instruction, audio=[clip.numpy()], sampling_rate=16_000, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours.encode(AUDIO + instruction,
                                                               audio_spans=[qwen2_audio_tokens(len(clip))])


def test_transcribe_gives_transformers_greedy_reply(model, tiny_qwen2_ckpt):
    """The whole path (load, front end, prompt, generate, decode) against Qwen2AudioForConditionalGeneration's
    greedy ids for the same prompt (all 156,032 rows chosen from, as transformers does)."""
    transformers = reference("transformers")
    reference_model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
        tiny_qwen2_ckpt, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_ckpt)
    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)
    clip = qwenaudio.load_audio(CLIP)
    inputs = processor(text=AUDIO + OFFICIAL_INSTRUCTIONS["transcribe"], audio=[clip.numpy()], sampling_rate=16_000,
                       return_tensors="pt")
    with torch.no_grad():
        out = reference_model.generate(**inputs, max_new_tokens=8, min_new_tokens=1, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert tasks.run(model, clip, prompts.qwen2_asr("en"), max_new_tokens=8, full_vocab=True) == [theirs]
    text = tasks.transcribe(model, str(CLIP), max_new_tokens=8, full_vocab=True)
    assert text == tokenizer.decode(theirs, skip_special_tokens=True).strip() and text


def test_a_batch_gives_one_text_per_clip(model):
    one = tasks.transcribe(model, str(CLIP), max_new_tokens=4)
    two = tasks.transcribe(model, [str(CLIP), ROOT / "tests" / "golden" / "clip0.wav"], max_new_tokens=4)
    assert isinstance(one, str) and isinstance(two, list) and len(two) == 2 and two[0] == one
    assert all(isinstance(t, str) for t in tasks.caption(model, [str(CLIP)] * 2, max_new_tokens=3))


def test_the_language_tag_a_reply_starts_with(model, monkeypatch):
    """Told no language, the model names it first (`<|zh|>你好。`, the paper's Figure 2): detect_language reads it,
    transcribe leaves it out."""
    reply = model.tokenizer.encode("<|zh|>你好。")
    capture(monkeypatch, lambda _, rows: [reply] * rows)
    assert tasks.detect_language(model, str(CLIP)) == "zh"
    assert tasks.detect_language(model, [str(CLIP)] * 2) == ["zh", "zh"]
    assert tasks.transcribe(model, str(CLIP), language=None) == "你好。"
    assert prompts.split_language(" <|en|> hello") == ("en", " hello")
    assert prompts.split_language("hello <|en|>") == (None, "hello <|en|>")


def test_a_long_recording_goes_in_windows_of_at_most_30_s(model, monkeypatch, shared_audio):
    """music.wav (96 s): the windows `longform.plan_windows` cuts, each ≤ 30 s (the 480,000 samples the front end
    hears), each sent with the plain ASR instruction (no timestamps), and the replies stitched as text."""
    audio = qwenaudio.load_audio(shared_audio / "music.wav")
    windows = plan_windows(audio)
    assert len(audio) > 3 * N_SAMPLES and len(windows) >= 4
    assert all(w.end - w.start <= N_SAMPLES for w in windows)
    assert windows[0].start == 0 and windows[-1].end == len(audio)
    words = {}

    def replies(call: int, rows: int) -> list[list[int]]:
        return [model.tokenizer.encode(words.setdefault((call, r), f"window{len(words)}")) for r in range(rows)]

    seen = capture(monkeypatch, replies)
    progress = []
    (parts,) = tasks.segments(model, [audio], prompts.qwen2_asr("en"), progress=lambda *a: progress.append(a))
    spans = [s for call in seen for s in call["spans"]]
    assert spans == [qwen2_audio_tokens(w.end - w.start) for w in windows] and max(spans) <= 750
    instruction = model.tokenizer.encode(OFFICIAL_INSTRUCTIONS["transcribe"])
    assert all(row[-len(instruction):] == instruction for call in seen for row in call["ids"])
    assert text_of(parts) == text_of(stitch_texts(windows, list(words.values())))
    assert [(p.start, p.end) for p in parts] == [(p.start, p.end) for p in stitch_texts(windows, list(words.values()))]
    assert progress[-1] == (0, len(windows), len(windows))


def test_a_long_recording_through_the_model(model, shared_audio):
    text = tasks.transcribe(model, shared_audio / "music.wav", max_new_tokens=3)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("call, message", [
    (lambda m: tasks.transcribe(m, str(CLIP), timestamps=True), "Qwen2-Audio has no timestamps"),
    (lambda m: tasks.transcribe(m, str(CLIP), itn=True), "Qwen2-Audio has no itn"),
    (lambda m: tasks.scene(m, str(CLIP)), "Qwen2-Audio has no task 'scene'"),
    (lambda m: tasks.note_analysis(m, str(CLIP)), "Qwen2-Audio has no task 'note_analysis'"),
    (lambda m: tasks.analyse(m, str(CLIP), "note_analysis"), "Qwen2-Audio has no task 'note_analysis'"),
    (lambda m: tasks.answer(m, str(CLIP), "why?"), "Qwen2-Audio has no question answering"),
    (lambda m: tasks.transcribe(m, str(CLIP), language="ko"),
     "language 'ko' has no tag; Qwen2-Audio knows en, zh, yue, fr, de, es, it$"),
    (lambda m: tasks.translate(m, str(CLIP), target="xx"), "language 'xx' has no tag; Qwen2-Audio knows"),
    (lambda m: tasks.run(m, str(CLIP), prompts.asr()), "Qwen2-Audio reads prompts.Instructions"),
    (lambda m: tasks.analyse(m, str(CLIP), "karaoke"), "unknown task 'karaoke'; choose from caption, emotion, "
                                                       "vocal_sound$"),
])
def test_what_qwen2_audio_does_not_have_is_refused(model, call, message):
    with pytest.raises(InputError, match=message) as refused:
        call(model)
    if "has no" in message and "tag" not in message:
        assert "its base-model tasks are transcribe, translate, caption, emotion, vocal_sound" in str(refused.value)


@pytest.mark.parametrize("call, message", [
    (lambda m: tasks.detect_language(m, str(CLIP)), "Qwen-Audio has no language detection; its base-model tasks "
                                                    "are transcribe, translate, question, caption"),
    (lambda m: tasks.run(m, str(CLIP), prompts.qwen2_asr()), "Qwen-Audio reads prompts.Prompts"),
    (lambda m: tasks.transcribe(m, str(CLIP), language="yue"), "language 'yue' has no tag; Qwen-Audio knows"),
])
def test_qwen2_audio_s_prompts_are_refused_on_qwen_audio(v1_model, call, message):
    with pytest.raises(InputError, match=message):
        call(v1_model)


def test_qwen_audio_still_gets_its_tags(v1_model, monkeypatch):
    seen = capture(monkeypatch)
    tasks.transcribe(v1_model, str(CLIP))
    tags = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
    assert seen[0]["ids"] == [v1_model.tokenizer.encode(f"<audio>{CLIP}</audio>{tags}", audio_spans=[34])]
    assert seen[0]["config"].min_new_tokens == 0  # Qwen-Audio's evaluation sets no floor


# --- finding the checkpoints ---------------------------------------------------------------------------------------

@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache of the test's own and no $QWENAUDIO_HOME, as test_hub's tests have."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("QWENAUDIO_HOME", raising=False)


def test_the_qwen2_audio_repos_are_known_without_a_download(empty_cache):
    assert REPO_FAMILIES["Qwen/Qwen2-Audio-7B"] is REPO_FAMILIES["Qwen/Qwen2-Audio-7B-Instruct"] is QWEN2_AUDIO
    assert family_of_checkpoint("Qwen/Qwen2-Audio-7B-Instruct") is QWEN2_AUDIO
    assert family_of_checkpoint("Qwen/Qwen-Audio") is QWEN_AUDIO
    assert family_of_checkpoint("someone/unknown") is None and family_of_checkpoint("no/such/dir") is None


def test_a_directory_says_its_family(tiny_qwen2_ckpt, tiny_ckpt, tmp_path):
    assert family_of_checkpoint(tiny_qwen2_ckpt) is QWEN2_AUDIO and family_of_checkpoint(str(tiny_ckpt)) is QWEN_AUDIO
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert family_of_checkpoint(tmp_path) is None  # loading it says why


def test_load_the_instruct_repo_id(empty_cache, monkeypatch, tmp_path, tiny_qwen2_instruct_ckpt):
    calls = fake_hub(monkeypatch, lambda d: shutil.copytree(tiny_qwen2_instruct_ckpt, d))
    model = qwenaudio.load("Qwen/Qwen2-Audio-7B-Instruct", dtype=torch.float32, progress=False)
    assert model.family is QWEN2_AUDIO and calls == [("Qwen/Qwen2-Audio-7B-Instruct", None, None, FILE_PATTERNS)]
    assert {"*.json", "merges.txt", "*.safetensors"} <= set(FILE_PATTERNS)  # vocab.json, merges.txt, the shards
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2-Audio-7B-Instruct" / "snapshots" / "0123abcd"
    assert qwenaudio.hub.resolve("Qwen/Qwen2-Audio-7B-Instruct") == snapshot  # found in the cache the second time
    assert len(calls) == 1 and family_of_checkpoint("Qwen/Qwen2-Audio-7B-Instruct") is QWEN2_AUDIO


def test_placing_qwen2_audio_by_hand_names_its_files(empty_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(qwenaudio.DownloadError, match="vocab.json, merges.txt, model.safetensors.index.json and "
                                                      "every model-0000N-of-00005.safetensors"):
        qwenaudio.load("Qwen/Qwen2-Audio-7B", progress=False)


# --- the `qwenaudio transcribe` command ----------------------------------------------------------------------------

F32 = ("--dtype", "float32")  # as the `model` fixture, whose replies the command's must equal


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    """A folder of two 2 s recordings."""
    root = tmp_path_factory.mktemp("qwen2-audio-wavs")
    write_wav(root / "a.wav", seed=0), write_wav(root / "b.wav", seed=1)
    return root


@pytest.mark.slow
def test_the_command_transcribes_a_folder_and_resumes(tiny_qwen2_ckpt, model, wavs, tmp_path):
    out = tmp_path / "out"
    done = qwenaudio_cli("transcribe", wavs, "--model", tiny_qwen2_ckpt, "--format", "json", "--output-dir", out,
                         *FAST, *F32, home=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("a", "b"):
        record = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert record["text"] == tasks.transcribe(model, [wavs / f"{name}.wav"], max_new_tokens=8)[0] != ""
        assert record["words"] == [] and record["task"] == "transcribe"
    assert json.loads((out / "summary.json").read_text())["settings"]["language"] == "en"
    again = qwenaudio_cli("transcribe", wavs, "--model", tiny_qwen2_ckpt, "--format", "json", "--output-dir", out,
                          *FAST, *F32, home=tmp_path)
    assert again.returncode == 0 and "0 done, 2 skipped (outputs exist)" in again.stderr, again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task, options", [("translate", ["--language", "zh", "--target-language", "en"]),
                                           ("caption", []), ("emotion", []), ("vocal_sound", [])])
def test_the_command_runs_qwen2_audio_s_other_tasks(tiny_qwen2_ckpt, model, wavs, tmp_path, task, options):
    done = qwenaudio_cli("transcribe", wavs / "a.wav", "--task", task, *options, "--model", tiny_qwen2_ckpt, *FAST,
                         *F32, home=tmp_path)
    assert done.returncode == 0, done.stderr
    call = {"translate": lambda: tasks.translate(model, [wavs / "a.wav"], source="zh", target="en", max_new_tokens=8)
            }.get(task, lambda: tasks.analyse(model, [wavs / "a.wav"], task, max_new_tokens=8))
    assert done.stdout == call()[0] + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("options, message", [
    (["--timestamps"], "Qwen2-Audio has no timestamps: --timestamps and --format srt, vtt and all"),
    (["--format", "srt"], "Qwen2-Audio has no timestamps"),
    (["--format", "all", "--output-dir", "OUT"], "Qwen2-Audio has no timestamps"),
    (["--itn"], "Qwen2-Audio has no itn; its base-model tasks are transcribe, translate, caption"),
    (["--task", "scene"], "Qwen2-Audio has no task 'scene'"),
    (["--task", "note_analysis"], "Qwen2-Audio has no task 'note_analysis'"),
    (["--language", "ko"], "language 'ko' has no tag; Qwen2-Audio knows"),
])
def test_options_qwen2_audio_lacks_are_refused_before_it_loads(tiny_qwen2_ckpt, wavs, tmp_path, options, message):
    options = [str(tmp_path / "out") if o == "OUT" else o for o in options]
    done = qwenaudio_cli("transcribe", wavs / "a.wav", *options, "--model", tiny_qwen2_ckpt, *FAST, home=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "weight tensors" not in done.stderr and not (tmp_path / "out").exists()  # nothing loaded or written


@pytest.mark.slow
def test_qwen2_audio_s_languages_are_not_qwen_audio_s(tmp_path, wavs):
    done = qwenaudio_cli("transcribe", wavs / "a.wav", "--language", "yue", home=tmp_path)  # default Qwen/Qwen-Audio
    assert done.returncode == 2 and "language 'yue' has no tag; Qwen-Audio knows" in done.stderr


def test_options_are_checked_after_loading_when_the_family_was_unknown(tiny_qwen2_ckpt, wavs, monkeypatch,
                                                                      capsys):
    """A repo id neither cached nor official is downloaded when the model loads: its options are checked then."""
    from qwenaudio import cli
    from qwenaudio.cli import transcribe

    monkeypatch.setattr(transcribe, "family_of_checkpoint", lambda name: None)
    code = cli.main(["transcribe", str(wavs / "a.wav"), "--model", str(tiny_qwen2_ckpt), "--format", "vtt", *FAST])
    assert code == 2 and "error: Qwen2-Audio has no timestamps" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_shares_the_files(tiny_qwen2_ckpt, wavs, tmp_path):
    done = torchrun_cli("transcribe", wavs, "--model", tiny_qwen2_ckpt, "--output-dir", tmp_path / "out", *FAST,
                        home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt", "summary.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["processes"] == 2

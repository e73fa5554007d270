"""`qwenaudio evaluate` on a Qwen2-Audio model: every official dataset's rows read as its script reads them (the
row's prompt after `<|audio_bos|><|AUDIO|><|audio_eos|>`, the chat turn around AIR-Bench's query), decoded as the
scripts decode (greedy, 1 to 256 new tokens, left padding, special tokens skipped), scored per source with the
`qwen2_*` scoring (tests/test_scoring_qwen2.py checks it against the official functions), on a tiny random
checkpoint whose replies are random tokens: the run directory, resuming, the command, and the errors for a
benchmark of the other family."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwenaudio
from qwenaudio import cli, evaluation
from qwenaudio.core.audio import load_audio
from qwenaudio.core.errors import InputError

from .test_evaluation import interrupt_at_batch, write_rows
from .conftest import reference
from .test_scoring_qwen2 import needs

SPEECH, OTHER = "1272-128104-0000.flac", "1089_134686_000007_000004.wav"
PROMPTS = {  # what the official JSONL rows hold is not published in the repository: these are stand-ins
    "asr": "Detect the language and recognize the speech: <|en|>", "st": "Translate the speech into German:",
    "emotion": "Recognize the emotion with keywords in English:",
    "vocal_sound": "Classify the human vocal sound to VocalSound in English:"}
REFERENCES = {"librispeech": "MISTER QUILTER IS THE APOSTLE", "aishell2": "我们是阿里巴巴的", "cv15_en": "Hello, world.",
              "cv15_zh": "二零二零年", "cv15_yue": "佢哋喺度", "cv15_fr": "Où est la bibliothèque ?",
              "fleurs_zh": "你好世界", "covost2": "Das ist ein Test.", "meld": "neutral", "vocalsound": "Cough"}


@pytest.fixture(scope="module")
def model(tiny_qwen2_ckpt):
    return qwenaudio.load(tiny_qwen2_ckpt, dtype=torch.float32, device="cpu", progress=False)


@pytest.fixture
def scorers():
    needs("whisper_normalizer", "whisper-normalizer")
    needs("zhconv", "zhconv")
    needs("sacrebleu", "sacrebleu")


def rows(name: str, shared_audio: Path, n: int = 3) -> list[dict]:
    """`n` fake rows of the dataset in the official fields, two sources each (covost2's name a language pair)."""
    spec = evaluation.QWEN2_BENCHMARKS[name]
    clips = [str(shared_audio / SPEECH), str(shared_audio / OTHER)]
    if spec.task == "chat":
        return [{"audio": clips[i % 2], "id": f"speech_{i}",
                 "query": f"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said in clip {i}?"} for i in range(n)]
    sources = ["covost2_en_de_test", "covost2_en_zh_test"] if name == "covost2" else [f"{name}_a", f"{name}_b"]
    return [{"audio": clips[i % 2], "source": sources[i % 2], "prompt": PROMPTS[spec.task],
             "gt": REFERENCES[name]} for i in range(n)]


def data_file(name: str, tmp_path: Path, shared_audio: Path, n: int = 3) -> Path:
    return write_rows(tmp_path / f"{name}.jsonl", rows(name, shared_audio, n))


@pytest.mark.parametrize("name", evaluation.QWEN2_BENCHMARKS)
def test_the_prompt_is_the_row_s_after_the_audio_placeholder(name, shared_audio, tmp_path):
    examples, problems = evaluation.read_benchmark(name, data_file(name, tmp_path, shared_audio))
    assert problems == [] and len(examples) == 3
    for example, row in zip(examples, rows(name, shared_audio)):
        if name == "airbench_level3":
            assert example.text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                    f"{row['query']}<|im_end|>\n<|im_start|>assistant\n")
            assert (example.row_id, example.reference, example.source) == (row["id"], None, name)
        else:
            assert example.text == "<|audio_bos|><|AUDIO|><|audio_eos|>" + row["prompt"]
            assert (example.reference, example.source) == (row["gt"], row["source"])


def test_the_language_is_the_dataset_s_and_the_bleu_target_the_source_s(shared_audio, tmp_path):
    languages = {name: evaluation.read_benchmark(name, data_file(name, tmp_path, shared_audio))[0][0].language
                 for name in evaluation.QWEN2_BENCHMARKS}
    assert languages == {"librispeech": "en", "aishell2": "zh", "cv15_en": "en", "cv15_zh": "zh", "cv15_yue": "yue",
                         "cv15_fr": "fr", "fleurs_zh": "zh", "covost2": "de", "meld": None, "vocalsound": None,
                         "airbench_level3": None}
    with pytest.raises(InputError, match="librispeech rows are scored in en"):
        evaluation.read_benchmark("librispeech", data_file("librispeech", tmp_path, shared_audio), language="en")


def test_replies_are_decoded_as_the_scripts_decode(model, shared_audio):
    """Special tokens skipped, whitespace kept (the scripts' `batch_decode(skip_special_tokens=True,
    clean_up_tokenization_spaces=False)`), greedy with at least one new token."""
    texts = ["<|audio_bos|><|AUDIO|><|audio_eos|>" + PROMPTS["asr"]] * 2
    clips = [[load_audio(shared_audio / name)] for name in (SPEECH, OTHER)]
    ids = model.generate(texts, clips, do_sample=False, min_new_tokens=1, max_new_tokens=6)
    replies = evaluation.generate_replies(model, texts, clips, 6)
    assert replies == [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert all(len(row) >= 1 for row in ids)


def test_every_benchmark_writes_its_run_directory_and_scores(model, tmp_path, shared_audio, scorers):
    scores = {}
    for name in evaluation.QWEN2_BENCHMARKS:
        out = tmp_path / name
        summary = evaluation.evaluate(model, name, data_file(name, tmp_path, shared_audio), out, batch_size=2,
                                      max_new_tokens=4)
        assert sorted(p.name for p in out.iterdir()) == ["examples.jsonl", "replies", "run.json", "summary.json",
                                                         "summary.md"]
        assert json.loads((out / "summary.json").read_text()) == summary and summary["complete"]
        assert summary["script"] == f"eval_audio/{evaluation.QWEN2_BENCHMARKS[name].script}"
        assert "at QwenLM/Qwen2-Audio 595360e." in (out / "summary.md").read_text()
        records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
        assert [r["line"] for r in records] == [1, 2, 3]
        scores[name] = {s["source"]: s["scores"] for s in summary["sources"]}
        if name == "airbench_level3":
            assert [r["id"] for r in records] == ["speech_0", "speech_1", "speech_2"]
            assert summary["sources"][0]["notes"][0].startswith("scored outside: AIR-Bench's GPT-4 judge")
        elif evaluation.QWEN2_BENCHMARKS[name].task == "asr":
            for source in scores[name]:  # the per-example counts add up to the source's rate
                mine = [r for r in records if r["source"] == source]
                rate = sum(r["errors"] for r in mine) / sum(r["reference_length"] for r in mine)
                assert scores[name][source]["wer"] == rate
    assert set(scores["librispeech"]["librispeech_a"]) == {"wer"} and scores["airbench_level3"] == {
        "airbench_level3": {}}
    assert set(scores["covost2"]["covost2_en_de_test"]) == {"bleu"}
    assert set(scores["meld"]["meld_a"]) == set(scores["vocalsound"]["vocalsound_b"]) == {"accuracy"}


def test_a_replied_reference_scores_zero_wer(model, tmp_path, shared_audio, scorers, monkeypatch):
    """The scoring sees the reply as written: a reply equal to the reference up to case, tags and punctuation
    scores 0, one with a wrong word more."""
    data = write_rows(tmp_path / "d.jsonl", [{**row, "audio": str(shared_audio / SPEECH)}  # one clip: batch order
                                             for row in rows("librispeech", shared_audio, 2)])  # is line order
    replies = iter([[" Mister Quilter is the apostle.", "<|en|>mister quilter is the apostle of"]])
    monkeypatch.setattr(evaluation, "generate_replies", lambda *args: next(replies))
    summary = evaluation.evaluate(model, "librispeech", data, tmp_path / "out", batch_size=2)
    assert summary["sources"][0]["scores"] == {"wer": 0.0} and summary["sources"][1]["scores"] == {"wer": 0.2}


@pytest.mark.parametrize("name", ["librispeech", "covost2", "meld", "airbench_level3"])
def test_a_run_resumes_after_an_interruption_to_the_same_summary(name, model, tmp_path, shared_audio, scorers,
                                                                 monkeypatch):
    data = data_file(name, tmp_path, shared_audio, n=4)
    options = {"batch_size": 1, "max_new_tokens": 3}
    whole = evaluation.evaluate(model, name, data, tmp_path / "whole", **options)
    real = interrupt_at_batch(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(model, name, data, tmp_path / "resumed", **options)
    interrupted = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert (interrupted["interrupted"], interrupted["replied"]) == (True, 2)
    monkeypatch.setattr(evaluation, "generate_replies", real)
    resumed = evaluation.evaluate(model, name, data, tmp_path / "resumed", **options)
    assert resumed["sources"] == whole["sources"] and resumed["complete"]
    part = (tmp_path / "resumed" / "replies" / "rank-0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["line"] for line in part) == [1, 2, 3, 4]  # each example once
    assert (tmp_path / "resumed" / "examples.jsonl").read_text() == (tmp_path / "whole" / "examples.jsonl").read_text()


def test_bad_rows_fail_alone_named_by_file_and_line(shared_audio, tmp_path):
    good = rows("covost2", shared_audio, 1)[0]
    data = write_rows(tmp_path / "d.jsonl", [
        good, {k: v for k, v in good.items() if k != "prompt"}, {**good, "prompt": "<|AUDIO|> twice"},
        {**good, "source": "covost2"}, {**good, "gt": 3}, "[1]"])
    examples, problems = evaluation.read_benchmark("covost2", data)
    assert [e.line for e in examples] == [1]
    assert problems == [
        f"{data}:2: no 'prompt' field (a covost2 row needs audio, source, prompt, gt; this one has audio, gt, source)",
        f"{data}:3: prompt '<|AUDIO|> twice': the prompt must hold <|AUDIO|> exactly once (the row's one clip), it "
        "holds it 2 times",
        f"{data}:4: source 'covost2' has no '_'-separated target language (as in covost2_en_de_test)",
        f"{data}:5: 'gt' must be a string, got int",
        f"{data}:6: expected a JSON object, got list"]
    chat = write_rows(tmp_path / "c.jsonl", [{"audio": good["audio"], "id": 1, "query": "no clip here"}])
    assert evaluation.read_benchmark("airbench_level3", chat)[1] == [
        f"{chat}:1: query 'no clip here': the prompt must hold <|AUDIO|> exactly once (the row's one clip), it "
        "holds it 0 times"]


def test_a_benchmark_of_the_other_family_is_one_clear_error(model, tiny_ckpt, tiny_qwen2_ckpt, tmp_path,
                                                            shared_audio):
    v1_row = write_rows(tmp_path / "v1.jsonl", [{"audio": str(shared_audio / SPEECH), "gt": "x", "source": "meld"}])
    with pytest.raises(InputError, match="'emotion' is a Qwen-Audio benchmark; a Qwen2-Audio model runs "
                                         "librispeech, aishell2, cv15_en, cv15_zh, cv15_yue, cv15_fr, fleurs_zh, "
                                         "covost2, meld, vocalsound, airbench_level3"):
        evaluation.evaluate(model, "emotion", v1_row, tmp_path / "a")
    with pytest.raises(InputError, match="'meld' is a Qwen2-Audio benchmark; a Qwen-Audio model runs asr, st"):
        evaluation.plan("meld", data_file("meld", tmp_path, shared_audio), tmp_path / "b", checkpoint=tiny_ckpt)
    with pytest.raises(InputError, match="'emotion' is a Qwen-Audio benchmark; a Qwen2-Audio model runs"):
        evaluation.plan("emotion", v1_row, tmp_path / "d", checkpoint=tiny_qwen2_ckpt)  # its config.json says
    run = evaluation.plan("emotion", v1_row, tmp_path / "c")  # no checkpoint: Qwen-Audio, the task's family
    with pytest.raises(InputError, match="'emotion' is a Qwen-Audio benchmark"):
        evaluation.execute(model, run)
    with pytest.raises(InputError, match="unknown task 'wer'; choose from asr, .* \\(Qwen-Audio\\), librispeech, "):
        evaluation.read_benchmark("wer", v1_row)


def command(name: str, data: Path, out: Path, checkpoint: Path, *more: str) -> list[str]:
    return ["evaluate", name, "--data", str(data), "--output-dir", str(out), "--model", str(checkpoint),
            "--device", "cpu", "--max-new-tokens", "3", *more]


def test_the_command_runs_resumes_and_refuses_the_other_family(tiny_qwen2_ckpt, tmp_path, shared_audio, scorers,
                                                               capsys):
    data, out = data_file("cv15_yue", tmp_path, shared_audio, n=3), tmp_path / "out"
    assert cli.main(command("cv15_yue", data, out, tiny_qwen2_ckpt, "--limit", "2")) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("# cv15_yue: 2 of 2 examples replied") and "| cv15_yue_a | 1 | wer |" in stdout
    assert "| Common Voice 15 yue |" in stdout  # the README's figure beside ours
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["task"] == "cv15_yue" and settings["max_new_tokens"] == 3 and settings["model_fingerprint"]
    assert cli.main(command("cv15_yue", data, out, tiny_qwen2_ckpt)) == 0  # resumes: only line 3 is new
    part = (out / "replies" / "rank-0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["line"] for line in part[:2]) == [1, 2] and json.loads(part[2])["line"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["replied"] == 3 and summary["task"] == "cv15_yue"
    capsys.readouterr()
    assert cli.main(command("asr", data, tmp_path / "other", tiny_qwen2_ckpt)) == 2
    assert "'asr' is a Qwen-Audio benchmark; a Qwen2-Audio model runs librispeech" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything is written or loaded


@pytest.mark.parametrize("name, instruct", [("librispeech", False), ("airbench_level3", True)])
def test_replies_equal_transformers_on_the_official_recipe(name, instruct, tiny_qwen2_ckpt, tiny_qwen2_instruct_ckpt,
                                                          tmp_path, shared_audio):
    """The scripts' recipe run live on the same tiny checkpoint: `AutoProcessor` with left padding over the rows'
    texts and clips, `generate(max_new_tokens, min_new_tokens=1, do_sample=False)`, the prompt sliced off,
    `batch_decode(skip_special_tokens=True, clean_up_tokenization_spaces=False)`: the same replies, except where
    transformers picks one of the embedding's rows past the tokenizer's (a random model does; ours, like Qwen-Audio's
    evaluation, chooses among the tokenizer's): up to there they agree."""
    transformers = reference("transformers")
    checkpoint = tiny_qwen2_instruct_ckpt if instruct else tiny_qwen2_ckpt
    data = data_file(name, tmp_path, shared_audio, n=2)
    mine = qwenaudio.load(checkpoint, dtype=torch.float32, device="cpu", progress=False)
    evaluation.evaluate(mine, name, data, tmp_path / "out", batch_size=2, max_new_tokens=8)
    ours = [json.loads(line)["reply"] for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    examples, _ = evaluation.read_benchmark(name, data)
    for example, row in zip(examples, rows(name, shared_audio, 2) if instruct else ()):  # the Instruct template
        conversation = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": row["query"]}]
        assert example.text == processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[e.text for e in examples], audio=[load_audio(e.path).numpy() for e in examples],
                       sampling_rate=16000, return_tensors="pt", padding=True)
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = model.generate(**inputs, max_new_tokens=8, min_new_tokens=1, do_sample=False)[:, inputs.input_ids.size(1):]
    theirs = processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    known = len(mine.tokenizer)
    unused = [next((i for i, t in enumerate(row) if t >= known), None) for row in ids.tolist()]
    assert unused == ([None, None] if name == "librispeech" else [2, None])  # as the fixed checkpoints have it
    for reply, official, row, cut in zip(ours, theirs, ids, unused):
        assert reply == official if cut is None else reply.startswith(
            processor.decode(row[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False))


DRIVER = """
import sys, torch, qwenaudio
import qwenaudio.runner
from qwenaudio import evaluation
checkpoint, data, out = sys.argv[1:]
model = qwenaudio.load(checkpoint, dtype=torch.float32, device="cpu", progress=False)
for name in ("cv15_zh", "meld"):
    evaluation.evaluate(model, name, f"{data}/{name}.jsonl", f"{out}/{name}", batch_size=1, max_new_tokens=3)
qwenaudio.runner.leave_process_group()
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_give_one_process_s_summary(model, tiny_qwen2_ckpt, tmp_path, shared_audio,
                                                                 scorers):
    for name in ("cv15_zh", "meld"):
        evaluation.evaluate(model, name, data_file(name, tmp_path, shared_audio, n=4), tmp_path / "one" / name,
                            batch_size=1, max_new_tokens=3)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(driver), str(tiny_qwen2_ckpt), str(tmp_path), str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("cv15_zh", "meld"):
        one, two = (json.loads((tmp_path / d / name / "summary.json").read_text()) for d in ("one", "two"))
        assert (two["processes"], two["sources"], two["failed"]) == (2, one["sources"], one["failed"]), name
        parts = sorted((tmp_path / "two" / name / "replies").iterdir())
        assert [len(p.read_text().splitlines()) for p in parts] == [2, 2], name  # each process did half, once

"""Record, per benchmark, the official evaluation script's prompt ids and greedy replies on a tiny checkpoint.

What it records, with the official code of QwenLM/Qwen-Audio at commit e81cc26 (eval_audio/evaluate_*.py for the
prompts and the decoding; modeling_qwen.py ``generate``, tokenization_qwen.py ``process_audio`` and audio.py
``load_audio`` underneath) loaded through transformers' remote code in fp32 on CPU from the tiny random checkpoint
``qwenaudio.testing.make_tiny_checkpoint(seed=0)`` with the real qwen.tiktoken:

- ``template``: the ``prompt = '...'`` line of each task's script, read from the script itself (so a typo in our
  transcription of a prompt cannot hide), and the arguments each script's ``__getitem__`` formats into it;
- ``rows``: a small data file per task in the official format (``audio``, ``gt``, ``source``, ``question``), naming
  recordings from ../shared/audio by paths relative to the repository root;
- per task, the script's collate and generate steps on all rows as ONE batch, in file order: ``texts``,
  ``input_ids`` / ``attention_mask`` (left padding, pad = eod) and ``audio_span_tokens`` as fed; ``generated`` =
  generate's output after the prompt; ``pred`` = the script's cut at the first 151643; ``response`` = the script's
  ``tokenizer.decode(pred, skip_special_tokens=False).strip()``, or None where ``pred`` holds an id the official
  tokenizer cannot decode (>= 155165: it raises), with ``undecodable_at`` giving that step.

Settings as the scripts: ``do_sample=False, max_new_tokens=<the script's>, min_new_tokens=1, length_penalty=1.0,
num_return_sequences=1, repetition_penalty=1.0, use_cache=True, pad_token_id=151643, eos_token_id=151643``.

How to run, from the repository root (ffmpeg on PATH, ../shared/audio present):

    git -C MIRROR archive e81cc26 eval_audio | tar -x -C /tmp/official    # the official scripts
    HF_HUB_OFFLINE=1 /work/official/venv/bin/python tests/golden/record_evaluation.py \\
        --official-files DIR --eval-scripts /tmp/official/eval_audio

where DIR holds the official model files (see record_encoder.py), kept OUTSIDE this repository.  It writes
``evaluation_official.json`` next to this script; the tests only read it.
"""

import os
import re
import sys
from importlib.metadata import version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helpers: model loading)
from record_generation import dumps  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT_PATH = os.path.join(HERE, "evaluation_official.json")
EOD = 151643
FIRST_UNDECODABLE = 155165
AUDIO = "../shared/audio/"
SPEECH, SPEECH2, SPANISH = AUDIO + "1272-128104-0000.flac", AUDIO + "1089_134686_000007_000004.wav", AUDIO + "es.mp3"
GLASS, MUSIC = AUDIO + "glass-breaking-151256.mp3", AUDIO + "music.wav"

# task -> (script, max_new_tokens, how __getitem__ formats the prompt, rows)
TASKS = {
    "asr": ("evaluate_asr.py", 256, "audio, language, language (language 'en', from ds_collections librispeech)", [
        {"audio": SPEECH, "gt": "mister quilter is the apostle of the middle classes",
         "source": "librispeech_dev_clean"},
        {"audio": SPEECH2, "gt": "a read sentence", "source": "librispeech_test_other"}]),
    "st": ("evaluate_st.py", 256, "audio, source.split('_')[-3], source.split('_')[-2]", [
        {"audio": SPANISH, "gt": "a translation", "source": "covost2_es_en_test"},
        {"audio": SPEECH, "gt": "一个翻译", "source": "covost2_en_zh_test"}]),
    "srwt": ("evaluate_srwt.py", 256, "audio, language, language (language 'zh', from ds_collections)", [
        {"audio": SPEECH, "gt": "<|0.00|><|sil|><|0.54|>面<|0.86|>条<|1.17|>", "source": "industrial_srwt"}]),
    "caption": ("evaluate_caption.py", 30, "audio, style ('clotho', from ds_collections clotho)", [
        {"audio": GLASS, "gt": "glass breaks on a hard floor", "source": "clotho"},
        {"audio": MUSIC, "gt": "music plays", "source": "clotho"}]),
    "aqa": ("evaluate_aqa.py", 4, "audio, question", [
        {"audio": GLASS, "question": "what broke?", "gt": "glass", "source": "clothoaqa"},
        {"audio": SPEECH, "question": "Is someone speaking?", "gt": "yes", "source": "clothoaqa"}]),
    "emotion": ("evaluate_emotion.py", 4, "audio", [
        {"audio": SPEECH2, "gt": "neutral", "source": "meld"}]),
    "vocal_sound": ("evaluate_vocal_sound.py", 4, "audio", [
        {"audio": SPEECH, "gt": "Laughter", "source": "vocalsound"}]),
    "scene": ("evaluate_scene.py", 10, "audio", [
        {"audio": GLASS, "gt": "home", "source": "tut2017"},
        {"audio": SPEECH2, "gt": "office", "source": "cochlscene"}]),
    "note_analysis": ("evaluate_note_analysis.py", 30, "audio", [
        {"audio": MUSIC, "gt": "<|pitch|><|midi_pitch_60|><|velocity|><|midi_velocity_100|><|instrument|>keyboard",
         "source": "nsynth"}]),
}


def template(script_dir: str, script: str) -> str:
    text = open(os.path.join(script_dir, script), encoding="utf-8").read()
    (found,) = re.findall(r"^    prompt = '(.*)'$", text, flags=re.M)
    return found


def format_args(task: str, row: dict) -> tuple:
    if task == "asr":
        return row["audio"], "en", "en"
    if task == "srwt":
        return row["audio"], "zh", "zh"
    if task == "st":
        return row["audio"], row["source"].split("_")[-3], row["source"].split("_")[-2]
    if task == "caption":
        return row["audio"], "clotho"
    if task == "aqa":
        return row["audio"], row["question"]
    return (row["audio"],)


def record_task(model, tokenizer, task: str, prompt: str, max_new_tokens: int, rows: list) -> dict:
    texts = [prompt.format(*format_args(task, row)) for row in rows]
    audio_info = [tokenizer.process_audio(t) for t in texts]
    tokens = tokenizer(texts, return_tensors="pt", padding="longest", audio_info=audio_info)
    out = model.generate(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=1, length_penalty=1.0,
                         num_return_sequences=1, repetition_penalty=1.0, use_cache=True,
                         pad_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id, audio_info=audio_info)
    generated = out[:, tokens.input_ids.size(1):].tolist()
    preds = [row[: row.index(EOD)] if EOD in row else row for row in generated]
    responses, undecodable = [], []
    for pred in preds:
        bad = next((k for k, i in enumerate(pred) if i >= FIRST_UNDECODABLE), None)
        undecodable.append(bad)
        responses.append(None if bad is not None else tokenizer.decode(pred, skip_special_tokens=False).strip())
    return {"texts": texts, "input_ids": tokens.input_ids.tolist(), "attention_mask": tokens.attention_mask.tolist(),
            "audio_span_tokens": [info["audio_span_tokens"] for info in audio_info], "generated": generated,
            "pred": preds, "response": responses, "undecodable_at": undecodable}


def main():
    parser = record_encoder.argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-files", required=True)
    parser.add_argument("--eval-scripts", required=True, help="the official eval_audio directory")
    parser.add_argument("--out", default=OUT_PATH)
    args = parser.parse_args()
    official_dir, scripts, out_path = map(os.path.abspath, (args.official_files, args.eval_scripts, args.out))
    os.chdir(REPO_ROOT)  # the rows' relative audio paths resolve against the working directory, as in the scripts
    with record_encoder.official_workdir() as work_dir:
        from transformers import AutoTokenizer

        model = record_encoder.load_official_model(official_dir, work_dir)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=True)
        tokenizer.padding_side = "left"
        tokenizer.pad_token_id = tokenizer.eod_id
        out = {"reference": {"code": "QwenLM/Qwen-Audio@e81cc26 eval_audio/evaluate_*.py + modeling_qwen.py generate",
                             "checkpoint": "make_tiny_checkpoint(seed=0) with the real qwen.tiktoken, fp32, CPU",
                             "transformers": version("transformers"), "torch": torch.__version__},
               "tasks": {}}
        with torch.no_grad():
            for task, (script, budget, arguments, rows) in TASKS.items():
                prompt = template(scripts, script)
                record = record_task(model, tokenizer, task, prompt, budget, rows)
                out["tasks"][task] = {"script": script, "template": prompt, "format_arguments": arguments,
                                      "max_new_tokens": budget, "rows": rows, **record}
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(dumps(out) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

"""Record what the official Qwen-Audio evaluation scoring returns on fixed inputs, as a golden file.

What it records, for hand-made references and replies (CASES below, chosen to hit every branch: English and Chinese,
punctuation, case, `<|en|>`-style tags and timestamps in replies, empty strings):

- `remove_sp(text, language)` from eval_audio/evaluate_asr.py;
- `EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=False,
  character_tokenization=False).tokenize(text)`, the settings `compute_wer` uses (eval_audio/evaluate_tokenizer.py);
- `compute_wer(refs, hyps, language)` from evaluate_asr.py on lists that went through `remove_sp` first, as the script
  does per `source`, including the lists where it raises (the exception's type is recorded);
- `AverageShiftCalculator()(refs, hyps)` from eval_audio/evaluate_srwt.py, on raw references and replies, including
  the lists where its length assertion fails;
- `sklearn.metrics.accuracy_score(refs, hyps)`, which evaluate_aqa.py, evaluate_emotion.py, evaluate_vocal_sound.py
  and evaluate_scene.py apply to the stripped decoded reply with no other post-processing, and the yes/no subset
  evaluate_aqa.py scores for `clotho*` sources.

Which official code: QwenLM/Qwen-Audio eval_audio/ at commit e81cc26 for the evaluate_*.py scripts; the file they
import, evaluate_tokenizer.py, is missing there and was added upstream in 2a70134. The script extracts them from a git
clone of the official repository into a temporary directory and imports them from there; nothing official is copied
into this repository. Importing the scripts needs torch, transformers and tqdm (the official venv has them) plus
editdistance, edit_distance, scikit-learn and sacrebleu<2: EvaluationTokenizer imports
`sacrebleu.tokenizers.TOKENIZERS`, which sacrebleu 2 no longer has (it raises ImportError there).

How to run (in the official venv):

    python tests/golden/record_scoring.py /path/to/Qwen-Audio.git

It writes `scoring_official.json` next to this script. The test suite only reads that JSON.
"""

import contextlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from importlib.metadata import version

SCRIPTS_COMMIT = "e81cc26"
TOKENIZER_COMMIT = "2a70134"
SCRIPTS = ["evaluate_asr.py", "evaluate_srwt.py"]
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scoring_official.json")

TEXTS = [
    "", " ", "Hello, World!", "hello ,world .", "  MISTER Quilter   is the apostle .  ",
    "<|en|>the cat<|endoftext|>", "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>yes",
    "a ! b ? c ; d : e , f . g", "tabs\tand\nnew lines", "don't stop-believing", "ÉCOLE Straße İstanbul",
    "我们是 阿里巴巴 的，通义千问。", "<|zh|>你好 ,世界 !", "中文 mixed English 123", "<|0.00|>甲乙<|0.52|>丙丁<|1.20|>",
    "<|unfinished", "a <|x|> b <|y z|> c", "full\u3000width\u00a0space", "A.B,C", "..."
]

# (name, language, refs, hyps): refs and hyps go through remove_sp first, like one `source` group in the scripts.
WER_CASES = [
    ("en_basic", "en", ["the cat sat on the mat", "Hello, World!"], ["the cat sat on mat", "hello world"]),
    ("en_tags", "en", ["mister quilter is the apostle"], ["<|en|>Mister Quilter is an apostle.<|endoftext|>"]),
    ("en_empty_reply", "en", ["one two three", "four"], ["", "four five"]),
    ("en_punct_spacing", "en", ["yes , no . maybe ?"], ["yes, no. maybe?"]),
    ("en_later_empty_ref", "en", ["a b", ""], ["a b", "c d"]),
    ("en_first_ref_empty", "en", ["", "a b"], ["x", "a b"]),
    ("en_first_ref_tags_only", "en", ["<|en|> <|endoftext|>", "a"], ["", "a"]),
    ("en_first_ref_empty_moved", "en", ["a b", ""], ["a b", "x"]),  # the crashing case's lists, empty ref second
    ("zh_basic", "zh", ["我们是阿里巴巴的", "你好，世界。"], ["我们 是阿里 的", "你好世界"]),
    ("zh_mixed", "zh", ["Hello 世界 ABC"], ["<|zh|>hello世界abd"]),
    ("zh_first_ref_empty", "zh", ["", "中文"], ["", "中文"]),
    ("empty_lists", "en", [], []),
]


def random_srwt_lists(seed: int) -> tuple[list[str], list[str]]:
    """Three examples of one to five words from a three-word vocabulary, reference and reply drawn independently,
    the reply's times 0.1 s later: alignments with equal cost but different pairs are common there."""
    rng = random.Random(seed)

    def timed(delay: float) -> str:
        words = [rng.choice("abc") for _ in range(rng.randint(1, 5))]
        return "<|0.00|>" + "".join(f"{w}<|{(n + 1) / 4 + delay:.2f}|>" for n, w in enumerate(words))

    pairs = [(timed(0.0), timed(0.1)) for _ in range(3)]
    return [ref for ref, _ in pairs], [hyp for _, hyp in pairs]


# (name, refs, hyps): raw strings, as AverageShiftCalculator reads them.
SRWT_CASES = [
    ("exact", ["<|0.00|>甲<|0.50|>乙<|1.00|>"], ["<|0.00|>甲<|0.50|>乙<|1.00|>"]),
    ("shifted", ["<|0.00|>甲<|0.50|>乙<|1.00|>丙<|1.60|>"], ["<|0.10|>甲<|0.40|>乙<|1.20|>丙<|1.50|>"]),
    ("reply_first_segment_dropped", ["<|0.00|>甲<|0.50|>乙<|1.00|>"], ["甲<|0.50|>乙<|1.00|>"]),
    ("substitution_and_insertion", ["<|0.00|>a<|0.30|>b<|0.60|>c<|0.90|>"],
     ["<|0.00|>a<|0.35|>x<|0.60|>c<|0.95|>d<|1.20|>"]),
    ("deletion", ["<|0.00|>a<|0.30|>b<|0.60|>c<|0.90|>d<|1.40|>"], ["<|0.05|>a<|0.31|>d<|1.30|>"]),
    ("tags", ["<|startoftranscript|><|en|><|transcribe|><|0.00|>hi<|0.40|>there<|0.80|>"],
     ["<|zh|><|0.02|>hi<|0.41|>there<|0.90|><|endoftext|>"]),
    ("two_utterances", ["<|0.00|>甲<|0.50|>乙<|1.00|>", "<|1.00|>x<|2.50|>y<|3.00|>"],
     ["<|0.10|>甲<|0.50|>乙<|1.10|>", "<|1.20|>x<|2.00|>z<|3.30|>"]),
    ("no_match_skipped", ["<|0.00|>a<|0.50|>", "<|0.00|>b<|1.00|>"], ["<|0.00|>z<|0.50|>", "<|0.20|>b<|0.90|>"]),
    ("single_timestamp_skipped", ["<|0.00|>", "<|0.00|>q<|1.00|>"], ["<|0.30|>", "<|0.00|>q<|1.50|>"]),
    ("three_digit_not_a_timestamp", ["<|0.00|>a<|100.00|>b<|0.90|>"], ["<|0.00|>a<|100.00|>b<|0.80|>"]),
    ("tab_in_segment", ["<|0.00|>a\tb<|0.50|>c<|0.90|>"], ["<|0.00|>a\tb<|0.60|>c<|0.90|>"]),
    ("all_skipped", ["<|0.00|>a<|0.50|>"], ["<|0.00|>b<|0.50|>"]),
    ("reply_without_timestamps", ["<|0.00|>甲<|0.50|>乙<|1.00|>"], ["甲乙"]),
    ("reply_without_timestamps_among_others", ["<|0.00|>甲<|0.50|>乙<|1.00|>", "<|1.00|>x<|2.50|>y<|3.00|>"],
     ["甲乙", "<|1.20|>x<|2.00|>z<|3.30|>"]),
    ("reply_without_timestamps_left_out", ["<|1.00|>x<|2.50|>y<|3.00|>"], ["<|1.20|>x<|2.00|>z<|3.30|>"]),
    # Both lists lose one example, at different places: the official calculator pairs example 1's reference with
    # example 0's reply.
    ("misaligned", ["甲乙", "<|0.00|>x<|1.00|>", "<|0.00|>k<|0.50|>"],
     ["<|0.00|>x<|0.30|>", "xy", "<|0.00|>k<|0.60|>"]),
    ("misaligned_left_out", ["<|0.00|>k<|0.50|>"], ["<|0.00|>k<|0.60|>"]),
    # Equally short alignments that pair different words: which one the official matcher picks decides the shift.
    ("swapped", ["<|0.00|>a<|0.50|>b<|1.00|>", "<|0.00|>k<|0.50|>"],
     ["<|0.00|>b<|0.40|>a<|1.00|>", "<|0.10|>k<|0.50|>"]),
    ("insertion_or_deletion", ["<|0.00|>a<|0.50|>b<|1.00|>a<|1.50|>"], ["<|0.00|>b<|0.40|>a<|0.90|>b<|1.30|>"]),
    # Only the first language tag found is deleted (<|en|> before <|zh|>), wherever it is.
    ("language_tag_inside_segment", ["<|0.00|>a<|en|>b<|0.50|>c<|0.90|>", "<|0.00|>a<|zh|><|en|>b<|0.50|>"],
     ["<|0.00|>ab<|0.60|>c<|1.00|>", "<|0.00|>a<|zh|>b<|0.70|>"]),
    ("tab_in_reply_only", ["<|0.00|>a<|0.50|>b<|0.90|>", "<|0.00|>k<|0.50|>"],
     ["<|0.00|>a\tx<|0.60|>b<|0.90|>", "<|0.00|>k<|0.70|>"]),
] + [(f"random_{seed}", *random_srwt_lists(seed)) for seed in range(20)]


# (name, refs, hyps): the classification tasks' exact-match accuracy and evaluate_aqa.py's yes/no subset.
ACCURACY_CASES = [
    ("exact", ["yes", "no", "dog"], ["yes", "no", "dog"]),
    ("case_and_dot", ["Yes", "neutral", "Laughter"], ["yes", "neutral.", "Laughter"]),
    ("tags_and_space", ["cough", "sad", "park"], ["cough<|endoftext|>", " sad", "<|en|>park"]),
    ("empty", ["bus", "", "No"], ["", "", "no"]),
    ("no_yes_no", ["dog", "cat"], ["dog", "bird"]),
    ("empty_lists", [], []),
]


def extract(repo: str, dest: str, files: list[tuple[str, str]]) -> None:
    """Write the official files (commit, name under eval_audio/) into dest, from the official git history."""
    for commit, name in files:
        text = subprocess.run(["git", "-C", repo, "show", f"{commit}:eval_audio/{name}"], check=True,
                              capture_output=True).stdout
        with open(os.path.join(dest, name), "wb") as f:
            f.write(text)


def outcome(fn, *args):
    """{"value": ...} or {"raises": ExceptionTypeName}; the scripts' prints are swallowed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return {"value": fn(*args)}
    except Exception as e:  # noqa: BLE001 -- which exception the official code raises is what is recorded
        return {"raises": type(e).__name__}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        official = [(SCRIPTS_COMMIT, name) for name in SCRIPTS] + [(TOKENIZER_COMMIT, "evaluate_tokenizer.py")]
        extract(os.path.abspath(sys.argv[1]), tmp, official)  # the scripts and the tokenizer file they import
        sys.path.insert(0, tmp)
        from evaluate_asr import compute_wer, remove_sp
        from evaluate_srwt import AverageShiftCalculator
        from evaluate_tokenizer import EvaluationTokenizer
        from sklearn.metrics import accuracy_score

    tokenizer = EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=False,
                                    character_tokenization=False)

    def aqa_binary(refs, hyps):
        """evaluate_aqa.py's bi_ACC_score: the examples whose reference is yes or no, in any case."""
        kept = [i for i, ref in enumerate(refs) if ref.lower() in ["yes", "no"]]
        return accuracy_score([refs[i] for i in kept], [hyps[i] for i in kept])

    out = {
        "header": {
            "code": f"QwenLM/Qwen-Audio eval_audio/ evaluate_asr.py, evaluate_srwt.py @ {SCRIPTS_COMMIT}; "
                    f"evaluate_tokenizer.py @ {TOKENIZER_COMMIT}; sklearn.metrics.accuracy_score as in "
                    "evaluate_aqa.py, evaluate_emotion.py, evaluate_vocal_sound.py, evaluate_scene.py",
            "script": "tests/golden/record_scoring.py",
            "versions": {name: version(name) for name in
                         ["editdistance", "edit_distance", "sacrebleu", "scikit-learn", "numpy"]}
                        | {"python": platform.python_version()},
        },
        "remove_sp": [{"text": t, "language": lang, "out": remove_sp(t, lang)} for t in TEXTS for lang in ("en", "zh")],
        "tokenize": [{"text": t, "out": tokenizer.tokenize(t)} for t in TEXTS],
        "compute_wer": [],
        "average_shift": [],
        "accuracy": [],
    }
    for name, lang, refs, hyps in WER_CASES:
        clean_refs, clean_hyps = [remove_sp(r, lang) for r in refs], [remove_sp(h, lang) for h in hyps]
        out["compute_wer"].append({"name": name, "language": lang, "refs": refs, "hyps": hyps,
                                   **outcome(compute_wer, clean_refs, clean_hyps, lang)})
    for name, refs, hyps in SRWT_CASES:
        out["average_shift"].append({"name": name, "refs": refs, "hyps": hyps,
                                     **outcome(lambda r, h: AverageShiftCalculator()(r, h), refs, hyps)})
    for name, refs, hyps in ACCURACY_CASES:
        acc, binary = outcome(accuracy_score, refs, hyps), outcome(aqa_binary, refs, hyps)
        out["accuracy"].append({"name": name, "refs": refs, "hyps": hyps, "accuracy": acc, "yes_no_accuracy": binary})
    write_golden(out, OUT_PATH)


def write_golden(out: dict, path: str) -> None:
    """`out` as indented JSON at `path` (numpy scalars as Python numbers), written aside and renamed."""

    def plain(obj):
        return obj.item() if hasattr(obj, "dtype") else obj

    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1, default=plain)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()

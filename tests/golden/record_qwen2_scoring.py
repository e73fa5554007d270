"""Record what the official Qwen2-Audio evaluation scoring returns on fixed inputs, as a golden file.

What it records, for hand-made texts and reference/reply lists (below, chosen to reach every rule: English
contractions, numbers, currencies and British spellings; Chinese dates, money, phone numbers, fractions, percentages,
measure words, long digit strings; traditional characters; French accents; `<|en|>`-style tags; punctuation-only
words; empty strings) plus seeded random Chinese strings stored as drawn:

- from eval_audio/evaluate_asr.py: `remove_sp(text, language)`; the three normalizer objects it builds,
  `english_normalizer` (whisper_normalizer/english.py `EnglishTextNormalizer()`), `basic_normalizer`
  (whisper_normalizer/basic.py `BasicTextNormalizer()`) and `chinese_normalizer` (cn_tn.py `TextNorm(...)`);
  `zhconv.convert(text, 'zh-cn')` as it calls it; the items the script counts for a raw reference or reply
  (`remove_sp`, then `compute_wer`'s own debug print of `ref_items` for `compute_wer([text], [text], language)`); `compute_wer(refs, hyps, language)` on lists that went
  through `remove_sp` first, as the script does per source, including the lists where it raises (the exception's
  type is recorded);
- from eval_audio/evaluate_tokenizer.py: `EvaluationTokenizer(tokenizer_type="none", lowercase=True,
  punctuation_removal=True, character_tokenization=False).tokenize(text)`, compute_wer's settings;
- evaluate_st.py's per-source BLEU: the tokenizer it picks from `source.split("_")[-2]` ("ja-mecab", "zh", else
  "13a") and `sacrebleu.corpus_bleu(hyps, [refs], tokenize=...).score` (that code sits in the script's main block,
  so its four lines are repeated here with the official sacreBLEU 1.5.1);
- evaluate_emotion.py's and evaluate_vocal_sound.py's `accuracy_score(refs, [reply.lstrip() ...])` (main block too).

Which official code: QwenLM/Qwen2-Audio eval_audio/ at commit 595360e82b5839c1507492ec83cae5bda6d5c7d4. The script
extracts it from a git clone into a temporary directory and imports it from there; nothing official is copied into
this repository (the folder eval_audio/whisper_normalizer/ gets an empty __init__.py there, so that it is imported
rather than an installed whisper-normalizer package). Importing evaluate_asr.py needs what it imports at the top: torch, transformers, requests, tqdm,
editdistance, zhconv, regex, more_itertools, sacrebleu<2 (EvaluationTokenizer imports `sacrebleu.tokenizers.TOKENIZERS`,
gone in sacreBLEU 2), and scikit-learn for the accuracy. The golden was recorded with a Python 3.11 venv holding
sacrebleu 1.5.1, editdistance 0.8.1, zhconv 1.4.3 and scikit-learn 1.9.1 (torch 2.13.0 and transformers 5.25.0
reached through a .pth line; the versions are in the file's header).

How to run (in that venv):

    python tests/golden/record_qwen2_scoring.py /path/to/Qwen2-Audio.git

It writes `qwen2_scoring_official.json` next to this script. The test suite (tests/test_scoring_qwen2.py) only
reads that JSON.
"""

import ast
import contextlib
import io
import os
import platform
import random
import subprocess
import sys
import tempfile
from importlib.metadata import version

from record_scoring import outcome, write_golden

COMMIT = "595360e82b5839c1507492ec83cae5bda6d5c7d4"
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_scoring_official.json")
LANGUAGES = ["en", "zh", "yue", "fr"]

ENGLISH = [
    "", " ", "Hello, World!", "hello ,world .", "  MISTER Quilter   is the apostle .  ", "<|en|>the cat<|endoftext|>",
    "Mr. Smith and Dr. Jones won't go; they can't.", "I kinda sorta dunno 'cause it's gonna rain, y'all",
    "Uh, um, hmm... mm-hmm, I see [laughter] (inaudible) <noise>", "The colour of the theatre's centre is grey.",
    "He paid $20.50 for twenty five apples and one hundred and five pears.", "It cost £5, €3.5 and 7 cents.",
    "twenty first century, the 1st, 2nd and 3rd", "one thousand two hundred thirty four point five six",
    "1,000,000 people; 3.14 percent; 50%", "nineteen ninety nine and two thousand and one", "O'Neill's rock-n-roll",
    "ÉCOLE Straße İstanbul naïve café", "a ! b ? c ; d : e , f . g", "... !!! ---", "tabs\tand\nnew lines",
    "double  space   words", "don't stop-believing", "it's twelve o'clock, a.m.", "zero oh one two", "1/2 3/4",
    "ten million dollars", "a half and a quarter", "Ms Mrs St. Jr. Sr.", "let's ain't wanna gotta",
]
CHINESE = [
    "", "我们是阿里巴巴的，通义千问。", "<|zh|>你好 ,世界 !", "中文 mixed English 123", "2020年3月5日", "08年12月", "1999年",
    "花了100元5角", "3.5亿元", "收到5000块钱", "电话13812345678", "+86 13912345678", "010-62345678", "拨打12345678",
    "1/3的人", "增长了50%", "增长了12.5％", "3个苹果", "10多个人", "两百", "编号20231225", "21世纪", "第1名",
    "0.5", "100", "1001", "10000", "120000", "P2P和B2B", "O2O模式", "《书名》「引号」", "……", "１２３", "二〇二〇",
    "22222", "2万", "12", "1.50元", "十二点", "^开头$", "第2", "5.5.5", "他说:\"好\"", "全角！？。",
]
CANTONESE = ["佢哋喺度講緊廣東話。", "我哋聽日去飲茶，好唔好？", "電腦軟體", "你好，世界", "1999年"]
FRENCH = ["Où est la bibliothèque ?", "L'été, c'est très chaud !", "« Bonjour », dit-il.", "Ça va; très bien: merci"]
TEXTS = ENGLISH + CHINESE + CANTONESE + FRENCH


def random_chinese(seed: int, n: int = 300) -> list[str]:
    """Strings of digits, Chinese number context and punctuation, where the Chinese rules' regular expressions and
    their str.replace-first-occurrence rewriting interact."""
    rng = random.Random(seed)
    alphabet = list("0123456789") * 4 + list("年月日号元块角毛分万亿千百多余几个张米克%％/.-+ 86P2Ba，。！？,.;:^$点二两") + ["１"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(n)]


# (name, language, refs, hyps): refs and hyps go through remove_sp first, like one source in evaluate_asr.py.
WER_CASES = [
    ("en_basic", "en", ["the cat sat on the mat", "Hello, World!"], ["the cat sat on mat", "hello world"]),
    ("en_normalized_equal", "en", ["Mr. Smith paid twenty dollars for the colour TV."],
     ["mister smith paid $20 for the color tv"]),
    ("en_tags", "en", ["mister quilter is the apostle"], ["<|en|>Mister Quilter is an apostle.<|endoftext|>"]),
    ("en_contractions", "en", ["I kinda dunno 'cause"], ["i kind of do not know because"]),
    ("en_empty_reply", "en", ["one two three", "four"], ["", "four five"]),
    ("en_fillers_only_later", "en", ["a b", "uh um"], ["a b", "c"]),
    ("en_first_ref_empty", "en", ["", "a b"], ["x", "a b"]),
    ("en_first_ref_fillers", "en", ["uh", "a"], ["", "a"]),
    ("zh_basic", "zh", ["我们是阿里巴巴的", "你好，世界。"], ["我们 是阿里 的", "你好世界"]),
    ("zh_numbers", "zh", ["2020年3月5日花了100元"], ["二零二零年三月五日花了一百元"]),
    ("zh_mixed", "zh", ["Hello 世界 ABC"], ["<|zh|>hello世界abd"]),
    ("zh_first_ref_empty", "zh", ["", "中文"], ["", "中文"]),
    ("yue_traditional", "yue", ["佢哋喺度講緊廣東話。"], ["佢地喺度讲紧广东话"]),
    ("yue_spaces", "yue", ["電腦 軟體"], ["电脑软件"]),
    ("fr_basic", "fr", ["Où est la bibliothèque ?", "L'été, c'est très chaud !"],
     ["ou est la bibliotheque", "l'été c'est très chaud"]),
    ("empty_lists", "en", [], []),
]

# (name, source, refs, hyps): one source of evaluate_st.py; the target language is source.split("_")[-2].
BLEU_CASES = [
    ("en_de", "covost2_en_de_test", ["Das ist ein kleiner Test.", "Guten Morgen, wie geht es dir?"],
     ["Das ist ein Test.", "Guten Morgen, wie geht's dir?"]),
    ("de_en", "covost2_de_en_test", ["The cat sits on the mat.", "I would like a coffee."],
     ["The cat is sitting on the mat.", "I want a coffee."]),
    ("en_zh", "covost2_en_zh_test", ["我们今天去公园散步。", "这是一个测试。"], ["我们今天去公园。", "这是测试。"]),
    ("zh_en_tag", "covost2_zh_en_test", ["Hello world, this is a test."], ["<|en|>Hello world, this is the test."]),
    ("leading_space", "covost2_fr_en_test", ["It is raining today."], [" It is raining today."]),
    ("no_match", "covost2_es_en_test", ["alpha beta gamma delta"], ["one two three four"]),
]

# (name, refs, hyps): evaluate_emotion.py / evaluate_vocal_sound.py, replies lstripped.
ACCURACY_CASES = [
    ("exact", ["neutral", "joy", "anger"], ["neutral", "joy", "anger"]),
    ("leading_space_and_case", ["Neutral", "sad", "Laughter"], [" Neutral", "Sad", "\nLaughter"]),
    ("trailing_text", ["cough", "sneeze"], ["cough ", "sneeze."]),
    ("empty", ["joy", ""], ["", " "]),
]


def extract(repo: str, dest: str) -> None:
    """eval_audio/ at COMMIT, from the official git history, into dest."""
    archive = subprocess.run(["git", "--git-dir", repo, "archive", COMMIT, "eval_audio"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", dest], input=archive, check=True)


def counted_items(compute_wer, text: str, language: str):
    """The items compute_wer counts for `text`, read from its own debug print of `ref_items`; {"raises": ...} where
    it fails (IndexError: no items, while printing the first)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compute_wer([text], [text], language)
    except Exception as e:  # noqa: BLE001 -- which exception the official code raises is what is recorded
        return {"raises": type(e).__name__}
    return {"value": ast.literal_eval(out.getvalue().split("ref_items:\n", 1)[1].split("\n", 1)[0])}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    repo = os.path.abspath(sys.argv[1])
    repo = os.path.join(repo, ".git") if os.path.isdir(os.path.join(repo, ".git")) else repo
    with tempfile.TemporaryDirectory() as tmp:
        extract(repo, tmp)
        official = os.path.join(tmp, "eval_audio")
        # whisper_normalizer/ has no __init__.py: an installed package of that name (pip's whisper-normalizer) would
        # win over the official folder. An empty __init__.py makes the folder, first on the path, the one imported.
        open(os.path.join(official, "whisper_normalizer", "__init__.py"), "w").close()
        sys.path.insert(0, official)
        with contextlib.redirect_stdout(io.StringIO()):
            import evaluate_asr
        for module in ("whisper_normalizer.english", "whisper_normalizer.basic", "cn_tn", "evaluate_tokenizer"):
            assert sys.modules[module].__file__.startswith(official), sys.modules[module].__file__
        import sacrebleu
        import zhconv
        from evaluate_tokenizer import EvaluationTokenizer
        from sklearn.metrics import accuracy_score

    tokenizer = EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True,
                                    character_tokenization=False)

    def st_bleu(source, refs, hyps):  # evaluate_st.py's main block, per source
        text_lan = source.split("_")[-2]
        text_lan = "ja-mecab" if text_lan == "ja" else "zh" if text_lan == "zh" else "13a"
        return {"tokenize": text_lan, **outcome(lambda: sacrebleu.corpus_bleu(hyps, [refs], tokenize=text_lan).score)}

    chinese = CHINESE + random_chinese(0)
    out = {
        "header": {
            "code": f"QwenLM/Qwen2-Audio eval_audio/ @ {COMMIT}: evaluate_asr.py (remove_sp, compute_wer, its "
                    "english_normalizer, basic_normalizer, chinese_normalizer), evaluate_tokenizer.py, the scoring "
                    "lines of evaluate_st.py, evaluate_emotion.py and evaluate_vocal_sound.py",
            "script": "tests/golden/record_qwen2_scoring.py",
            "versions": {name: version(name) for name in
                         ["sacrebleu", "editdistance", "zhconv", "scikit-learn", "regex", "more-itertools", "torch",
                          "transformers"]} | {"python": platform.python_version()},
        },
        "remove_sp": [{"text": t, "language": lang, "out": evaluate_asr.remove_sp(t, lang)}
                      for t in TEXTS for lang in LANGUAGES],
        "english": [{"text": t, **outcome(evaluate_asr.english_normalizer, t)} for t in TEXTS],
        "basic": [{"text": t, **outcome(evaluate_asr.basic_normalizer, t)} for t in TEXTS],
        "chinese": [{"text": t, **outcome(evaluate_asr.chinese_normalizer, t)} for t in TEXTS + chinese],
        "zhconv": [{"text": t, **outcome(zhconv.convert, t, "zh-cn")} for t in TEXTS],
        "tokenize": [{"text": t, **outcome(tokenizer.tokenize, t)} for t in TEXTS],
        "items": [{"text": t, "language": lang, **counted_items(evaluate_asr.compute_wer,
                                                                 evaluate_asr.remove_sp(t, lang), lang)}
                  for t in TEXTS for lang in LANGUAGES],
        "compute_wer": [],
        "bleu": [],
        "accuracy": [],
    }
    for name, lang, refs, hyps in WER_CASES:
        clean_refs = [evaluate_asr.remove_sp(r, lang) for r in refs]
        clean_hyps = [evaluate_asr.remove_sp(h, lang) for h in hyps]
        out["compute_wer"].append({"name": name, "language": lang, "refs": refs, "hyps": hyps,
                                   **outcome(evaluate_asr.compute_wer, clean_refs, clean_hyps, lang)})
    for name, source, refs, hyps in BLEU_CASES:
        out["bleu"].append({"name": name, "source": source, "refs": refs, "hyps": hyps, **st_bleu(source, refs, hyps)})
    for name, refs, hyps in ACCURACY_CASES:
        out["accuracy"].append({"name": name, "refs": refs, "hyps": hyps,
                                **outcome(accuracy_score, refs, [h.lstrip() for h in hyps])})
    write_golden(out, OUT_PATH)


if __name__ == "__main__":
    main()

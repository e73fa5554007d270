"""Record what the official Qwen-Audio speech-translation (S2TT) and audio-caption scoring return on fixed inputs.

What it records, for hand-made references and replies (below: every target language the paper scores, replies with
tags left in, punctuation, empty replies and references, replies that share no word with their reference, Chinese
and Japanese, several references per clip, one clip and several):

- BLEU as eval_audio/evaluate_st.py computes it per `source` group (in its `__main__` block, which cannot be
  imported, so the call is restated here): the target language is `source.split("_")[-2]`, "ja" is scored with
  sacreBLEU's "ja-mecab" tokenizer, "zh" with "zh" and every other language with "13a", and the score is
  `sacrebleu.corpus_bleu(hyps, [refs], tokenize=...).score` on the raw replies. Recorded as a value or as the type
  of the exception sacreBLEU raises.
- The caption scoring of eval_audio/evaluate_caption.py, `compute_caption(gts, res)`, run as it is. It cannot finish
  offline: its last scorer, SPICE, parses captions with Stanford CoreNLP 3.6.0, which caption-evaluation-tools'
  get_stanford_models.sh downloads from the Stanford NLP site and no package registry carries, so SPICE's Java
  process stops (NoClassDefFoundError) and `compute_caption` raises CalledProcessError; that outcome is recorded.
  What it computes before SPICE is recorded step by step, with the same official objects: metrics.py's
  `CocoTokenizer(res, gts).tokenize()` (the captions through the Stanford PTB tokenizer) and the CIDEr that
  caption-evaluation-tools' `Cider().compute_score` gives on them. Where `compute_caption` does finish (CoreNLP
  present), its CIDEr, SPICE and SPIDEr are recorded too.

Which official code: QwenLM/Qwen-Audio eval_audio/evaluate_caption.py and metrics.py at commit e81cc26, extracted
from a git clone of the official repository into a temporary directory and imported from there, as the scripts
import it: with audio-captioning/caption-evaluation-tools (a checkout, commit c1798df) reachable as the package
`caption_evaluation_tools`, through a symbolic link in that directory. That checkout's Java archives
(stanford-corenlp-3.4.1.jar, meteor-1.5.jar, spice-1.0.jar, Meteor-1.5.jar) and METEOR's paraphrase-en.gz are
byte-identical to those pycocoevalcap 1.2 ships (same git blob ids), so they can be copied from that wheel when a
clone lacks them. The temporary directory is the working directory while the official code runs, since
`CocoTokenizer` writes tmp/ref.json and tmp/pred.json there. Nothing official is copied into this repository.

Setup (the official venv: transformers 4.32.0, torch, sacrebleu==1.5.1 as eval_audio/EVALUATION.md pins it):

    pip install scikit-image mecab-python3 ipadic   # caption-evaluation-tools' coco.py imports skimage;
                                                    # sacrebleu[ja] of 1.5.1 pins mecab-python3==1.0.3, which has no
                                                    # wheel for Python 3.11: 1.0.12 was used, the same MeCab 0.996
    java on $PATH (OpenJDK 17 here; EVALUATION.md installs OpenJDK 8)

How to run:

    python tests/golden/record_text_metrics.py /path/to/Qwen-Audio.git /path/to/caption-evaluation-tools

It writes `text_metrics_official.json` next to this script. The test suite only reads that JSON.
"""

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version

from record_scoring import extract, outcome  # this folder is on the path when the script runs

SCRIPTS_COMMIT = "e81cc26"
SCRIPTS = ["evaluate_caption.py", "metrics.py"]
TOOLS_COMMIT = "c1798df"
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_metrics_official.json")

# (name, source, refs, hyps): one `source` group of evaluate_st.py; the target language is source.split("_")[-2].
BLEU_CASES = [
    ("en_de", "covost2_en_de_test", [
        "Die Katze saß auf der Matte.", "Er wohnt in Straßburg, nicht in München!",
        "„Das ist großartig“, sagte sie.", "Wir treffen uns um 15:30 Uhr am Bahnhof."],
        ["Die Katze saß auf der Matte.", "Er lebt in Straßburg und nicht in München.",
         "Das ist toll, sagte sie.", "<|de|>Wir treffen uns um 15.30 Uhr am Bahnhof"]),
    ("de_en", "covost2_de_en_test", [
        "The cat sat on the mat.", "He lives in Strasbourg, not in Munich!", "\"That's great,\" she said.",
        "We'll meet at 3:30 p.m. at the station."],
        ["The cat sat on the mat.", "He lives in Strasbourg and not in Munich.", "That is great, she said.",
         "We meet at 3.30 pm at the station"]),
    ("es_en", "covost2_es_en_test", ["I don't know where my keys are.", "The U.S.A. has fifty states."],
     ["i don't know where my keys are", "The USA has 50 states."]),
    ("fr_en", "covost2_fr_en_test", ["It's raining cats and dogs -- again...", "Is it (really) over?"],
     ["It is raining heavily again.", "Is it really over ?"]),
    ("it_en", "covost2_it_en_test", ["The train leaves at 8 o'clock.", "She bought 1,000 apples & 3 pears."],
     ["The train leaves at eight.", "She bought 1,000 apples &amp; 3 pears."]),
    ("zh_en", "covost2_zh_en_test", ["Hello, world.", "This costs $5.99 (plus tax)."],
     ["Hello world!", "This costs $5.99 plus tax."]),
    ("en_zh", "covost2_en_zh_test", ["我们是阿里巴巴的工程师。", "今天天气很好，我们去公园吧！", "他说：“GPT-4 很强大。”"],
     ["我们是阿里巴巴工程师。", "今天天气不错，我们去公园吧", "<|zh|>他说GPT-4很强大"]),
    ("en_ja", "covost2_en_ja_test", ["猫はマットの上に座っていた。", "東京は日本の首都です。"],
     ["猫がマットの上に座った。", "東京は日本の首都である。"]),
    # The script strips the reply but removes no tag: they count as words, split by 13a at "<", "|" and ">".
    ("tags_left_in", "covost2_de_en_test", ["the cat sat on the mat", "good morning"],
     ["<|en|>the cat sat on the mat<|endoftext|>", "<|startoftranscript|><|en|>good morning"]),
    ("empty_reply", "covost2_de_en_test", ["the cat sat on the mat", "good morning everyone"],
     ["", "good morning everyone"]),
    ("all_replies_empty", "covost2_de_en_test", ["the cat sat on the mat", "good morning"], ["", ""]),
    # No n-gram of any reply is in its reference: sacreBLEU 1.5.1's exp smoothing still gives a positive score.
    ("no_match", "covost2_de_en_test", ["the cat sat on the mat", "good morning"], ["a dog ran", "hello there you"]),
    ("no_match_zh", "covost2_en_zh_test", ["我们是工程师", "你好"], ["他跑步", "再见了朋友"]),
    ("no_match_long", "covost2_de_en_test", ["the cat sat on the mat", "good morning to you all"],
     ["a dog ran in a park", "hello there my friends"]),
    ("no_match_short", "covost2_de_en_test", ["the cat sat on the mat"], ["dog"]),  # no 4-gram: 1.5.1 gives 0
    ("single_example", "covost2_fr_en_test", ["Is it over?"], ["Is it over?"]),
    # sacreBLEU 1.5.1 drops references that are exactly "" and raises EOFError when a segment is left without one;
    # a reference of one space is kept and tokenizes to nothing.
    ("empty_reference", "covost2_de_en_test", ["the cat sat on the mat", ""], ["the cat sat on the mat", "hello"]),
    ("space_reference", "covost2_de_en_test", ["the cat sat on the mat", " "], ["the cat sat on the mat", "hello"]),
    ("whitespace_and_case", "covost2_de_en_test", ["  The Cat  sat.\t", "GOOD morning\n"],
     ["the cat sat .", "Good Morning"]),
    ("entities_and_unicode", "covost2_de_en_test", ["Tom &amp; Jerry &lt;3", "naïve café — résumé…"],
     ["Tom & Jerry <3", "naive cafe - resume..."]),
]

CLOTHO = [
    ["A dog barks repeatedly while cars pass by.", "A dog is barking and traffic is passing.",
     "Cars drive past as a dog barks.", "A dog barks at passing cars on a busy street.",
     "Traffic goes by and a dog keeps barking."],
    ["Rain falls steadily on a metal roof.", "Heavy rain is hitting a tin roof.", "Rain patters on a roof.",
     "Water drips onto a metal surface during a storm.", "A steady rain falls on the roof of a shed."],
    ["Birds chirp in the forest as wind blows.", "Several birds are singing outdoors.",
     "Wind rustles the leaves while birds chirp.", "Birds sing loudly in the trees.",
     "A bird calls out in a quiet forest."],
    ["A man speaks while people laugh in the background.", "Someone is talking and a crowd laughs.",
     "A person gives a speech and the audience laughs.", "People laugh as a man talks.",
     "A crowd laughs at a man's joke."],
]

# (name, gts, res) as evaluate_caption.py passes them to compute_caption: the references of each clip, one reply each.
CAPTION_CASES = [
    ("clotho_like", CLOTHO, ["a dog barks as cars pass by", "rain falls on a roof", "birds chirp in the wind",
                             "a man talks and people laugh"]),
    ("one_clip", CLOTHO[:1], ["a dog barks as cars pass by"]),  # one clip: every n-gram's idf is log(1/1) = 0
    ("two_clips_identical", CLOTHO[:2], [CLOTHO[0][0], CLOTHO[1][2]]),
    ("tags_left_in", CLOTHO, ["<|en|>a dog barks as cars pass by", "rain falls on a roof<|endoftext|>",
                              "<|caption_clotho|>birds chirp", "a man talks and people laugh"]),
    ("punctuation_and_case", CLOTHO, ["A DOG BARKS, AS CARS PASS BY!!", "Rain... falls -- on a \"roof\".",
                                      "birds (chirp) in the wind; loudly?", "a man's talk: people laugh"]),
    ("empty_reply", CLOTHO, ["", "rain falls on a roof", "", "a man talks and people laugh"]),
    ("varying_reference_counts", [CLOTHO[0][:1], CLOTHO[1][:2], CLOTHO[2], CLOTHO[3][:3]],
     ["a dog barks", "rain on a roof", "birds sing in the trees", "a crowd laughs"]),
    ("empty_and_duplicate_references", [["a dog barks", "a dog barks", ""], ["rain falls", "rain falls on a roof"],
                                        ["birds chirp"]], ["a dog barks", "rain falls", "birds"]),
    ("chinese", [["一只狗在叫，汽车驶过。", "狗在叫"], ["雨落在屋顶上。", "下雨了"], ["鸟在唱歌"]],
     ["狗在叫", "雨落在屋顶上", "鸟 在 唱歌 。"]),
    # A line break other than "\n" ends a line for the Java tokenizer: every later reply moves to the next clip.
    ("line_breaks_in_reply", CLOTHO, ["a dog barks\ras cars pass", "rain falls\non a roof",
                                      "birds chirp\u2028in the wind", "a man talks and people laugh"]),
    ("line_breaks_replaced", CLOTHO, ["a dog barks as cars pass", "rain falls\non a roof",
                                      "birds chirp in the wind", "a man talks and people laugh"]),
    # A clip's references given as one string rather than a list: reformat_to_coco iterates it, so each character
    # becomes a reference of its own.
    ("string_references", [CLOTHO[0], "a dog barks", CLOTHO[2]], ["a dog barks", "a dog barks", "birds chirp"]),
]


def official_bleu(corpus_bleu, source, refs, hyps):
    """evaluate_st.py's score of one source group, restated call for call."""
    text_lan = source.split("_")[-2]
    tokenize = {"ja": "ja-mecab", "zh": "zh"}.get(text_lan, "13a")
    return {"tokenize": tokenize, **outcome(lambda: corpus_bleu(hyps, [refs], tokenize=tokenize).score)}


def quiet(fn, *args):
    """fn(*args) with the official code's prints swallowed; exceptions pass."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    repo, tools = (os.path.abspath(path) for path in sys.argv[1:])
    import sacrebleu

    out = {
        "header": {
            "code": f"QwenLM/Qwen-Audio eval_audio/ evaluate_st.py (its BLEU call, restated), evaluate_caption.py, "
                    f"metrics.py @ {SCRIPTS_COMMIT}; audio-captioning/caption-evaluation-tools @ {TOOLS_COMMIT}",
            "script": "tests/golden/record_text_metrics.py",
            "offline": "SPICE could not run (Stanford CoreNLP 3.6.0 is not on this machine and cannot be downloaded "
                       "here): compute_caption is recorded as the exception it raises, and the steps before SPICE "
                       "(CocoTokenizer, CIDEr) are recorded on their own",
            "versions": {name: version(name) for name in ["sacrebleu", "mecab-python3", "ipadic", "numpy"]}
                        | {"python": platform.python_version(),
                           "java": subprocess.run(["java", "-version"], capture_output=True, text=True, check=True)
                           .stderr.splitlines()[0]},
        },
        "bleu": [],
        "caption": [],
    }
    for name, source, refs, hyps in BLEU_CASES:
        out["bleu"].append({"name": name, "source": source, "refs": refs, "hyps": hyps,
                            **official_bleu(sacrebleu.corpus_bleu, source, refs, hyps)})

    with tempfile.TemporaryDirectory() as tmp:
        extract(repo, tmp, [(SCRIPTS_COMMIT, name) for name in SCRIPTS])
        os.symlink(tools, os.path.join(tmp, "caption_evaluation_tools"))
        sys.path.insert(0, tmp)
        os.chdir(tmp)  # CocoTokenizer writes tmp/ref.json and tmp/pred.json in the working directory
        from caption_evaluation_tools.coco_caption.pycocoevalcap.cider.cider import Cider
        from evaluate_caption import compute_caption
        from metrics import CocoTokenizer

        for name, gts, res in CAPTION_CASES:
            tokenizer = quiet(CocoTokenizer, res, gts)
            res_tokens, gts_tokens = quiet(tokenizer.tokenize)
            del tokenizer  # its __del__ removes tmp/ref.json, which the next CocoTokenizer writes again
            cider = float(quiet(Cider().compute_score, gts_tokens, res_tokens)[0])
            full = outcome(compute_caption, gts, res)
            if "value" in full:
                full["value"] = {key: float(full["value"][key]) for key in ("CIDEr", "SPICE", "SPIDEr")}
            out["caption"].append({
                "name": name, "refs": gts, "hyps": res,
                "tokenized_refs": [gts_tokens[i] for i in range(len(res))],
                "tokenized_hyps": [res_tokens[i][0] for i in range(len(res))],
                "CIDEr": cider, "compute_caption": full})
        os.chdir("/")

    with open(OUT_PATH + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(OUT_PATH + ".tmp", OUT_PATH)
    print("wrote", OUT_PATH)


if __name__ == "__main__":
    main()

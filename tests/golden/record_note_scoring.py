"""Record what the official Qwen-Audio note-analysis (NSynth) scoring returns on fixed inputs, as a golden file.

What it records, for hand-made references and replies (below, chosen to hit every branch: missing and malformed
fields, unknown and misspelt sonic labels, no sonic label at all, one label only, pitches an octave or 13 places
apart, empty groups):

- `get_note_info(text)` from eval_audio/evaluate_note_analysis.py, and the known sonic labels the script keeps from
  its `sonic` field (`", "`-separated, restricted to the script's ten labels);
- the script's per-`source` scores, computed as its `__main__` block computes them (that block cannot be imported,
  so it is restated here call for call): instrument and velocity `accuracy_score`, the sonic qualities'
  `average_precision_score(average="macro")` over `MultiLabelBinarizer` columns fitted on references and replies
  together, and heareval_score.py's `Top1Accuracy` and `ChromaAccuracy` on the pitches binarized the same way.
  Each score is recorded on its own, as a value or as the type of the exception it raises.

Which official code: QwenLM/Qwen-Audio eval_audio/evaluate_note_analysis.py and heareval_score.py at commit e81cc26.
The script extracts them from a git clone of the official repository into a temporary directory and imports them
from there; nothing official is copied into this repository. Importing them needs torch, transformers, tqdm,
scikit-learn and scipy (the official venv has them); heareval_score.py also imports pandas, sed_eval and dcase_util
for its sound-event scores, which the note scores never call, so this script puts empty stand-ins for those three
in `sys.modules` when they are not installed.

How to run (in the official venv):

    python tests/golden/record_note_scoring.py /path/to/Qwen-Audio.git

It writes `note_scoring_official.json` next to this script. The test suite only reads that JSON.
"""

import os
import platform
import random
import sys
import tempfile
import types
from importlib.metadata import version
from importlib.util import find_spec

from record_scoring import extract, outcome, write_golden  # this folder is on the path when the script runs

SCRIPTS_COMMIT = "e81cc26"
SCRIPTS = ["evaluate_note_analysis.py", "heareval_score.py"]
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "note_scoring_official.json")
SONIC_LABELS = {"dark", "distortion", "nonlinear_env", "bright", "fast_decay", "long_release", "tempo-synced",
                "reverb", "multiphonic", "percussive"}  # the script's set, restated to record what it keeps


def note(pitch=60, velocity=100, instrument="keyboard_acoustic", sonic="") -> str:
    """A reference in the converted NSynth files' field layout."""
    return (f"<|pitch|><|midi_pitch_{pitch}|><|velocity|><|midi_velocity_{velocity}|>"
            f"<|instrument|>{instrument}<|sonic|>{sonic}")


TEXTS = [
    "", "no tags at all", note(), note(sonic="bright, fast_decay"), note(pitch=21, velocity=25, sonic="dark"),
    note() + "<|endoftext|>", "<|sonic|>bright<|instrument|>guitar_electronic<|velocity|><|midi_velocity_75|>",
    "<|pitch|><|midi_pitch_abc|>", "<|pitch|><|midi_pitch_|>", "<|pitch|><|midi_pitch_60.0|>",
    "<|pitch|><|midi_pitch_ 61 |>", "<|pitch|><|midi_pitch_+62|>", "<|pitch|><|midi_pitch_-3|>",
    "<|pitch|><|midi_pitch_6_4|>", "<|pitch|><|midi_pitch_٦٥|>", "<|pitch|><|midi_pitch_6\n6|>",
    "<|pitch|><|midi_pitch_67|><|pitch|><|midi_pitch_68|>", "<|pitch|><|midi_pitch_xx|><|pitch|><|midi_pitch_69|>",
    "<|pitch|> <|midi_pitch_70|>", "<|PITCH|><|midi_pitch_71|>", "<|pitch|><|midi_pitch_72",
    "<|velocity|><|midi_velocity_127|>", "<|velocity|><|midi_velocity_loud|>", "<|velocity|><|midi_velocity_1e2|>",
    "<|instrument|>bass_synthetic", "<|instrument|>bass\nsynthetic<|sonic|>dark", "<|instrument|>",
    "<|instrument|><|endoftext|>", "<|instrument|>a<|instrument|>b", "<|instrument|> string_acoustic ",
    "<|instrument|>flute, reed", "<|sonic|>", "<|sonic|>bright,dark, reverb, Bright, tempo-synced<|endoftext|>",
    "<|sonic|>reverb,  dark", "<|sonic|>unknown_label, percussive", "<|sonic|>dark\n<|sonic|>bright",
    "<|sonic|>distortion, nonlinear_env, long_release, multiphonic, percussive",
]


def random_group(seed: int) -> tuple[list[str], list[str]]:
    """Four to eight examples with random sonic label sets (one label unknown), pitches from a few values an octave
    apart or not, and velocities from two: enough equal scores and absent labels to exercise the mAP's ties."""
    rng = random.Random(seed)
    labels = ["bright", "dark", "reverb", "fast_decay", "bogus"]

    def one() -> str:
        sonic = ", ".join(rng.sample(labels, rng.randint(0, 3)))
        return note(rng.choice([48, 55, 60, 67, 72]), rng.choice([50, 100]), rng.choice(["bass", "organ"]), sonic)

    n = rng.randint(4, 8)
    return [one() for _ in range(n)], [one() for _ in range(n)]


# (name, refs, hyps): one `source` group of raw references and replies.
GROUPS = [
    ("perfect", [note(60, 100, "bass", "dark"), note(64, 50, "organ", "bright, reverb")],
     [note(60, 100, "bass", "dark"), note(64, 50, "organ", "bright, reverb")]),
    ("octave_off", [note(60), note(62), note(64)], [note(72), note(62), note(52)]),
    # 13 distinct pitches, 52 left out: 40 and 53 sit 12 places apart in the sorted list, so the official chroma
    # accuracy counts 40 against 53 as right and 40 against 52 (an octave) as wrong elsewhere.
    ("chroma_by_position", [note(p) for p in [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]] + [note(40)],
     [note(p) for p in [53, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]] + [note(40)]),
    ("chroma_octave_missed", [note(40), note(41)], [note(52), note(41)]),
    ("missing_fields", [note(60, 100, "bass", "dark"), note(62, 80, "flute", "")], ["", "<|endoftext|>"]),
    ("missing_both_sides", ["", "<|pitch|><|midi_pitch_x|>"], ["", "garbage"]),
    ("unknown_labels", [note(sonic="bright, shiny"), note(sonic="dark")], [note(sonic="shiny"), note(sonic="Dark")]),
    ("no_sonic_label", [note(sonic=""), note(sonic="shiny")], [note(sonic="unknown"), note()]),
    ("one_sonic_label", [note(sonic="dark"), note()], [note(sonic="dark"), note(sonic="dark")]),
    ("label_only_in_replies", [note(sonic="dark"), note(sonic="dark")], [note(sonic="dark, reverb"), note()]),
    ("one_label_only_in_replies", [note(), note(sonic="shiny")], [note(sonic="dark"), note()]),
    ("label_never_predicted", [note(sonic="dark, bright"), note(sonic="bright"), note()],
     [note(sonic="dark"), note(), note(sonic="dark")]),
    ("ties", [note(sonic="bright"), note(sonic="bright"), note(), note(sonic="bright"), note()],
     [note(sonic="bright"), note(), note(sonic="bright"), note(sonic="bright"), note(sonic="bright")]),
    ("one_example", [note(60, 100, "bass", "dark")], [note(61, 100, "bass", "dark, bright")]),
    ("negative_and_out_of_range_pitch", [note(-3), note(200), note(60)], [note(9), note(128), note("60")]),
    ("empty", [], []),
] + [(f"random_{seed}", *random_group(seed)) for seed in range(12)]


def stand_in_modules() -> list[str]:
    """Empty modules for the imports of heareval_score.py that only its sound-event scores use, in `sys.modules`;
    their names, to take them out again once the scripts are imported (scikit-learn looks for pandas there)."""
    class Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):  # not a module attribute the scripts use: let introspection see it is absent
                raise AttributeError(name)
            return Anything(name)

    names = [name for name in ("pandas", "sed_eval", "dcase_util") if find_spec(name) is None]
    names += ["dcase_util.containers"] if "dcase_util" in names else []
    for name in names:
        sys.modules[name] = Anything(name)
    return names


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    # torch and transformers first, so that they see the real set of installed packages, not the stand-ins
    import torch  # noqa: F401
    import transformers  # noqa: F401
    stand_ins = stand_in_modules()
    with tempfile.TemporaryDirectory() as tmp:
        extract(os.path.abspath(sys.argv[1]), tmp, [(SCRIPTS_COMMIT, name) for name in SCRIPTS])
        sys.path.insert(0, tmp)
        from evaluate_note_analysis import get_note_info
        from heareval_score import ChromaAccuracy, Top1Accuracy
    for name in stand_ins:
        del sys.modules[name]
    import numpy as np
    from sklearn.metrics import accuracy_score, average_precision_score
    from sklearn.preprocessing import MultiLabelBinarizer

    def sonic(info):
        """The script's known labels of one parsed text."""
        return [r for r in info["sonic"].split(", ") if r in SONIC_LABELS] if info["sonic"] not in [None, ""] else []

    def scores(refs, hyps):
        """The script's per-source block, one outcome per score."""
        refs, hyps = [get_note_info(t) for t in refs], [get_note_info(t) for t in hyps]
        sonic_gt, sonic_res = [sonic(r) for r in refs], [sonic(h) for h in hyps]
        pitch_gt, pitch_res = [[r["pitch"]] for r in refs], [[h["pitch"]] for h in hyps]

        def sonic_map():
            mul = MultiLabelBinarizer().fit_transform(sonic_gt + sonic_res)
            return average_precision_score(mul[:len(sonic_gt)], mul[len(sonic_gt):], average="macro")

        def pitch(metric):
            mul = MultiLabelBinarizer().fit_transform(np.array(pitch_gt + pitch_res))
            return metric({})._compute(mul[len(pitch_gt):], mul[:len(pitch_gt)])

        return {"instrument": outcome(accuracy_score, [r["instrument"] for r in refs], [h["instrument"] for h in hyps]),
                "velocity": outcome(accuracy_score, [r["velocity"] for r in refs], [h["velocity"] for h in hyps]),
                "sonic": outcome(sonic_map), "top1": outcome(pitch, Top1Accuracy),
                "chroma": outcome(pitch, ChromaAccuracy)}

    out = {
        "header": {
            "code": f"QwenLM/Qwen-Audio eval_audio/ evaluate_note_analysis.py (get_note_info and its per-source "
                    f"scores), heareval_score.py (Top1Accuracy, ChromaAccuracy) @ {SCRIPTS_COMMIT}",
            "script": "tests/golden/record_note_scoring.py",
            "versions": {name: version(name) for name in ["scikit-learn", "numpy", "scipy"]}
                        | {"python": platform.python_version()},
            "stand_ins": stand_ins,
        },
        "note_info": [{"text": t, "out": get_note_info(t), "sonic_labels": sonic(get_note_info(t))} for t in TEXTS],
        "scores": [{"name": name, "refs": refs, "hyps": hyps, **scores(refs, hyps)} for name, refs, hyps in GROUPS],
    }
    write_golden(out, OUT_PATH)


if __name__ == "__main__":
    main()

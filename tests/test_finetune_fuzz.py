"""A bounded fuzz of `qwenaudio finetune`'s options (issue 23): random values for every numeric option and random
files for every path. Each run ends in exit 0 with a trained adapter, or exit 1 or 2 with exactly one `error:` line
and no traceback. Derandomized and small (well under 30 s): most drawn values are refused before the model loads,
and an accepted run takes one step (--steps is drawn from 1 and refused values only) of a rank-2 adapter on a copy
of the tiny model loaded once."""

import copy
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qwenaudio
from qwenaudio import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP0, CLIP1 = REPO_ROOT / "tests" / "golden" / "clip0.wav", REPO_ROOT / "tests" / "golden" / "clip1.wav"
ASR = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
GOOD = [{"audio": str(CLIP0), "prompt": ASR, "response": "one"},
        {"audio": str(CLIP1), "prompt": ASR, "response": "two"}]

NUMBER = st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from([0.0, -0.0, 1e-3, 1e300, -1e-9]),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "x", "1e", "0x10", "--"]))
REFUSED_COUNT = st.one_of(st.integers(max_value=0), st.integers(min_value=10**9 + 1), st.floats(), st.just("two"))
OPTIONS = {  # option: its values (beside NUMBER's, for every numeric option whose cost does not grow with the value)
    "--steps": st.one_of(st.just(1), REFUSED_COUNT),  # an accepted run takes one step
    "--accumulate": st.one_of(st.integers(1, 2), REFUSED_COUNT),
    "--batch-size": NUMBER, "--lr": NUMBER, "--warmup-steps": NUMBER, "--weight-decay": NUMBER,
    "--max-grad-norm": NUMBER, "--seed": NUMBER, "--save-every": NUMBER, "--save-minutes": NUMBER,
    "--eval-every": NUMBER, "--lora-alpha": NUMBER, "--lora-dropout": NUMBER,
    "--lora-rank": st.one_of(st.integers(-2, 8), st.integers(4097, 2**70), st.floats(), st.just("r")),
}
ROW = st.one_of(st.just(GOOD[0]), st.dictionaries(
    st.sampled_from(["audio", "prompt", "response", "messages", "task", "gt", "audios", "source"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=12), st.sampled_from([str(CLIP0), "", ASR, "clip0.wav"]),
              st.lists(st.sampled_from([{"role": "user", "content": "<audio>x.wav</audio>"}, {"role": "assistant"},
                                        {"role": "assistant", "content": "hi"}, 3]), max_size=3)), max_size=4))
FILES = st.one_of(st.sampled_from(["good", "missing", "dir", "empty", "bom", "output-dir", "in-output"]),
                  st.binary(max_size=64), st.lists(ROW, max_size=3))


SCALE = int(os.environ.get("QWENAUDIO_FUZZ", "1"))  # as in test_fuzz.py: more examples, drawn afresh


def fuzz(examples: int):
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)


RUNS = itertools.count()


def place(kind, root: Path, out: Path) -> Path:
    """A file for a path option: the good data, a missing path, a directory, random bytes or rows, …"""
    path = root / f"{next(RUNS)}.jsonl"
    if kind == "missing":
        return path
    if kind == "dir":
        path.mkdir()
    elif kind == "output-dir":
        return out
    elif kind == "in-output" and out.is_file():  # --output-dir is a file: the data is that file
        return out
    elif kind == "in-output":
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        path.write_text(json.dumps(GOOD[0]) + "\n")
    elif isinstance(kind, bytes):
        path.write_bytes(kind)
    else:
        rows = GOOD if kind == "good" else [] if kind == "empty" else GOOD[:1] if kind == "bom" else kind
        path.write_text(("\ufeff" if kind == "bom" else "") + "".join(json.dumps(r) + "\n" for r in rows))
    return path


@fuzz(30)
@given(values=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.data(), max_size=2),
       data=st.one_of(st.just("good"), FILES), eval_data=st.one_of(st.none(), st.just("good"), FILES),
       output=st.sampled_from(["new", "new", "a file", "data's dir"]))  # good files often: runs get to train
def test_every_finetune_option_ends_in_a_result_or_one_error_line(values, data, eval_data, output, tiny_ckpt,
                                                                  tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load", lambda *_, **__: copy.deepcopy(tiny_model))
    root = tmp_path / f"run{next(RUNS)}"
    root.mkdir()
    out = root / "out"
    if output == "a file":
        out.write_text("not a directory")
    arguments = {"--steps": "1", "--batch-size": "2", "--lr": "1e-3", "--lora-rank": "2", "--save-minutes": "0"}
    arguments |= {option: str(draw.draw(OPTIONS[option])) for option, draw in values.items()}
    data_path = place(data, root, out)
    if output == "data's dir":
        out = data_path.parent
    command = ["finetune", "--model", str(tiny_ckpt), "--device", "cpu", "--data", str(data_path), "--output-dir",
               str(out), *[x for option, value in arguments.items() for x in (option, value)]]
    if eval_data is not None:
        command += ["--eval-data", str(place(eval_data, root, out))]
    try:
        code = cli.main(command)
    except SystemExit as e:  # argparse, for a value its type refuses
        code = e.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert "Traceback" not in err, (command, err)
    if code == 0:
        rank = int(arguments["--lora-rank"])  # 0: full fine-tuning
        result = out / ("adapter" if rank else "model")
        assert result.is_dir(), " ".join(command) + "\n" + err
        assert not rank or json.loads((result / "adapter_config.json").read_text())["r"] == rank
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1] and math.isfinite(steps[0]["loss"]), (command, err)
    else:
        assert code in (1, 2) and err.count("error:") == 1 or code == 2 and "error: argument" in err, (command, err)

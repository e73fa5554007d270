"""Nothing lost, nothing silent in fine-tuning (issue 23): an interrupt saves the last whole step and a resume ends
where an uninterrupted run ends; checkpoints every few minutes; a resume refuses other data, held-out data or base
model; every setting checked before the model loads; bad clips named before the model loads; non-finite weights and
full disks stopped without harm to the last checkpoint; outputs never inputs; wrong types refused."""

import errno
import json
import os
import signal
import stat
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import qwenaudio
from qwenaudio import cli, finetune
from qwenaudio.core.checkpoint import quantization_of
from qwenaudio.core import files
from qwenaudio.core.errors import TrainingError
from qwenaudio.lora import DECODER_TARGETS, LoraConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP0, CLIP1 = REPO_ROOT / "tests" / "golden" / "clip0.wav", REPO_ROOT / "tests" / "golden" / "clip1.wav"
ASR = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"


def write_rows(path: Path, rows: list, *, prefix: str = "") -> Path:
    path.write_text(prefix + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tone(path: Path, samples: int = 16000, value: float | None = None) -> Path:
    wave = 0.3 * np.sin(np.arange(samples) / 7.0) if value is None else np.full(samples, value)
    sf.write(path, wave.astype(np.float32), 16000, subtype="FLOAT")
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    """Four short task-form rows (two clips) in tmp_path/train.jsonl."""
    rows = [{"audio": str(clip), "prompt": ASR, "response": text}
            for clip, text in [(CLIP0, "one"), (CLIP1, "two"), (CLIP0, "three"), (CLIP1, "four")]]
    return write_rows(tmp_path / "train.jsonl", rows)


def model_of(tiny_ckpt):
    return qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)


LORA = dict(batch_size=2, lr=1e-2, save_minutes=0, lora=LoraConfig(rank=2, alpha=4, dropout=0.2))  # dropout: RNG


def adapter_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "checkpoint" / "trainable.safetensors")


def progress_of(directory: Path) -> dict:
    return json.loads((directory / "checkpoint" / "progress.json").read_text())


# --------------------------------------------------------------------------------------------- interrupts (2)

def test_an_interrupt_mid_step_or_mid_update_saves_the_last_whole_step_and_resumes_to_the_same_run(
        tiny_ckpt, tmp_path, data, monkeypatch):
    """Ctrl-C during step 3's forward (after dropout drew from the generator) saves step 2 with the generator as it
    was before step 3; a SIGINT during step 3's update lets the update finish and saves step 3. Either way the
    resumed run's losses and adapter equal the uninterrupted run's exactly."""
    examples, _ = finetune.read_examples(data)
    config = finetune.TrainConfig(steps=4, **LORA)
    whole = finetune.train(model_of(tiny_ckpt), examples, tmp_path / "whole", config)

    model, calls = model_of(tiny_ckpt), []
    real = model.loss

    def loss_then_ctrl_c(*args):
        value = real(*args)
        calls.append(1)
        if len(calls) == 3:  # in step 3, after its dropout masks were drawn
            raise KeyboardInterrupt
        return value

    model.loss = loss_then_ctrl_c
    saved = []
    with pytest.raises(KeyboardInterrupt):
        finetune.train(model, examples, tmp_path / "mid-step", config, saved=saved.append)
    assert saved == [2] and progress_of(tmp_path / "mid-step")["losses"] == whole[:2]

    real_schedule = finetune.schedule

    def schedule_with_a_signal(step, config):
        if step == 3 and not sent:  # LambdaLR asks for step 3's rate inside step 3's update
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real_schedule(step, config)

    sent: list = []
    monkeypatch.setattr(finetune.loop, "schedule", schedule_with_a_signal)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(model_of(tiny_ckpt), examples, tmp_path / "mid-update", config)
    monkeypatch.setattr(finetune.loop, "schedule", real_schedule)
    assert sent and progress_of(tmp_path / "mid-update")["losses"] == whole[:3]

    for run in ("mid-step", "mid-update"):
        assert finetune.train(model_of(tiny_ckpt), examples, tmp_path / run, config, resume=True) == whole
        ours, theirs = adapter_of(tmp_path / run), adapter_of(tmp_path / "whole")
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs), run
        steps = [json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]


def test_a_checkpoint_being_written_finishes_on_one_signal_and_the_previous_survives_a_second(
        tiny_ckpt, tmp_path, data, monkeypatch):
    examples, _ = finetune.read_examples(data)
    config = finetune.TrainConfig(steps=2, save_every=1, **LORA)
    real_save = torch.save

    def signalled_save(signals: int):
        def save(obj, path):
            if "losses" not in str(path) and len(saves) == 1:  # the second checkpoint: step 2's
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGINT)
            saves.append(path)
            return real_save(obj, path)
        return save

    saves: list = []
    monkeypatch.setattr(torch, "save", signalled_save(1))
    with pytest.raises(KeyboardInterrupt):
        finetune.train(model_of(tiny_ckpt), examples, tmp_path / "one", config)
    assert len(progress_of(tmp_path / "one")["losses"]) == 2  # step 2's checkpoint was finished, then the stop

    saves.clear()
    monkeypatch.setattr(torch, "save", signalled_save(2))
    with pytest.raises(KeyboardInterrupt):
        finetune.train(model_of(tiny_ckpt), examples, tmp_path / "two", config)
    assert len(progress_of(tmp_path / "two")["losses"]) == 1  # abandoned: step 1's checkpoint is whole
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint", "metrics.jsonl", "tensorboard"]
    monkeypatch.setattr(torch, "save", real_save)
    assert finetune.train(model_of(tiny_ckpt), examples, tmp_path / "two", config, resume=True) == \
        progress_of(tmp_path / "one")["losses"]


def test_a_checkpoint_is_saved_every_few_minutes_by_the_wall_clock_and_the_logged_rate_is_the_step_s(
        tiny_ckpt, tmp_path, data, monkeypatch):
    examples, _ = finetune.read_examples(data)
    now = [0.0]
    monkeypatch.setattr(finetune.loop, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def progress(record):
        now[0] += 70 if record["step"] == 2 else 1  # step 2 ends 72 s in: past save_minutes=1

    config = finetune.TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, part="projection",
                                  save_minutes=1)
    saved: list[int] = []
    finetune.train(model_of(tiny_ckpt), examples, tmp_path / "run", config, progress=progress, saved=saved.append)
    assert saved == [2, 4]
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25])  # warmup's 1e-3, then the cosine
    longer = finetune.TrainConfig(**{**config.__dict__, "steps": 6})  # resumed with more steps: today's schedule
    finetune.train(model_of(tiny_ckpt), examples, tmp_path / "run", longer, resume=True)
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rates[4:] == pytest.approx([1e-3 * finetune.schedule(step, longer) for step in (4, 5)])


def test_the_command_says_which_step_it_saved_when_interrupted_and_resumes(tiny_ckpt, tmp_path, data, monkeypatch,
                                                                          capsys):
    real_step, calls = finetune.loop.compute_gradients, []

    def step_then_signal(*args):
        calls.append(1)
        if len(calls) == 3:
            raise cli.Terminated(signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(finetune.loop, "compute_gradients", step_then_signal)
    run = ["finetune", "--model", str(tiny_ckpt), "--data", str(data), "--output-dir", str(tmp_path / "out"),
           "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--train", "projection", "--device", "cpu"]
    assert cli.main(run) == 143
    err = capsys.readouterr().err
    assert "checkpoint saved at step 2/3: " in err and err.rstrip().endswith(
        "interrupted; rerun with --resume to continue from the last checkpoint")
    assert cli.main(run) == 2
    assert "holds a run: --resume continues it, or choose another --output-dir (it holds checkpoint, metrics.jsonl" \
        in capsys.readouterr().err
    assert cli.main([*run, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step 3/3 loss" in err and "step 2/3" not in err and f"wrote {tmp_path / 'out' / 'model'}" in err


def test_an_interrupt_before_the_first_checkpoint_does_not_send_the_user_to_resume(tiny_ckpt, tmp_path, data,
                                                                                    monkeypatch, capsys):
    def interrupted_while_loading(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load", interrupted_while_loading)
    run = ["finetune", "--model", str(tiny_ckpt), "--data", str(data), "--output-dir", str(tmp_path / "out"),
           "--steps", "3", "--device", "cpu"]
    assert cli.main(run) == 130
    assert capsys.readouterr().err.rstrip().endswith(
        "interrupted; no checkpoint was saved yet: rerun the same command, without --resume, to start")


# ----------------------------------------------------------------------------------------------- resume (4)

def test_a_resume_refuses_other_data_held_out_data_or_base_model_before_the_model_loads(
        tiny_ckpt, tmp_path, data, monkeypatch, capsys):
    import shutil

    dev = write_rows(tmp_path / "dev.jsonl", [{"audio": str(CLIP0), "prompt": ASR, "response": "held out"}])
    run = ["finetune", "--data", str(data), "--eval-data", str(dev), "--output-dir", str(tmp_path / "out"),
           "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--train", "projection", "--device", "cpu"]
    assert cli.main([*run, "--model", str(tiny_ckpt), "--steps", "1"]) == 0
    (tmp_path / "out" / "model").rename(tmp_path / "model-at-1")  # a run to go on with, as if it was interrupted
    inputs = progress_of(tmp_path / "out")["inputs"]
    assert set(inputs) == {"examples", "eval_examples", "model", "weights"} and inputs["weights"] == "float32"
    capsys.readouterr()

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load", no_loading)
    other = shutil.copytree(tiny_ckpt, tmp_path / "same-shape")  # same shapes, one weight file changed
    shard = sorted(other.glob("*.safetensors"))[0]
    shard.chmod(0o644)
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    edited = tmp_path / "train.jsonl"
    original = edited.read_text()
    for change, options, named in [
            ("data", ["--model", str(tiny_ckpt)], "the training examples (--data"),
            ("dev", ["--model", str(tiny_ckpt)], "the held-out examples (--eval-data)"),
            ("model", ["--model", str(other)], "the base model's files (--model)")]:
        edited.write_text(original.replace('"four"', '"FOUR"') if change == "data" else original)
        dev.write_text(json.dumps({"audio": str(CLIP1), "prompt": ASR, "response": "x"}) + "\n" if change == "dev"
                       else json.dumps({"audio": str(CLIP0), "prompt": ASR, "response": "held out"}) + "\n")
        assert cli.main([*run, *options, "--resume"]) == 2, change
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and named in err and "was trained on other inputs" in err, err
    monkeypatch.undo()
    config = finetune.TrainConfig(batch_size=2, lr=1e-3, part="projection")
    with pytest.raises(qwenaudio.InputError, match=r"other inputs: the model's dtype \(--dtype, --int8\) differ"):
        finetune.check_resume(tmp_path / "out" / "checkpoint", config, {**inputs, "weights": "bfloat16"})
    assert cli.main([*run, "--model", str(tiny_ckpt), "--resume"]) == 0  # the same again: it continues


# --------------------------------------------------------------------------------------------- settings (5)

BAD_SETTINGS = [
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"), (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"), (["--lr", "0"], "lr must be a finite number > 0"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be a finite number >= 0"),
    (["--max-grad-norm", "inf"], "max_grad_norm must be a finite number >= 0"),
    (["--warmup-steps", "-1"], "warmup_steps must be an int in 0..1,000,000,000"),
    (["--save-every", "-2"], "save_every must be an int in 0.."), (["--steps", str(10**22)], "steps must be an int"),
    (["--seed", "-1"], "seed must be an int in 0..2**63-1"), (["--seed", str(2**64)], "seed must be an int"),
    (["--save-minutes", "-1"], "save_minutes must be a finite number >= 0"),
    (["--save-minutes", "inf"], "save_minutes must be a finite number >= 0"),
    (["--accumulate", str(10**7)], "accumulate must be an int in 1..1,000,000"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "LoRA alpha must be a finite number > 0, got 0.0"),
    (["--lora-rank", "4", "--lora-alpha", "-4"], "LoRA alpha must be a finite number > 0, got -4.0"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "LoRA alpha must be a finite number > 0"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "LoRA dropout must be in [0, 1), got 1.0"),
    (["--lora-rank", "4", "--lora-dropout", "nan"], "LoRA dropout must be in [0, 1)"),
    (["--lora-rank", "-1"], "LoRA rank must be a positive integer"),
    (["--lora-rank", "100000"], "LoRA rank must be a positive integer (at most 4096)"),
    (["--lora-alpha", "8"], "--lora-alpha: LoRA's options need --lora-rank R"),
    (["--rslora", "--lora-targets", "c_attn"], "--lora-targets, --rslora: LoRA's options need --lora-rank R"),
]


@pytest.mark.parametrize("options,message", BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_every_setting_is_checked_before_the_model_loads(options, message, tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load", lambda *_, **__: pytest.fail("the model was loaded"))
    code = cli.main(["finetune", "--model", str(tmp_path / "none"), "--data", str(data), "--output-dir",
                     str(tmp_path / "out"), "--device", "cpu", *options])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_library_configs_check_every_field_and_only_an_absent_alpha_defaults(tmp_path, data):
    for wrong in [dict(lr=float("inf")), dict(steps=True), dict(steps=10**22), dict(seed=-1), dict(seed=1.5),
                  dict(weight_decay=-1e-3), dict(max_grad_norm=float("nan")), dict(save_minutes=-1),
                  dict(eval_every=-1), dict(shard="yes"), dict(activation_checkpointing=None), dict(lora="r8"),
                  dict(batch_size=0), dict(part=["decoder"])]:
        with pytest.raises(qwenaudio.InputError):
            finetune.TrainConfig(**wrong)
    for wrong in [dict(alpha=0), dict(alpha=-4), dict(alpha=float("inf")), dict(rank=True), dict(dropout=-0.1),
                  dict(targets=("",)), dict(targets="c_attn"), dict(rslora=1), dict(encoder="no")]:
        with pytest.raises(qwenaudio.InputError):
            LoraConfig(**wrong)
    assert LoraConfig(targets=["c_attn"]).targets == ("c_attn",)
    args = cli.finetune.plan(cli.parse(["finetune", "--data", str(data), "--output-dir", str(tmp_path / "o"),
                                        "--lora-rank", "4"]))
    assert args.config.lora.alpha == 8


def test_non_finite_weights_are_never_written(tiny_ckpt, tmp_path, data, monkeypatch):
    examples, _ = finetune.read_examples(data)
    model = model_of(tiny_ckpt)
    config = finetune.TrainConfig(steps=1, batch_size=2, part="projection", save_minutes=0)
    real_step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match=r"transformer\.audio\.\S+ holds values that are not finite: "
                                                     r"the checkpoint of step 1 is not written"):
        finetune.train(model, examples, tmp_path / "run", config)
    assert not (tmp_path / "run" / "checkpoint").exists()
    with pytest.raises(TrainingError, match="holds values that are not finite: the model"):
        finetune.save_model(model, tiny_ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_gradients_that_overflow_stop_the_step_and_the_message_does_not_claim_a_checkpoint(tiny_ckpt, tmp_path, data):
    """A huge alpha overflows the gradient norm: clipping then scaled every gradient by 0 and the run "trained" to
    an adapter equal to the base, exit 0 (trial 2). No checkpoint exists at step 1, so none is said to be kept."""
    examples, _ = finetune.read_examples(data)
    config = finetune.TrainConfig(steps=2, batch_size=2, save_minutes=0, lora=LoraConfig(rank=2, alpha=1e30))
    with pytest.raises(TrainingError, match=r"step 1: the gradients are not finite .*nothing was updated and no "
                                            r"checkpoint was saved yet") as stopped:
        finetune.train(model_of(tiny_ckpt), examples, tmp_path / "run", config)
    assert "is kept" not in str(stopped.value)
    assert not (tmp_path / "run" / "checkpoint").exists()


# ------------------------------------------------------------------------------------------ data (3, 6, 14, 16)

def test_bad_clips_are_named_by_line_before_the_model_loads_and_skipped_with_skip_bad(tmp_path, capsys,
                                                                                      monkeypatch):
    (tmp_path / "dir.wav").mkdir()
    rows = [{"audio": str(CLIP0), "prompt": ASR, "response": "good"},
            {"audio": str(tone(tmp_path / "short.wav", samples=160)), "prompt": ASR, "response": "10 ms"},
            {"audio": str(tone(tmp_path / "empty.wav", samples=0)), "prompt": ASR, "response": "empty"},
            {"audio": str(tone(tmp_path / "nan.wav", value=float("nan"))), "prompt": ASR, "response": "nan"},
            {"audio": "dir.wav", "prompt": ASR, "response": "a directory"},
            {"messages": [{"role": "user", "content": "Audio 1:<audio>short.wav</audio>\nwhat?"},
                          {"role": "assistant", "content": "inline"}]}]
    data = write_rows(tmp_path / "d.jsonl", rows)
    examples, problems = finetune.read_examples(data)
    assert len(examples) == 1 and [p.split(": ")[0] for p in problems] == [f"{data}:{n}" for n in range(2, 7)]
    assert "160 samples (0.010 s) is too short" in problems[0] and "is too short" in problems[4]
    assert "the audio is empty" in problems[1] and "NaN or infinite samples" in problems[2]
    assert "is a directory, not an audio file" in problems[3]
    monkeypatch.setattr(cli, "load", lambda *_, **__: pytest.fail("the model was loaded"))
    run = ["finetune", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(run) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "5 of 6 lines cannot be trained on" in err and f"{data}:4: audio " in err
    args = cli.finetune.plan(cli.parse([*run, "--skip-bad"]))
    assert [e.where for e in args.examples] == [f"{data}:1"] and len(args.bad) == 5


def test_the_official_inline_audio_form_reads_as_the_list_form(tokenizer, tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", sf.read(CLIP0)[0], 16000)
    listed = {"messages": [{"role": "user", "content": [{"audio": "clips/a.wav"}, {"text": "what is it?"}]},
                           {"role": "assistant", "content": "a tone"}]}
    inline = {"messages": [{"role": "user", "content": "Audio 1:<audio>clips/a.wav</audio>\nwhat is it?"},
                           {"role": "assistant", "content": "a tone"}]}
    parts = {"messages": [{"role": "user", "content": [{"text": "Audio 1:<audio>clips/a.wav</audio>\nwhat is it?"}]},
                          {"role": "assistant", "content": "a tone"}]}
    unclosed = {"messages": [{"role": "user", "content": "<audio>clips/a.wav"}, {"role": "assistant", "content": "x"}]}
    missing = {"messages": [{"role": "user", "content": "<audio>nope.wav</audio>"},
                            {"role": "assistant", "content": "x"}]}
    data = write_rows(tmp_path / "chat.jsonl", [listed, inline, parts, unclosed, missing])
    (a, b, c), problems = finetune.read_examples(data)
    assert a.audio == b.audio == c.audio == (tmp_path / "clips" / "a.wav",) and a.turns == b.turns == c.turns
    span = {str(a.audio[0]): 52}.__getitem__
    assert finetune.encode(tokenizer, a, span) == finetune.encode(tokenizer, b, span)
    assert problems == [f"{data}:4: an <audio> tag is not closed by </audio> (the inline form is <audio>PATH</audio>)",
                        f"{data}:5: audio {tmp_path / 'nope.wav'}: no such audio file"]


def test_a_data_file_with_a_byte_order_mark_reads(tmp_path):
    data = write_rows(tmp_path / "bom.jsonl", [{"audio": str(CLIP0), "prompt": ASR, "response": "x"}], prefix="\ufeff")
    examples, problems = finetune.read_examples(data)
    assert problems == [] and len(examples) == 1


def test_library_calls_with_wrong_types_or_no_examples_are_refused(tiny_weights, tmp_path, data):
    model = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False)
    examples, _ = finetune.read_examples(data)
    config = finetune.TrainConfig(steps=1)
    for call in [lambda: finetune.read_examples(123), lambda: finetune.read_examples(data, task=5),
                 lambda: finetune.train(model, [], tmp_path / "o", config),
                 lambda: finetune.train("x", examples, tmp_path / "o", config),
                 lambda: finetune.train(model, "train.jsonl", tmp_path / "o", config),
                 lambda: finetune.train(model, examples, 5, config),
                 lambda: finetune.train(model, examples, tmp_path / "o", {"steps": 1}),
                 lambda: finetune.train(model, examples, tmp_path / "o", config, eval_examples=[1]),
                 lambda: finetune.train(model, examples, tmp_path / "o", config, resume="yes"),
                 lambda: finetune.train(model, examples, tmp_path / "o", config, progress=3),
                 lambda: finetune.encode("tokenizer", examples[0], len),
                 lambda: finetune.encode(model.tokenizer, {"audio": "x"}, len),
                 lambda: finetune.collate(model.tokenizer, examples[:1], [[]], len),
                 lambda: finetune.plan_order([], config), lambda: finetune.plan_order(examples, None),
                 lambda: finetune.schedule("1", config), lambda: finetune.trainable("m", "all"),
                 lambda: finetune.trainable(model, "lm_head"), lambda: finetune.reply_languages(5, "asr"),
                 lambda: finetune.reply_languages(examples, "wer"), lambda: finetune.run_inputs(None),
                 lambda: finetune.save_model("m", tmp_path, tmp_path / "m"),
                 lambda: finetune.check_resume(tmp_path, "config", {}),
                 lambda: finetune.check_resume(123, config, {}), lambda: finetune.check_resume(tmp_path, config, 5)]:
        with pytest.raises(qwenaudio.InputError):
            call()
    assert not (tmp_path / "o").exists()



@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_train_refuses_quantized_weights_it_cannot_update(quantize, tiny_ckpt, tmp_path, data):
    """The command's rule (int8 weights train only a LoRA adapter, int4 layers run inference only) is the library's:
    a caller of `train` is refused before anything is written."""
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False, **{quantize: True})
    examples, _ = finetune.read_examples(data)
    assert quantization_of(model.decoder) == quantize
    with pytest.raises(qwenaudio.InputError, match="int8 weights cannot be fine-tuned in full" if quantize == "int8"
                       else "int4 layers run inference only"):
        finetune.train(model, examples, tmp_path / "o", finetune.TrainConfig(steps=1))
    if quantize == "int4":  # not even an adapter: int4 layers have no backward
        with pytest.raises(qwenaudio.InputError, match="int4 layers run inference only"):
            finetune.train(model, examples, tmp_path / "o", finetune.TrainConfig(steps=1, **LORA))
    assert not (tmp_path / "o").exists()


def test_the_policy_on_a_run_s_weights_full_fine_tuning_in_fp32_and_lora_over_int8_only():
    full, adapter = finetune.TrainConfig(), finetune.TrainConfig(lora=LoraConfig(rank=2))
    assert finetune.weights_dtype(full, None) == "float32" and finetune.weights_dtype(full, "bf16") == "bf16"
    assert finetune.weights_dtype(adapter, None) is None and finetune.weights_dtype(adapter, "fp32") == "fp32"
    finetune.check_quantization(full, None)
    finetune.check_quantization(adapter, "int8")
    for config, quantize in [(full, "int8"), (full, "int4"), (adapter, "int4"), (adapter, "int3"), ("c", None)]:
        with pytest.raises(qwenaudio.InputError):
            finetune.check_quantization(config, quantize)

# ------------------------------------------------------------------------------------------------ outputs (11, 14, 17)

def test_no_output_replaces_an_input_and_an_unwritable_directory_is_found_before_loading(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(cli, "load", lambda *_, **__: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    row = {"audio": str(CLIP0), "prompt": ASR, "response": "x"}
    metrics = write_rows(out / "metrics.jsonl", [row])
    inside = write_rows(out / "checkpoint" / "d.jsonl", [row])
    shutil.copy(CLIP0, out / "checkpoint" / "c.wav")
    clip_inside = write_rows(tmp_path / "c.jsonl", [{**row, "audio": str(out / "checkpoint" / "c.wav")}])
    model_inside = shutil.copytree(tiny_ckpt, out / "model")
    data = write_rows(tmp_path / "d.jsonl", [row])
    cases = [(["--data", str(metrics)], f"{out / 'metrics.jsonl'} would replace the input {metrics}"),
             (["--data", str(inside)], f"{out / 'checkpoint'} would replace the input {inside}"),
             (["--data", str(clip_inside)], f"{out / 'checkpoint'} would replace the input {out / 'checkpoint'}"),
             (["--data", str(data), "--eval-data", str(metrics)], "would replace the input"),
             (["--data", str(data), "--model", str(model_inside)], f"{out / 'model'} would replace the input"),
             (["--data", str(data), "--model", str(tiny_ckpt), "--output-dir", str(tiny_ckpt)],
              "is the model's directory")]
    for options, message in cases:
        code = cli.main(["finetune", "--output-dir", str(out), "--device", "cpu", *options])
        err = capsys.readouterr().err
        assert code == 1 and err.count("error:") == 1 and message in err, (options, err)
    assert metrics.read_text() == json.dumps(row) + "\n"

    def unwritable(*_, **__):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", unwritable)
    code = cli.main(["finetune", "--data", str(data), "--output-dir", str(tmp_path / "ro"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: --output-dir {tmp_path / 'ro'}: cannot write there (Permission denied)\n"


@pytest.mark.parametrize("failing", ["trainable", "state", "metrics", "model"])
def test_a_full_disk_is_one_error_line_and_the_previous_checkpoint_stays(failing, tiny_ckpt, tmp_path, data,
                                                                         monkeypatch, capsys):
    from safetensors import SafetensorError

    real = {"save_file": finetune.checkpoints.save_file, "torch.save": torch.save, "open": open,
            "save_checkpoint": finetune.checkpoints.save_checkpoint}
    calls: list[str] = []

    def full_disk_on_the_second(name, error):
        def write(*args, **kwargs):
            calls.append(name)
            if calls.count(name) == 2 and not (name == "open" and "metrics" not in str(args[0])):
                raise error
            return real[name](*args, **kwargs)
        return write

    if failing == "trainable":
        monkeypatch.setattr(finetune.checkpoints, "save_file", full_disk_on_the_second(
            "save_file", SafetensorError("Error while serializing: IoError(No space left on device)")))
    elif failing == "state":
        monkeypatch.setattr(torch, "save", full_disk_on_the_second(
            "torch.save", RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                       "writing file data/3: file write failed (unexpected pos 512 vs 448)")))
    elif failing == "metrics":
        monkeypatch.setattr(finetune.log, "open", full_disk_on_the_second(
            "open", OSError(errno.ENOSPC, "No space left on device")), raising=False)
    else:
        monkeypatch.setattr(finetune.checkpoints, "save_checkpoint", lambda *_: (_ for _ in ()).throw(
            SafetensorError("Error while serializing: IoError(No space left on device)")))
    run = ["finetune", "--model", str(tiny_ckpt), "--data", str(data), "--output-dir", str(tmp_path / "out"),
           "--steps", "2", "--save-every", "1", "--batch-size", "2", "--lr", "1e-3", "--train", "projection",
           "--device", "cpu"]
    assert cli.main(run) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "could not be written" in err, err
    progress = progress_of(tmp_path / "out")
    assert len(progress["losses"]) == (2 if failing == "model" else 1)  # the last good checkpoint
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []
    assert set(adapter_of(tmp_path / "out")) == set(finetune.trainable(model_of(tiny_ckpt), "projection"))


def test_every_file_of_a_run_has_the_usual_permissions(tiny_ckpt, tmp_path, data):
    from qwenaudio.lora import save_adapter

    umask = os.umask(0o022)
    try:
        model = model_of(tiny_ckpt)
        finetune.train(model, finetune.read_examples(data)[0], tmp_path / "run",
                       finetune.TrainConfig(steps=1, batch_size=2, lora=LoraConfig(rank=2)))
        save_adapter(model, tmp_path / "run" / "adapter")
    finally:
        os.umask(umask)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "run").rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    assert set(modes) == {"run/metrics.jsonl", "run/checkpoint/trainable.safetensors", "run/checkpoint/state.pt",
                          "run/checkpoint/progress.json", "run/adapter/adapter_model.safetensors",
                          "run/adapter/adapter_config.json"} and set(modes.values()) == {0o644}, modes


def test_a_damaged_checkpoint_is_refused_by_name(tiny_weights, tmp_path, data):
    from dataclasses import asdict

    model = qwenaudio.load(tiny_weights, dtype=torch.float32, device="cpu", progress=False)
    examples, _ = finetune.read_examples(data)
    config = finetune.TrainConfig(steps=1, part="projection")
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    for progress, message in [("[1, 2]", "is not a checkpoint's progress record"), ("{oops", "cannot be read"),
                              (json.dumps({"losses": [], "config": json.loads(json.dumps(asdict(config)))}),
                               "the checkpoint cannot be read")]:
        (checkpoint / "progress.json").write_text(progress)
        with pytest.raises(qwenaudio.InputError, match=message):
            finetune.train(model, examples, tmp_path / "run", config, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_command_saves_and_the_resumed_adapter_is_the_uninterrupted_one(kind, tiny_ckpt, tmp_path,
                                                                                         data):
    import subprocess
    import sys

    env = {**os.environ, "QWENAUDIO_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "qwenaudio", "finetune", "--model", str(tiny_ckpt), "--data", str(data), "--steps",
           "6", "--batch-size", "2", "--lr", "1e-2", "--lora-rank", "2", "--lora-dropout", "0.2", "--device", "cpu"]
    cut = subprocess.Popen([*run, "--output-dir", str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE, text=True)
    for line in cut.stderr:
        if line.startswith("step 2/6"):
            cut.send_signal(getattr(signal, kind))
            break
    err = cut.stderr.read()
    assert cut.wait(timeout=120) == 128 + getattr(signal, kind), err
    step = int(err.split("checkpoint saved at step ")[1].split("/")[0])
    assert step >= 2 and err.endswith("interrupted; rerun with --resume to continue from the last checkpoint\n")
    for output, more in (("cut", ["--resume"]), ("whole", [])):
        done = subprocess.run([*run, "--output-dir", str(tmp_path / output), *more], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_run_saved_when_every_model_s_default_targets_were_qwen_audio_s_resumes(tmp_path):
    """LoRA's default targets became the model family's (None in the config); a run checkpointed before, which
    recorded Qwen-Audio's list as the default, still resumes, and a run that chose other targets still does not."""
    config = finetune.TrainConfig(lora=LoraConfig())
    saved = json.loads(json.dumps(asdict(config)))
    (tmp_path / "checkpoint").mkdir()
    for targets, resumes in ((list(DECODER_TARGETS), True), (["c_attn"], False)):
        saved["lora"]["targets"] = targets
        (tmp_path / "checkpoint" / "progress.json").write_text(json.dumps({"config": saved, "losses": []}))
        if resumes:
            assert finetune.check_resume(tmp_path / "checkpoint", config, {})["config"]["lora"]["targets"] == targets
        else:
            with pytest.raises(qwenaudio.InputError, match=r"other settings \(lora\)"):
                finetune.check_resume(tmp_path / "checkpoint", config, {})

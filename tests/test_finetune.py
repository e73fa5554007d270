"""Fine-tuning data: the three line forms to ids and labels (the chat form's context equal to the official
make_context's, recorded in tests/golden/generation_official.json), bad lines named by file and line, and batches
that `QwenAudio.loss` learns from."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

import qwenaudio
from qwenaudio import finetune, tasks
from qwenaudio.core.audio import audio_span, load_audio
from qwenaudio.core.model import IGNORE_INDEX
from qwenaudio.lora import LoraConfig

GOLDEN = json.loads((Path(__file__).parent / "golden" / "generation_official.json").read_text())
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP0, CLIP1 = REPO_ROOT / "tests" / "golden" / "clip0.wav", REPO_ROOT / "tests" / "golden" / "clip1.wav"
ASR = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def spans(example: finetune.Example):
    lengths = {str(p): audio_span(len(load_audio(p))) for p in example.audio}
    return lengths.__getitem__


def test_task_form_learns_the_response_and_the_end_token(tokenizer, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", [
        {"audio": str(CLIP1), "prompt": ASR, "response": "hello world"},
        {"audio": str(CLIP1), "task": "asr", "language": "en", "response": "hello world"},
        {"audio": str(CLIP1), "gt": "hello world", "source": "librispeech_train"}])
    examples, problems = finetune.read_examples(data, task="asr")
    assert problems == [] and len(examples) == 3
    prompt = tokenizer.encode(f"<audio>{CLIP1}</audio>{ASR}", audio_spans=[34])
    answer = tokenizer.encode("hello world") + [tokenizer.eod_id]
    for example in examples:  # a prompt given, the task's official tags, an official evaluation row
        assert finetune.encode(tokenizer, example, spans(example)) == (prompt + answer,
                                                                       [IGNORE_INDEX] * len(prompt) + answer)


def test_audio_paths_are_relative_to_the_data_file(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", sf.read(CLIP0)[0], 16000)
    examples, _ = finetune.read_examples(write_rows(tmp_path / "train.jsonl", [
        {"audio": "clips/a.wav", "prompt": ASR, "response": "x"}]))
    assert examples[0].audio == (tmp_path / "clips" / "a.wav",)


def conversation(tmp_path: Path) -> list[dict]:
    """The recorded two-turn conversation, plus a second reply to learn."""
    texts, reply = ["What do you hear?", "And in this one? Say <|im_start|> and <|en|> literally."], "A short tone."
    return [{"role": "user", "content": [{"audio": str(CLIP0)}, {"text": texts[0]}]},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": [{"audio": str(CLIP1)}, {"text": texts[1]}]},
            {"role": "assistant", "content": "Yes."}]


def test_chat_form_is_the_official_context_with_the_replies_learned(tokenizer, tmp_path):
    official = GOLDEN["chat"]["turns"][1]  # make_context for turn 2, turn 1 in its history
    examples, problems = finetune.read_examples(write_rows(tmp_path / "chat.jsonl",
                                                           [{"messages": conversation(tmp_path)}]))
    assert problems == []
    ids, labels = finetune.encode(tokenizer, examples[0], spans(examples[0]))
    context = official["context_tokens"]
    assert ids[: len(context)] == context
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    first = tokenizer.encode("A short tone.") + [tokenizer.im_end_id]
    assert learned == first + tokenizer.encode("Yes.") + [tokenizer.im_end_id]
    assert ids[len(context):] == labels[len(context):]  # the last reply, all learned
    assert [i for i, label in zip(ids, labels) if label == i] == learned


def test_ms_swift_form_reads_as_the_chat_form(tokenizer, tmp_path):
    swift = {"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                          {"role": "assistant", "content": "A short tone."},
                          {"role": "user", "content": "<audio>And in this one? Say <|im_start|> and <|en|> literally."},
                          {"role": "assistant", "content": "Yes."}], "audios": [str(CLIP0), str(CLIP1)]}
    data = write_rows(tmp_path / "d.jsonl", [swift, {"messages": conversation(tmp_path)}])
    (a, b), problems = finetune.read_examples(data)
    assert problems == [] and a.turns == b.turns and a.audio == b.audio
    assert finetune.encode(tokenizer, a, spans(a)) == finetune.encode(tokenizer, b, spans(b))


def test_bad_lines_are_named_by_file_and_line(tmp_path):
    long = tmp_path / "long.wav"
    sf.write(long, [0.0] * (31 * 16000), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    user = {"role": "user", "content": [{"audio": str(CLIP0)}, {"text": "hi"}]}
    data = write_rows(tmp_path / "d.jsonl", [
        "{oops",
        {"audio": "missing.wav", "prompt": ASR, "response": "x"},
        {"audio": str(long), "prompt": ASR, "response": "x"},
        {"audio": str(CLIP0), "prompt": ASR, "response": "  "},
        {"messages": [user]},
        {"messages": [user, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "<audio><audio>x"}, {"role": "assistant", "content": "y"}],
         "audios": [str(CLIP0)]},
        {"audio": str(CLIP0), "response": "x"},
        {"audio": "broken.wav", "prompt": ASR, "response": "x"},
        {"audio": str(CLIP0), "prompt": ASR, "response": "fine"}])
    examples, problems = finetune.read_examples(data)
    assert len(examples) == 1 and problems == [
        f"{data}:1: not a JSON object (Expecting property name enclosed in double quotes at column 2)",
        f"{data}:2: audio {tmp_path / 'missing.wav'}: no such audio file",
        f"{data}:3: audio {long} lasts 31.0 s; the model hears at most 30 s: cut it",
        f"{data}:4: 'response' is empty: there is nothing to learn",
        f"{data}:5: the conversation must end with an assistant message (its reply is what is learned)",
        f"{data}:6: message 2 (assistant) is out of turn: a conversation is an optional system message, then user "
        "and assistant messages taking turns, ending with the assistant",
        f"{data}:7: message 0 has 2 <audio> placeholder(s) but 'audios' has only 1 path(s) left",
        f"{data}:8: no 'prompt' field and no task (give 'task' in the row or for the file): one of asr, st, srwt, "
        "caption, aqa, emotion, vocal_sound, scene, note_analysis, got None",
        f"{data}:9: audio {tmp_path / 'broken.wav'}: not a readable audio file ("
        + problems[8].split("not a readable audio file (", 1)[1]]


def test_a_batch_is_right_padded_and_learned_from(tiny_ckpt, tmp_path):
    """Right padding (every row at position 0), labels and mask 0 on the padding; a few Adam steps on the batch
    lower the official loss."""
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False).train()
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(CLIP1), "prompt": ASR, "response": "hello world"},
                                             {"messages": conversation(tmp_path)}])
    examples, _ = finetune.read_examples(data)
    clips = [[load_audio(p) for p in e.audio] for e in examples]
    ids, labels, mask = finetune.collate(model.tokenizer, examples, clips, lambda c: audio_span(len(c)))
    short = int(mask[0].sum())
    assert mask[0, :short].all() and not mask[0, short:].any() and (labels[0, short:] == IGNORE_INDEX).all()
    assert (ids[0, short:] == model.tokenizer.eod_id).all() and mask[1].all()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model.loss(ids, labels, mask, [c for row in clips for c in row])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_unknown_task_and_unreadable_files_are_refused(tmp_path):
    with pytest.raises(qwenaudio.InputError, match="unknown task 'wer'"):
        finetune.read_examples(tmp_path / "x.jsonl", task="wer")
    with pytest.raises(qwenaudio.InputError, match="cannot read the data file"):
        finetune.read_examples(tmp_path / "absent.jsonl")


SHARED = ["1272-128104-0000.flac", "1089_134686_000007_000004.wav", "es.mp3", "glass-breaking-151256.mp3"]
TARGETS = ["the quilter speaks", "a quiet reading", "hola amigos", "glass breaks"]


def four_examples(tmp_path: Path, shared_audio: Path) -> list[finetune.Example]:
    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    examples, problems = finetune.read_examples(write_rows(tmp_path / "four.jsonl", rows))
    assert problems == []
    return examples


def test_a_run_s_steps_done_and_its_export_as_a_model_or_an_adapter(tiny_ckpt, tmp_path, shared_audio):
    from qwenaudio.finetune.checkpoints import checkpoint_dir, export, steps_done

    examples = four_examples(tmp_path, shared_audio)
    assert steps_done(tmp_path / "full") == 0 and checkpoint_dir(tmp_path / "full") == tmp_path / "full" / "checkpoint"
    for name, config in (("full", finetune.TrainConfig(steps=2, batch_size=2, part="projection")),
                         ("lora", finetune.TrainConfig(steps=1, batch_size=2, lora=LoraConfig(rank=2)))):
        model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
        finetune.train(model, examples, tmp_path / name, config)
        assert steps_done(tmp_path / name) == config.steps
        target = export(model, config, tiny_ckpt, tmp_path / name / "out", base_model="tiny")
        assert target == tmp_path / name / "out"
    assert qwenaudio.load(tmp_path / "full" / "out", dtype=torch.float32, device="cpu", progress=False)
    adapter = json.loads((tmp_path / "lora" / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny" and not (tmp_path / "lora" / "out" / "config.json").exists()


@pytest.mark.slow
def test_a_tiny_model_learns_four_transcripts_and_then_says_them(tiny_ckpt, tmp_path, shared_audio):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    # The loss ends near 0.015 (0.006-0.007 from checkpoint seeds 1-3); 25 steps end near 0.07.
    config = finetune.TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=5, part="all")
    losses = finetune.train(model, four_examples(tmp_path, shared_audio), tmp_path / "run", config)
    assert losses[-1] < 0.05, losses
    model.eval()
    clips = [str(shared_audio / clip) for clip in SHARED]
    assert tasks.transcribe(model, clips, language="en", max_new_tokens=12) == TARGETS
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31)) and [m["loss"] for m in metrics] == losses
    saved = finetune.save_model(model, tiny_ckpt, tmp_path / "tuned")  # the official layout, loadable again
    again = qwenaudio.load(saved, dtype=torch.float32, device="cpu", progress=False)
    assert tasks.transcribe(again, clips, language="en", max_new_tokens=12) == TARGETS


def test_resuming_gives_the_same_losses_as_an_uninterrupted_run(tiny_ckpt, tmp_path, shared_audio):
    examples = four_examples(tmp_path, shared_audio)
    config = finetune.TrainConfig(steps=4, batch_size=2, accumulate=2, lr=1e-3, warmup_steps=1, save_every=2,
                                  part="decoder")
    whole = finetune.train(qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False), examples,
                           tmp_path / "whole", config)
    first = finetune.train(qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False), examples,
                           tmp_path / "cut", finetune.TrainConfig(**{**config.__dict__, "steps": 2}))
    assert first == whole[:2]
    fresh = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)  # a new process's model
    resumed = finetune.train(fresh, examples, tmp_path / "cut", config, resume=True)  # 2 more steps than planned
    assert resumed == whole

    def killed_in_step_4(record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # after step 3's update, before its checkpoint: step 2's is on disk

    with pytest.raises(KeyboardInterrupt):
        finetune.train(qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False), examples,
                       tmp_path / "killed", config, progress=killed_in_step_4)
    again = finetune.train(qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False), examples,
                           tmp_path / "killed", config, resume=True)
    assert again == whole
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3, done again after the resume, is listed once


def test_a_loss_that_is_not_finite_stops_before_the_update(tiny_ckpt, tmp_path, shared_audio):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    with torch.no_grad():
        model.decoder.ln_f.weight.fill_(float("nan"))
    before = model.decoder.h[0].mlp.w1.weight.clone()
    stopped = r"step 1: the loss is not finite \(batch .*four.jsonl:\d.*: loss nan\); nothing was updated"
    with pytest.raises(qwenaudio.QwenAudioError, match=stopped):
        finetune.train(model, four_examples(tmp_path, shared_audio), tmp_path / "run",
                       finetune.TrainConfig(steps=2, batch_size=4))
    assert torch.equal(model.decoder.h[0].mlp.w1.weight, before)


def test_only_the_chosen_part_trains(tiny_ckpt):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    assert set(finetune.trainable(model, "projection")) == {
        "transformer.audio.ln_post.weight", "transformer.audio.ln_post.bias", "transformer.audio.proj.weight",
        "transformer.audio.proj.bias", "transformer.audio.audio_bos_eos_token.weight"}
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(name.startswith(("transformer.h.", "transformer.wte", "transformer.ln_f", "lm_head"))
               for name in finetune.trainable(model, "decoder"))
    with pytest.raises(qwenaudio.InputError, match="part must be one of decoder, encoder, projection, all"):
        finetune.TrainConfig(part="lm_head")


@pytest.mark.slow
def test_the_finetune_command_trains_resumes_and_refuses_bad_data(tiny_ckpt, tmp_path, shared_audio):
    from .test_cli import qwenaudio_cli

    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    run = ["finetune", "--model", tiny_ckpt, "--data", data, "--output-dir", tmp_path / "out", "--steps", "2",
           "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    done = qwenaudio_cli(*run, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step 2/2 loss " in done.stderr and f"wrote {tmp_path / 'out' / 'model'}" in done.stderr
    assert qwenaudio.load(tmp_path / "out" / "model", dtype=torch.float32, device="cpu", progress=False)
    again = qwenaudio_cli(*run, home=tmp_path)
    assert again.returncode == 2 and "holds a run: --resume continues it" in again.stderr
    bad = write_rows(tmp_path / "bad.jsonl", [*rows, {"audio": "nope.wav", "prompt": ASR, "response": "x"}])
    refused = qwenaudio_cli(*run[:3], "--data", bad, "--output-dir", tmp_path / "o2", home=tmp_path)
    assert refused.returncode == 2 and "1 of 5 lines cannot be trained on" in refused.stderr
    assert f"{bad}:5: audio {tmp_path / 'nope.wav'}: no such audio file" in refused.stderr
    assert not (tmp_path / "o2").exists()  # refused before anything was written


@pytest.mark.slow
def test_the_finetune_command_evaluates_held_out_data_and_refuses_what_it_cannot(tiny_ckpt, tmp_path, shared_audio):
    from .test_cli import qwenaudio_cli

    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    data, dev = write_rows(tmp_path / "train.jsonl", rows[:2]), write_rows(tmp_path / "dev.jsonl", rows[2:])
    run = ["finetune", "--model", tiny_ckpt, "--data", data, "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
           "--train", "projection", "--device", "cpu"]
    done = qwenaudio_cli(*run, "--eval-data", dev, "--eval-task", "emotion", "--output-dir", tmp_path / "out",
                         home=tmp_path)
    assert done.returncode == 0, done.stderr
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"step 2/2 loss {last['loss']:.4f}" in done.stderr
    assert f"eval_loss {last['eval_loss']:.4f} eval_accuracy {last['eval_accuracy']:.4f}" in done.stderr
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": [{"audio": str(CLIP0)}]}, {"role": "assistant", "content": "a"}]}])
    bad = write_rows(tmp_path / "bad.jsonl", [rows[0], {"audio": str(CLIP0), "prompt": ASR}])
    for more, message in [
            (["--eval-task", "asr"], "--eval-task and --eval-every need --eval-data"),
            (["--eval-data", bad], f"1 line(s) of --eval-data cannot be evaluated:\n  {bad}:2: "),
            (["--eval-data", chat, "--eval-task", "asr"], f"{chat}:1: replies are scored for task-form examples"),
            (["--fsdp", "--lora-rank", "4"], "shard (--fsdp) splits full fine-tuning's weights over the processes"),
            (["--fsdp", "--eval-data", data, "--eval-task", "asr"], "eval_task (--eval-task) with shard (--fsdp)"),
            (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'")]:
        refused = qwenaudio_cli(*run, *more, "--output-dir", tmp_path / "o3", home=tmp_path)
        assert refused.returncode == 2 and message in refused.stderr, (more, refused.stderr)
        assert not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_finetune_example_on_tiny_checkpoint(tiny_ckpt, tmp_path, shared_audio):
    import subprocess
    import sys

    rows = [{"audio": str(shared_audio / SHARED[0]), "prompt": ASR, "response": TARGETS[0]}]
    data = write_rows(tmp_path / "train.jsonl", rows)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "finetune.py"), str(data),
                           str(tmp_path / "out"), "--model", str(tiny_ckpt), "--steps", "2", "--eval-data", str(data)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("step 1: loss ")
    assert done.stdout.splitlines()[1].startswith("step 2: loss ") and ", held-out loss " in done.stdout
    assert f"saved {tmp_path / 'out' / 'model'}; the first example now reads:" in done.stdout


def test_a_lora_adapter_over_an_int8_base_trains_and_resumes_to_the_same_losses(tiny_ckpt, tmp_path, shared_audio):
    from qwenaudio.lora import LoraConfig, LoraLinear

    examples = four_examples(tmp_path, shared_audio)
    config = finetune.TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2,
                                  lora=LoraConfig(rank=4, alpha=8, dropout=0.1))  # dropout: the random state resumes

    def int8_model():
        return qwenaudio.load(tiny_ckpt, dtype=torch.bfloat16, device="cpu", quantize="int8", progress=False)

    model = int8_model()
    before = model.decoder.h[0].attn.c_attn.weight.clone()
    whole = finetune.train(model, examples, tmp_path / "whole", config)
    layer = model.decoder.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and torch.equal(layer.base.weight, before)  # the int8 base is untouched
    assert layer.lora_B.weight.abs().max() > 0 and whole[-1] < whole[0]

    def killed_in_step_4(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.train(int8_model(), examples, tmp_path / "cut", config, progress=killed_in_step_4)
    assert finetune.train(int8_model(), examples, tmp_path / "cut", config, resume=True) == whole


@pytest.mark.slow
def test_a_lora_adapter_learns_four_transcripts(tiny_ckpt, tmp_path, shared_audio):
    from qwenaudio.lora import LoraConfig, save_adapter

    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    config = finetune.TrainConfig(steps=60, batch_size=4, lr=1e-2, warmup_steps=5,
                                  lora=LoraConfig(rank=16, alpha=32, encoder=True))
    losses = finetune.train(model, four_examples(tmp_path, shared_audio), tmp_path / "run", config)
    # The loss stops near 4.7, not near 0: the tiny model's frozen ln_f and lm_head bound how far one logit can rise
    # above the others, and full fine-tuning (which trains them) goes under 0.05. Greedy decoding needs only the
    # right token on top.
    assert losses[-1] < 0.4 * losses[0], losses
    save_adapter(model, tmp_path / "adapter")
    tuned = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False, adapter=tmp_path / "adapter")
    clips = [str(shared_audio / clip) for clip in SHARED]
    assert tasks.transcribe(tuned, clips, language="en", max_new_tokens=12) == TARGETS


@pytest.mark.slow
def test_lora_from_the_command_line_train_use_and_merge(tiny_ckpt, tmp_path, shared_audio):
    from .test_cli import qwenaudio_cli

    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    done = qwenaudio_cli("finetune", "--model", tiny_ckpt, "--data", data, "--output-dir", tmp_path / "out",
                         "--steps", "3", "--lr", "1e-2", "--lora-rank", "4", "--int8", "--device", "cpu", home=tmp_path)
    assert done.returncode == 0, done.stderr
    adapter = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = qwenaudio_cli("merge", tiny_ckpt, adapter, tmp_path / "merged", home=tmp_path)
    assert merged.returncode == 0, merged.stderr
    clip = str(shared_audio / SHARED[0])
    with_adapter = qwenaudio_cli("transcribe", clip, "--model", tiny_ckpt, "--adapter", adapter, "--dtype", "float32",
                                 "--max-new-tokens", "6", "--device", "cpu", home=tmp_path)
    folded = qwenaudio_cli("transcribe", clip, "--model", tmp_path / "merged", "--dtype", "float32",
                           "--max-new-tokens", "6", "--device", "cpu", home=tmp_path)
    assert with_adapter.returncode == folded.returncode == 0 and with_adapter.stdout == folded.stdout
    refused = qwenaudio_cli("finetune", "--model", tiny_ckpt, "--data", data, "--output-dir", tmp_path / "o2",
                            "--int8", home=tmp_path)
    assert refused.returncode == 2 and "add --lora-rank to train an adapter" in refused.stderr


@pytest.mark.slow
def test_two_processes_under_torchrun_take_one_process_s_steps(tiny_ckpt, tmp_path, shared_audio):
    """Two processes with one batch each per step against one process accumulating both: the same global batch,
    so the same losses and parameters (within 1e-6)."""
    from safetensors.torch import load_file

    from .test_cli import qwenaudio_cli, torchrun_cli

    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    dev = write_rows(tmp_path / "dev.jsonl", rows[:3])  # 3 batches of 1: one process evaluates 2, the other 1
    run = ["finetune", "--model", tiny_ckpt, "--data", data, "--steps", "3", "--batch-size", "1", "--lr", "1e-3",
           "--train", "projection", "--device", "cpu", "--eval-data", dev, "--eval-task", "emotion", "--eval-every",
           "2"]  # emotion: replies of at most 4 tokens, scored by accuracy
    one = qwenaudio_cli(*run, "--accumulate", "2", "--output-dir", tmp_path / "one", home=tmp_path)
    two = torchrun_cli(*run, "--output-dir", tmp_path / "two", home=tmp_path)
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    first, second = (load_file(tmp_path / d / "checkpoint" / "trainable.safetensors") for d in ("one", "two"))
    assert set(first) == set(second)
    for name in first:
        assert torch.allclose(first[name], second[name], rtol=0, atol=1e-6), name
    losses = [json.loads((tmp_path / d / "checkpoint" / "progress.json").read_text())["losses"] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    evaluated = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").open()] for d in ("one", "two")]
    assert [[r["step"] for r in records if "eval_loss" in r] for records in evaluated] == [[2, 3], [2, 3]]
    for mine, theirs in zip(*evaluated):
        if "eval_loss" in mine:
            assert (mine["eval_loss"], mine["eval_tokens"], mine["eval_accuracy"]) == pytest.approx(
                (theirs["eval_loss"], theirs["eval_tokens"], theirs["eval_accuracy"]), rel=1e-6)


@pytest.mark.slow
def test_a_tiny_chat_model_learns_four_answers_through_the_chat_form(tmp_path, shared_audio, vocab_file):
    from qwenaudio.chat import Chat
    from qwenaudio.testing import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "chat", seed=0, vocab_file=vocab_file, chat=True)
    rows = [{"messages": [{"role": "user", "content": [{"audio": str(shared_audio / clip)}, {"text": "What is it?"}]},
                          {"role": "assistant", "content": text}]} for clip, text in zip(SHARED, TARGETS)]
    examples, problems = finetune.read_examples(write_rows(tmp_path / "chat.jsonl", rows))
    assert problems == []
    model = qwenaudio.load(checkpoint, dtype=torch.float32, device="cpu", progress=False)
    # The loss ends near 0.008 (0.004 from checkpoint seeds 1-2); 20 steps end near 0.07-0.14.
    config = finetune.TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=5, part="all")
    losses = finetune.train(model, examples, tmp_path / "run", config)
    assert losses[-1] < 0.05, losses
    model.eval()
    for clip, text in zip(SHARED, TARGETS):
        assert Chat(model).ask([{"audio": str(shared_audio / clip)}, "What is it?"], do_sample=False) == text


def test_a_task_row_s_language_must_have_a_tag(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [{"audio": str(CLIP0), "task": "asr", "language": "xx", "response": "a"},
                                             {"audio": str(CLIP0), "task": "asr", "response": "a", "source": "mine"}])
    _, problems = finetune.read_examples(data)
    assert problems == [f"{data}:1: language 'xx' has no tag; Qwen-Audio knows en, zh, de, es, ko, fr, ja, it",
                        f"{data}:2: no language: the row has no 'lang' field and its source 'mine' names no dataset "
                        "of known language (librispeech, aishell, industrial); give one (--language)"]


def test_an_eval_set_gives_the_eval_loss_and_the_scores_of_greedy_replies(tiny_ckpt, tmp_path, shared_audio):
    """eval_loss equals the official loss of the trained model over all eval examples in one batch (the encoder's
    batch crop moves it by ~3e-5); eval_wer equals what `qwenaudio evaluate asr` (the official script's protocol)
    finds for the trained model on the same clips and references."""
    from qwenaudio import evaluation
    from qwenaudio.core.model import next_token_loss

    examples = four_examples(tmp_path, shared_audio)
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    config = finetune.TrainConfig(steps=2, batch_size=2, lr=1e-3, part="projection", eval_every=1, eval_task="asr")
    finetune.train(model, examples[:2], tmp_path / "run", config, eval_examples=examples)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("eval_loss" in r and "eval_wer" in r for r in records)
    model.eval()
    clips = [[load_audio(p) for p in e.audio] for e in examples]
    ids, labels, mask = finetune.collate(model.tokenizer, examples, clips, lambda c: audio_span(len(c)))
    with torch.no_grad():
        whole = next_token_loss(model(ids, mask, [c for row in clips for c in row]), labels).item()
    assert records[-1]["eval_loss"] == pytest.approx(whole, rel=1e-4)
    assert records[-1]["eval_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())
    rows = [{"audio": str(e.audio[0]), "gt": e.response, "source": "four", "lang": "en"} for e in examples]
    summary = evaluation.evaluate(model, "asr", write_rows(tmp_path / "official.jsonl", rows), tmp_path / "eval",
                                  batch_size=2)
    assert records[-1]["eval_wer"] == pytest.approx(summary["sources"][0]["scores"]["wer"])


def test_eval_replies_need_task_form_examples_in_a_scored_language(tmp_path, shared_audio):
    data = write_rows(tmp_path / "dev.jsonl", [
        {"audio": str(CLIP0), "prompt": ASR, "response": "a"},
        {"audio": str(CLIP0), "prompt": ASR.replace("<|en|>", "<|de|>"), "response": "a"},
        {"messages": [{"role": "user", "content": [{"audio": str(CLIP0)}]}, {"role": "assistant", "content": "a"}]}])
    examples, _ = finetune.read_examples(data)
    assert finetune.reply_languages(examples[:1], "asr") == ["en"]
    assert finetune.reply_languages(examples[:1], "emotion") == [None]
    with pytest.raises(qwenaudio.InputError, match=rf"{data}:2: asr is scored in en or zh only, not 'de'"):
        finetune.reply_languages(examples, "asr")
    with pytest.raises(qwenaudio.InputError, match=rf"{data}:3: replies are scored for task-form examples"):
        finetune.reply_languages(examples[2:], "emotion")


def test_tensorboard_gets_every_record_and_forgets_steps_a_resume_takes_again(tiny_ckpt, tmp_path, shared_audio):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    examples = four_examples(tmp_path, shared_audio)
    config = finetune.TrainConfig(steps=4, batch_size=2, lr=1e-3, part="projection", save_every=2)

    def run(directory: str, **options) -> list[float]:
        model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
        return finetune.train(model, examples, tmp_path / directory, config, eval_examples=examples[:1], **options)

    def killed_after_logging_step_3(record: dict) -> None:
        if record["step"] == 3:  # logged, not yet in a checkpoint (the last one holds step 2)
            raise KeyboardInterrupt

    whole = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("cut", progress=killed_after_logging_step_3)
    assert run("cut", resume=True) == whole
    for directory in ("whole", "cut"):
        board = EventAccumulator(str(tmp_path / directory / "tensorboard"))
        board.Reload()
        assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [
            (step, pytest.approx(loss, rel=1e-6)) for step, loss in enumerate(whole, 1)]
        assert [e.step for e in board.Scalars("eval/loss")] == [2, 4]  # with each checkpoint
        assert {"train/lr", "train/tokens", "train/seconds", "eval/tokens"} <= set(board.Tags()["scalars"])
        assert [json.loads(line)["step"] for line in (tmp_path / directory / "metrics.jsonl").open()] == [1, 2, 3, 4]


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights_and_moments(tiny_ckpt, tmp_path,
                                                                                     shared_audio):
    examples = four_examples(tmp_path, shared_audio)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
        config = finetune.TrainConfig(steps=2, batch_size=4, lr=1e-3, part="all", precision=precision)
        runs[precision] = finetune.train(model, examples, tmp_path / precision, config)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        state = torch.load(tmp_path / precision / "checkpoint" / "state.pt", weights_only=True)["optimizer"]["state"]
        assert {v.dtype for moments in state.values() for k, v in moments.items() if k != "step"} == {torch.float32}
    assert runs["bf16"][0] != runs["fp32"][0]  # bf16 matmuls ran
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)
    with pytest.raises(qwenaudio.InputError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        finetune.TrainConfig(precision="fp16")
    with pytest.raises(qwenaudio.InputError, match=r"shard \(--fsdp\) splits full fine-tuning's weights"):
        finetune.TrainConfig(shard=True, lora=LoraConfig(rank=4))


@pytest.mark.slow
def test_fsdp_over_two_processes_takes_one_process_s_steps_and_resumes(tiny_ckpt, tmp_path, shared_audio):
    """Full fine-tuning sharded over two processes (FSDP, gloo) against one process accumulating both batches:
    the same losses within 1e-6, and the same weights within 1 % of how far training moved them. (Not within 1e-6:
    the gradients are summed in another order, and AdamW divides each by its own running size, so a rounding
    difference in a near-zero gradient becomes a difference in its step.) A sharded run cut after step 2 and
    resumed (its checkpoint's whole tensors cut into shards again) ends where the uninterrupted one does, within
    1e-6: the warmup is longer than the run, so the 2-step run's learning rates are the 3-step run's."""
    from safetensors.torch import load_file

    from qwenaudio.core.checkpoint import load_checkpoint

    from .test_cli import qwenaudio_cli, torchrun_cli

    rows = [{"audio": str(shared_audio / clip), "prompt": ASR, "response": text} for clip, text in zip(SHARED, TARGETS)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    dev = write_rows(tmp_path / "dev.jsonl", rows[:3])  # 3 batches: one process passes a weightless third
    run = ["finetune", "--model", tiny_ckpt, "--data", data, "--batch-size", "1", "--lr", "1e-2", "--warmup-steps",
           "10", "--train", "all", "--device", "cpu", "--eval-data", dev, "--steps", "3"]  # a later --steps wins
    done = [qwenaudio_cli(*run, "--accumulate", "2", "--output-dir", tmp_path / "one", home=tmp_path),
            torchrun_cli(*run, "--fsdp", "--output-dir", tmp_path / "two", home=tmp_path),
            torchrun_cli(*run, "--fsdp", "--steps", "2", "--output-dir", tmp_path / "cut", home=tmp_path)]
    (tmp_path / "cut" / "model").rename(tmp_path / "cut" / "model-at-2")
    done.append(torchrun_cli(*run, "--fsdp", "--resume", "--output-dir", tmp_path / "cut", home=tmp_path))
    assert [d.returncode for d in done] == [0] * 4, done[-1].stderr[-3000:]
    initial = load_checkpoint(tiny_ckpt, dtype=torch.float32)
    one, two, cut = (load_file(tmp_path / d / "checkpoint" / "trainable.safetensors") for d in ("one", "two", "cut"))
    assert set(one) == set(two) == set(cut) == set(initial) - {"transformer.audio.positional_embedding"}  # constant
    for name in one:
        moved = (one[name] - initial[name]).abs().max()
        assert (one[name] - two[name]).abs().max() <= 0.01 * moved, name
        assert torch.allclose(cut[name], two[name], rtol=0, atol=1e-6), name
    progress = [json.loads((tmp_path / d / "checkpoint" / "progress.json").read_text())["losses"]
                for d in ("one", "two", "cut")]
    assert len(progress[0]) == 3 and progress[0] == pytest.approx(progress[1], rel=1e-6) == progress[2]
    held_out = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
                for d in ("one", "two", "cut")]
    assert held_out[0] == pytest.approx(held_out[1], rel=1e-5) and held_out[1] == pytest.approx(held_out[2], rel=1e-6)
    models = [load_checkpoint(tmp_path / d / "model", dtype=torch.float32) for d in ("one", "two")]
    assert set(models[0]) == set(models[1]) == set(initial)
    for name, tensor in models[0].items():
        assert (tensor - models[1][name]).abs().max() <= 0.01 * (tensor - initial[name]).abs().max(), name


"""Fine-tuning Qwen2-Audio: its examples as transformers' processor makes them (the base model's
`<|audio_bos|><|AUDIO|><|audio_eos|>` prompts, the Instruct chat template), `QwenAudio.loss` and its gradients equal
to transformers 5.25.0's `Qwen2AudioForConditionalGeneration(labels=…)` on a batch, and runs (LoRA and full, the
command, a resume) on a tiny Qwen2-Audio checkpoint."""

import json
from pathlib import Path

import pytest
import torch

import qwenaudio
from qwenaudio import finetune, lora
from qwenaudio.core.audio import load_audio
from qwenaudio.core.model import IGNORE_INDEX
from qwenaudio.finetune.data import batch_inputs

from .conftest import GOLDEN, reference
from .test_finetune import write_rows

CLIP0, CLIP1 = GOLDEN / "clip0.wav", GOLDEN / "clip1.wav"
WAVES = {str(CLIP0): load_audio(CLIP0), str(CLIP1): load_audio(CLIP1)}
ASR = "Detect the language and recognize the speech: <|en|>"


def load(ckpt: Path) -> qwenaudio.QwenAudio:
    return qwenaudio.load(ckpt, dtype=torch.float32, device="cpu", progress=False)


def spans(model):
    return lambda path: model.encoder.span_length(len(WAVES[path]))


def processor(ckpt: Path):
    return reference("transformers").AutoProcessor.from_pretrained(ckpt)


def conversation() -> tuple[list[dict], list[dict]]:
    """A two-turn conversation as a data row's messages and as transformers' chat template takes it."""
    asked = ["What do you hear?", "And this one? Say <|im_start|> literally."]
    replies = ["A short tone.", "\nYes."]  # a reply starting with a newline shares a token with its role's line
    ours = [m for k in range(2) for m in ({"role": "user", "content": [{"audio": str((CLIP0, CLIP1)[k])},
                                                                      {"text": asked[k]}]},
                                          {"role": "assistant", "content": replies[k]})]
    theirs = [m for k in range(2) for m in ({"role": "user", "content": [{"type": "audio", "audio_url": f"{k}.wav"},
                                                                        {"type": "text", "text": asked[k]}]},
                                            {"role": "assistant", "content": replies[k]})]
    return ours, theirs


def test_a_chat_row_is_the_chat_template_s_ids_with_each_reply_learned(tiny_qwen2_instruct_ckpt, tmp_path):
    model, rows = load(tiny_qwen2_instruct_ckpt), conversation()
    swift = {"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                          {"role": "assistant", "content": "A short tone."},
                          {"role": "user", "content": "<audio>And this one? Say <|im_start|> literally."},
                          {"role": "assistant", "content": "\nYes."}], "audios": [str(CLIP0), str(CLIP1)]}
    examples, bad = finetune.read_examples(write_rows(tmp_path / "chat.jsonl", [{"messages": rows[0]}, swift]))
    assert bad == []
    proc = processor(tiny_qwen2_instruct_ckpt)
    text = proc.apply_chat_template(rows[1], tokenize=False)
    expected = proc(text=text, audio=[WAVES[str(CLIP0)].numpy(), WAVES[str(CLIP1)].numpy()], sampling_rate=16_000,
                    return_tensors="pt").input_ids[0].tolist()
    tokenizer = model.tokenizer
    for example in examples:  # our chat form and ms-swift's
        ids, labels = finetune.encode(tokenizer, example, spans(model))
        assert ids == expected
        learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        # "assistant\n" + "\nYes." is one stretch of text, whose "\n\n" token starts in the role's line: not learned,
        # as transformers' offsets place it (prompts.render_qwen2_chat_ids, the one rule chat and training share)
        second = tokenizer.encode("assistant\n\nYes.")[1:]
        assert second[0] == tokenizer.encode("\n\n")[0]
        assert learned == tokenizer.encode("A short tone.") + [tokenizer.im_end_id] + second[1:] + [tokenizer.im_end_id]
        assert all(label in (i, IGNORE_INDEX) for i, label in zip(ids, labels))


def test_a_task_row_is_the_base_model_s_prompt_then_the_response(tiny_qwen2_ckpt, tmp_path):
    model = load(tiny_qwen2_ckpt)
    examples, _ = finetune.read_examples(write_rows(tmp_path / "t.jsonl", [
        {"audio": str(CLIP1), "prompt": ASR, "response": "hello world"}]))
    ids, labels = finetune.encode(model.tokenizer, examples[0], spans(model))
    proc = processor(tiny_qwen2_ckpt)
    prompt = proc(text=f"<|audio_bos|><|AUDIO|><|audio_eos|>{ASR}", audio=[WAVES[str(CLIP1)].numpy()],
                  sampling_rate=16_000, return_tensors="pt").input_ids[0].tolist()
    answer = model.tokenizer.encode("hello world") + [model.tokenizer.eod_id]
    assert (ids, labels) == (prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)

    tagged, _ = finetune.read_examples(write_rows(tmp_path / "v1.jsonl", [
        {"audio": str(CLIP1), "task": "asr", "language": "en", "response": "hello world"}]))
    with pytest.raises(qwenaudio.InputError, match="v1.jsonl:1: a Qwen-Audio task prompt .* give the row a 'prompt'"):
        finetune.encode(model.tokenizer, tagged[0], spans(model))
    with pytest.raises(qwenaudio.InputError, match="eval_task .* Qwen-Audio's benchmarks, and the model is Qwen2-Audio"):
        finetune.train(model, examples, tmp_path / "out", finetune.TrainConfig(steps=1, eval_task="asr"),
                       eval_examples=examples)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_loss_and_its_gradients_equal_transformers(tiny_qwen2_instruct_ckpt, tmp_path):
    """Our `loss` on a right-padded batch (a task row and a conversation, three clips) against transformers'
    forward(labels=…): the same mean over the same label tokens, and the same gradients in both towers."""
    transformers = reference("transformers")
    model = load(tiny_qwen2_instruct_ckpt).train()
    examples, _ = finetune.read_examples(write_rows(tmp_path / "d.jsonl", [
        {"audio": str(CLIP1), "prompt": ASR, "response": "hello world"}, {"messages": conversation()[0]}]))
    ids, labels, mask, clips = batch_inputs(model, examples)
    assert mask[0].sum() < mask.shape[1]  # the task row is padded
    loss = model.loss(ids, labels, mask, clips)
    loss.backward()

    reference_model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(
        tiny_qwen2_instruct_ckpt, dtype=torch.float32).train()
    features = transformers.WhisperFeatureExtractor(feature_size=128)(
        [c.numpy() for c in clips], sampling_rate=16_000, return_attention_mask=True, padding="max_length",
        return_tensors="pt")
    expected = reference_model(input_ids=ids, attention_mask=mask, labels=labels,
                               input_features=features.input_features,
                               feature_attention_mask=features.attention_mask).loss
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    theirs = dict(reference_model.named_parameters())
    for ours_name, their_name in (("decoder.lm_head.weight", "lm_head.weight"),
                                  ("decoder.model.layers.0.self_attn.q_proj.weight",
                                   "model.language_model.layers.0.self_attn.q_proj.weight"),
                                  ("decoder.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
                                  ("encoder.multi_modal_projector.linear.weight",
                                   "model.multi_modal_projector.linear.weight"),
                                  ("encoder.audio_tower.layers.0.fc1.weight", "model.audio_tower.layers.0.fc1.weight")):
        ours_grad, their_grad = model.get_parameter(ours_name).grad, theirs[their_name].grad
        assert their_grad.abs().max() > 0, their_name
        assert (ours_grad - their_grad).abs().max() <= 1e-5 * their_grad.abs().max(), ours_name


def test_lora_and_full_runs_export_what_transformers_and_peft_load(tiny_qwen2_instruct_ckpt, tmp_path):
    peft, transformers = reference("peft"), reference("transformers")
    examples, _ = finetune.read_examples(write_rows(tmp_path / "d.jsonl", [
        {"audio": str(CLIP1), "prompt": ASR, "response": "hello world"}, {"messages": conversation()[0]}]))
    runs = {"lora": finetune.TrainConfig(steps=2, batch_size=2, lr=1e-2, lora=lora.LoraConfig(rank=2)),
            "full": finetune.TrainConfig(steps=2, batch_size=2, lr=1e-3, part="projection")}
    for name, config in runs.items():
        model = load(tiny_qwen2_instruct_ckpt)
        losses = finetune.train(model, examples, tmp_path / name, config)
        assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
        finetune.export(model, config, tiny_qwen2_instruct_ckpt, tmp_path / name / "out", base_model="tiny")
    trained = set(finetune.trainable(load(tiny_qwen2_instruct_ckpt), "projection"))
    assert trained == {"audio_tower.layer_norm.weight", "audio_tower.layer_norm.bias",
                       "multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias"}
    full = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "full" / "out",
                                                                           dtype=torch.float32)
    base = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_instruct_ckpt,
                                                                           dtype=torch.float32)
    changed = [n for n, p in full.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert sorted(changed) == sorted("model." + n for n in trained)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora" / "out"))
    learned = {n.split(".lora_B")[0]: p for n, p in adapted.named_parameters() if "lora_B" in n}
    assert {n.rsplit(".", 1)[-1] for n in learned} == set(lora.QWEN2_DECODER_TARGETS)
    assert all(".language_model.layers." in n and p.abs().max() > 0 for n, p in learned.items())  # trained, loaded


def test_a_resumed_run_gives_the_same_losses(tiny_qwen2_instruct_ckpt, tmp_path):
    examples, _ = finetune.read_examples(write_rows(tmp_path / "d.jsonl", [
        {"audio": str(CLIP1), "prompt": ASR, "response": "hello world"}, {"messages": conversation()[0]},
        {"audio": str(CLIP0), "prompt": "Generate the caption in English:", "response": "a tone"}]))
    config = finetune.TrainConfig(steps=3, batch_size=1, lr=1e-2, warmup_steps=1, save_every=1,  # step 2: both at lr
                                  lora=lora.LoraConfig(rank=2, encoder=True))
    whole = finetune.train(load(tiny_qwen2_instruct_ckpt), examples, tmp_path / "whole", config)
    first = finetune.train(load(tiny_qwen2_instruct_ckpt), examples, tmp_path / "cut",
                           finetune.TrainConfig(**{**config.__dict__, "steps": 2}))
    assert first == whole[:2]
    assert finetune.train(load(tiny_qwen2_instruct_ckpt), examples, tmp_path / "cut", config, resume=True) == whole


def test_the_finetune_and_merge_commands_on_qwen2_audio(tiny_qwen2_instruct_ckpt, tmp_path):
    from .test_cli import qwenaudio_cli

    data = write_rows(tmp_path / "chat.jsonl", [{"messages": conversation()[0]}])
    done = qwenaudio_cli("finetune", "--model", tiny_qwen2_instruct_ckpt, "--data", data, "--output-dir",
                         tmp_path / "out", "--steps", "1", "--lora-rank", "2", "--lora-targets", "q_proj", "v_proj",
                         "--device", "cpu", home=tmp_path)
    assert done.returncode == 0, done.stderr
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / lora.CONFIG_FILE).read_text())
    assert config["target_modules"] == (r"model\.language_model\.layers\.\d+\.self_attn\.q_proj|"
                                        r"model\.language_model\.layers\.\d+\.self_attn\.v_proj")
    merged = qwenaudio_cli("merge", tiny_qwen2_instruct_ckpt, adapter, tmp_path / "merged", "--dtype", "float32",
                           home=tmp_path)
    assert merged.returncode == 0, merged.stderr
    ids = torch.tensor([model_ids(tiny_qwen2_instruct_ckpt)])
    with torch.no_grad():
        adapted = qwenaudio.load(tiny_qwen2_instruct_ckpt, dtype=torch.float32, device="cpu", progress=False,
                                 adapter=adapter).decoder.logits(ids)
        folded = load(tmp_path / "merged").decoder.logits(ids)
    assert (adapted - folded).abs().max() <= 1e-5 * folded.abs().max()


def model_ids(ckpt: Path) -> list[int]:
    return load(ckpt).tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_task_rows_on_qwen2_audio_are_refused_before_the_model_loads(tiny_qwen2_ckpt, tiny_ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    from qwenaudio import cli

    def never(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cli, "load", never)
    row = {"audio": str(CLIP1), "language": "en", "response": "hello world"}
    tagged = write_rows(tmp_path / "tagged.jsonl", [{**row, "task": "asr"}, {**row, "task": "asr"}])
    plain = write_rows(tmp_path / "plain.jsonl", [row])
    for data, extra, which in ((tagged, [], "tagged.jsonl:1: \"task\" (and 1 more lines)"),
                               (plain, ["--task", "asr"], "--task")):
        code = cli.main(["finetune", "--model", str(tiny_qwen2_ckpt), "--data", str(data), "--output-dir",
                         str(tmp_path / "out"), "--steps", "1", "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert code == 2 and f"{which}: task rows build Qwen-Audio's tag prompts" in err, err
        assert "is a Qwen2-Audio model, whose rows need a \"prompt\"" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="the model loaded"):  # Qwen-Audio's task rows pass the plan
        cli.main(["finetune", "--model", str(tiny_ckpt), "--data", str(tagged), "--output-dir",
                  str(tmp_path / "v1"), "--steps", "1", "--device", "cpu"])

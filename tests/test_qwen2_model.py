"""Qwen2-Audio's model against transformers' Qwen2AudioForConditionalGeneration (5.25.0 recorded).

1. tests/golden/qwen2_model_transformers.{safetensors,json} (tests/golden/record_qwen2_model.py): on the tiny
   checkpoints of the fixtures `tiny_qwen2_ckpt` and `tiny_qwen2_instruct_ckpt`, with two real clips, transformers'
   prompt ids (its processor), the projected encoder output, every decoder hidden state and the logits of a
   left-padded batch, greedy ids (single, left-padded batch, Instruct chat with two clips), and the training loss and
   gradients of a right-padded batch with labels. fp32 within 1e-5 relative; ids identical.
2. The same model live, on inputs the golden does not hold (a three-row batch with a text-only row): marked slow,
   since importing transformers and running both models takes seconds.
3. Properties of ours alone: bf16 against fp32, cached decoding against the full forward, and the errors a user gets.

Greedy ids use `full_vocab=True`: transformers chooses among all 156,032 rows of lm_head, and a random tiny model
does pick ids past the tokenizer's (the recorded ones hold 152877).
"""

import copy
import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import qwenaudio
from qwenaudio import AudioError, ConfigError, InputError, TokenizerError
from qwenaudio.core.checkpoint import module_path, official_name
from qwenaudio.core.families import QWEN2_AUDIO, QWEN_AUDIO, family_of, read_config
from qwenaudio.core.model import IGNORE_INDEX, prompt_batch

from .conftest import GOLDEN, reference
from .peers import qwen2_audio_parameter_name

with safe_open(GOLDEN / "qwen2_model_transformers.safetensors", framework="pt") as f:
    GOLD = {name: f.get_tensor(name) for name in f.keys()}
    META = f.metadata()
RECORD = json.loads((GOLDEN / "qwen2_model_transformers.json").read_text(encoding="utf-8"))
with safe_open(GOLDEN / "qwen2_front_end_transformers.safetensors", framework="pt") as f:  # the same two clips
    CLIPS = {name: f.get_tensor(f"{name}.waveform").float() / 32768 for name in ("speech", "glass")}
ASR, CAPTION = RECORD["prompts"]["asr"], RECORD["prompts"]["caption"]
FP32 = 1e-5


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def load(path, dtype=torch.float32):
    return qwenaudio.load(path, device="cpu", dtype=dtype, progress=False)


@pytest.fixture(scope="module")
def base(tiny_qwen2_ckpt):
    return load(tiny_qwen2_ckpt)


@pytest.fixture(scope="module")
def instruct(tiny_qwen2_instruct_ckpt):
    return load(tiny_qwen2_instruct_ckpt)


def clips_of(names: list[list[str]], clips: dict[str, torch.Tensor] = CLIPS) -> list[list[torch.Tensor]]:
    return [[clips[n] for n in row] for row in names]


def forward_batch() -> tuple[torch.Tensor, torch.Tensor]:
    f = RECORD["forward"]
    return torch.tensor(f["input_ids"]), torch.tensor(f["attention_mask"])


@pytest.fixture(scope="module")
def forward(base):
    """Our full forward of the golden's left-padded batch: (output with hidden states, the last block's output)."""
    ids, mask = forward_batch()
    seen = []
    hook = base.decoder.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = base(ids, mask, [CLIPS["speech"], CLIPS["glass"]], output_hidden_states=True)
    hook.remove()
    return out, seen[0]


# --- the recording -------------------------------------------------------------------------------------------------

def test_golden_was_recorded_with_transformers_on_these_clips():
    assert META["transformers"] == "5.25.0"
    assert json.loads(META["checkpoints"]) == {"base": {"seed": 0}, "instruct": {"seed": 1, "instruct": True}}
    shas = {n: hashlib.sha256(torch.round(c * 32768).to(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()
            for n, c in CLIPS.items()}
    assert shas == json.loads(META["clips_sha256"])


def test_clips_are_the_shared_recordings_as_load_audio_reads_them(shared_audio):
    for name, file in {"speech": "1272-128104-0000.flac", "glass": "glass-breaking-151256.mp3"}.items():
        assert torch.equal(qwenaudio.load_audio(shared_audio / file), CLIPS[name])


@pytest.mark.parametrize("case", ["single", "batch", "chat"])
def test_prompt_ids_equal_the_processor_s(base, instruct, case):
    c = RECORD["generate"][case]
    model = instruct if case == "chat" else base
    batch = prompt_batch(model.tokenizer, c["texts"], clips_of(c["clips"]), model.encoder.span_length)
    assert batch.input_ids.tolist() == c["input_ids"] and batch.attention_mask.tolist() == c["attention_mask"]


def test_forward_and_training_ids_equal_the_processor_s(base):
    clips = clips_of([["speech"], ["glass"]])
    left = prompt_batch(base.tokenizer, [ASR, CAPTION], clips, base.encoder.span_length)
    assert left.input_ids.tolist() == RECORD["forward"]["input_ids"]
    t = RECORD["training"]
    spans = [[base.encoder.span_length(len(c)) for c in row] for row in clips]
    right = base.tokenizer.encode_batch(t["texts"], audio_spans=spans, padding_side="right")
    assert right.input_ids.tolist() == t["input_ids"] and right.attention_mask.tolist() == t["attention_mask"]


def test_chat_prompt_is_the_processor_s_chat_template():
    """transformers' template (recorded) renders ChatML with the default system turn and numbered clips."""
    assert RECORD["generate"]["chat"]["texts"] == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Which clip is speech?<|im_end|>\n<|im_start|>assistant\n"]


# --- the golden: encoder, decoder, logits ---------------------------------------------------------------------------

@pytest.mark.parametrize("names", [["speech"], ["glass"], ["speech", "glass"]])
def test_encoder_equals_golden(base, names):
    spans = base.encode_audio([CLIPS[n] for n in names])
    expected = [GOLD[f"encoder.{n}"] for n in names] if len(names) == 1 else [GOLD["encoder.batch0"],
                                                                               GOLD["encoder.batch1"]]
    for ours, theirs in zip(spans, expected, strict=True):
        assert ours.shape == theirs.shape and relative_error(ours, theirs) < FP32


def test_every_hidden_state_equals_golden(forward):
    out, last_block = forward
    real = forward_batch()[1].bool()  # padded slots are never read; compare the real ones
    assert len(out.hidden_states) == 3  # the embeddings, block 0's output, the final norm of block 1's
    for k, hidden in enumerate(out.hidden_states):
        assert relative_error(hidden[real], GOLD[f"forward.hidden_states.{k}"][real]) < FP32, k
    assert relative_error(last_block[real], GOLD["forward.last_layer"][real]) < FP32


def test_logits_equal_golden(forward):
    logits = forward[0].logits
    real = forward_batch()[1].bool()
    assert relative_error(logits[:, -1], GOLD["forward.logits_last"]) < FP32
    assert relative_error(logits[..., GOLD["cols"]][real], GOLD["forward.logits_cols"][real]) < FP32
    assert relative_error(logits[real].logsumexp(-1), GOLD["forward.logits_lse"][real]) < FP32
    assert torch.equal(logits.argmax(-1)[real], GOLD["forward.logits_argmax"][real])


# --- the golden: greedy ids -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["single", "batch", "chat"])
def test_greedy_ids_equal_golden(base, instruct, case):
    c = RECORD["generate"][case]
    model = instruct if case == "chat" else base
    assert list(model.generation_config.stop_token_ids) == c["eos"]
    ids = model.generate(c["texts"], clips_of(c["clips"]), max_new_tokens=int(META["max_new_tokens"]),
                         do_sample=False, full_vocab=True)
    assert ids == c["new_ids"]


# --- the golden: training -------------------------------------------------------------------------------------------

def copy_of(model):
    """A copy to train, sharing the (read-only) tokenizer: loading again would rebuild the tokenizer."""
    return copy.deepcopy(model, {id(model.tokenizer): model.tokenizer})


@pytest.fixture(scope="module")
def trained(base):
    """A copy of the model after one backward pass of the recorded batch (train mode), and its loss."""
    model = copy_of(base).train()
    t = RECORD["training"]
    loss = model.loss(torch.tensor(t["input_ids"]), torch.tensor(t["labels"]), torch.tensor(t["attention_mask"]),
                      [CLIPS["speech"], CLIPS["glass"]])
    loss.backward()
    return model, loss


def parameter(model, name: str) -> torch.nn.Parameter:
    owner, path = module_path(name, QWEN2_AUDIO)
    return getattr(model, owner).get_parameter(path)


def test_training_labels_are_the_answers_only():
    t = RECORD["training"]
    for ids, labels, mask in zip(t["input_ids"], t["labels"], t["attention_mask"]):
        learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert learned == list(range(learned[0], sum(mask))) and ids[learned[-1]] == 151643  # the answer, its eos
        assert all(labels[i] == ids[i] for i in learned) and 151646 not in [ids[i] for i in learned]


def test_loss_equals_golden(trained):
    _, loss = trained
    assert abs(loss.item() - RECORD["training"]["loss"]) <= FP32 * RECORD["training"]["loss"]


@pytest.mark.parametrize("name", RECORD["training"]["gradients"])
def test_gradients_equal_golden(trained, name):
    model, _ = trained
    grad = parameter(model, name).grad
    if name in RECORD["training"]["row_gradients"]:
        grad = grad[GOLD["rows"]]
    assert relative_error(grad, GOLD[f"grad.{name}"]) < FP32


# --- transformers live ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def theirs(tiny_qwen2_ckpt):
    """transformers' model (fp32, eval) and processor on the same checkpoint, as the recording builds them."""
    transformers = reference("transformers")
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_ckpt, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_ckpt)
    processor = transformers.Qwen2AudioProcessor(transformers.WhisperFeatureExtractor(feature_size=128), tokenizer)
    return model.eval(), processor


# Inputs the golden does not hold: a row without audio between two with, so each clip's run is found by row-major
# order across rows of different padding; the clips' first 1.5 s and 1 s, so the prompts are short.
LIVE_TEXTS = [CAPTION, "The quick brown fox jumps over the lazy dog.", ASR + " Transcript:"]
LIVE_ROWS = clips_of([["glass"], [], ["speech"]],
                     {"speech": CLIPS["speech"][:24_000], "glass": CLIPS["glass"][:16_000]})
LIVE_CLIPS = [clip for row in LIVE_ROWS for clip in row]  # in the order of their <|AUDIO|> runs


def processed(processor, padding_side="left"):
    """transformers' inputs for the live batch."""
    return processor(text=LIVE_TEXTS, audio=[c.numpy() for c in LIVE_CLIPS], sampling_rate=16000, padding=True,
                     padding_side=padding_side, return_tensors="pt")


@pytest.mark.slow
def test_every_hidden_state_and_last_logits_equal_transformers_live(base, theirs):
    model, processor = theirs
    batch = processed(processor)
    positions = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))  # as its generate does
    with torch.no_grad():
        ref = model(**batch, position_ids=positions, output_hidden_states=True, logits_to_keep=1)
        hidden = []
        ours = base.decoder.logits(batch["input_ids"], batch["attention_mask"], base.encode_audio(LIVE_CLIPS),
                                   last_only=True, hidden_states=hidden)
    ids = prompt_batch(base.tokenizer, LIVE_TEXTS, LIVE_ROWS, base.encoder.span_length)
    assert torch.equal(ids.input_ids, batch["input_ids"])
    real = batch["attention_mask"].bool()
    for k, (a, b) in enumerate(zip(hidden[:-1], ref.hidden_states[:-1], strict=True)):
        assert relative_error(a[real], b[real]) < FP32, k
    assert relative_error(hidden[-1][:, -1], ref.hidden_states[-1][:, -1]) < FP32  # last_only: the norm's last slot
    assert relative_error(ours[:, -1], ref.logits[:, -1]) < FP32


@pytest.mark.slow
def test_greedy_ids_equal_transformers_live(base, theirs):
    model, processor = theirs
    batch = processed(processor)
    with torch.no_grad():
        ref = model.generate(**batch, do_sample=False, max_new_tokens=8, top_p=None, top_k=None)
    ours = base.generate(LIVE_TEXTS, LIVE_ROWS, max_new_tokens=8, do_sample=False, full_vocab=True)
    assert ours == ref[:, batch["input_ids"].shape[1]:].tolist()  # the random model reaches no stop in 8 steps


@pytest.mark.slow
def test_training_loss_and_every_gradient_equal_transformers_live(base, theirs):
    """A right-padded batch with a text-only row, labels on every real text token (not on the audio runs nor the
    special tokens): the loss and the gradient of every parameter."""
    model, processor = theirs
    batch = processed(processor, padding_side="right")
    labels = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | (batch["input_ids"] >= 151643),
                                            IGNORE_INDEX)
    model.train()
    try:
        ref = model(**batch, labels=labels).loss
        ref.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        model.eval().zero_grad()
    ours = copy_of(base).train()
    loss = ours.loss(batch["input_ids"], labels, batch["attention_mask"], LIVE_CLIPS)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= FP32 * ref.item()
    for owner in ("encoder", "decoder"):
        for path, p in getattr(ours, owner).named_parameters():
            name = official_name(owner, path, QWEN2_AUDIO)
            assert relative_error(p.grad, grads[qwen2_audio_parameter_name(name)]) < FP32, name


# --- ours alone -----------------------------------------------------------------------------------------------------

# bf16 keeps 8 bits of mantissa (a step of 2^-8 = 3.9e-3 relative); through the audio tower and two decoder layers the
# tiny model lands 0.6-1.1e-2 (relative to each tensor's largest value) from fp32: measured 1.1e-2 at most, on the
# final hidden state. 3e-2 bounds that with room, and is still far below what a wrong weight or a missed mask gives.
BF16 = 3e-2


@pytest.mark.slow
def test_bf16_load_runs_and_agrees_with_fp32(tiny_qwen2_ckpt):
    model = load(tiny_qwen2_ckpt, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask = forward_batch()
    real = mask.bool()
    with torch.no_grad():
        out = model(ids, mask, [CLIPS["speech"], CLIPS["glass"]], output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16
    for k, hidden in enumerate(out.hidden_states):
        assert relative_error(hidden[real], GOLD[f"forward.hidden_states.{k}"][real]) < BF16, k
    assert relative_error(out.logits[:, -1], GOLD["forward.logits_last"]) < BF16
    assert relative_error(out.logits[..., GOLD["cols"]][real], GOLD["forward.logits_cols"][real]) < BF16


@pytest.mark.parametrize("case", ["single", pytest.param("batch", marks=pytest.mark.slow)])
def test_cached_greedy_steps_equal_the_full_forward_argmax(base, case):
    """Each id `generate` picks with the KV cache is the argmax of the full, uncached forward over the prompt and the
    ids before it: the cache, its positions and the left padding change nothing."""
    c = RECORD["generate"][case]
    new = base.generate(c["texts"], clips_of(c["clips"]), max_new_tokens=8, do_sample=False, full_vocab=True)
    assert all(len(row) == 8 for row in new)  # no stop reached: every step is compared
    prompt, mask = torch.tensor(c["input_ids"]), torch.tensor(c["attention_mask"])
    ids = torch.cat([prompt, torch.tensor(new)], dim=1)
    mask = torch.cat([mask, torch.ones_like(ids[:, prompt.shape[1]:])], dim=1)
    with torch.no_grad():
        logits = base.decoder.logits(ids, mask, base.encode_audio([CLIPS[n] for row in c["clips"] for n in row]))
    assert logits[:, prompt.shape[1] - 1 : -1].argmax(-1).tolist() == new


def test_80_bin_mel_into_the_128_bin_encoder_is_an_input_error(base):
    with pytest.raises(InputError, match=r"\[clips, 128, frames\].*128 mel bins.*\(1, 80, 3000\)"):
        base.encoder.encode(torch.zeros(1, 80, 3000), [16000])


def test_unknown_model_type_is_a_config_error_naming_it_and_the_known_two(tiny_qwen2_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_qwen2_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_omni"}))
    message = r"model_type 'qwen2_5_omni' is not a family.*'qwen' \(Qwen-Audio\) or 'qwen2_audio' \(Qwen2-Audio\)"
    with pytest.raises(ConfigError, match=message):
        read_config(ckpt)
    with pytest.raises(ConfigError, match=message):
        load(ckpt)


def test_transformers_layout_without_model_type_is_a_config_error_saying_so(tiny_qwen2_ckpt, tiny_ckpt, tmp_path):
    ckpt = shutil.copytree(tiny_qwen2_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["model_type"]
    (ckpt / "config.json").write_text(json.dumps(config))
    message = r"config.json: model_type is missing.*'qwen' \(Qwen-Audio\) or 'qwen2_audio' \(Qwen2-Audio\)"
    with pytest.raises(ConfigError, match=message):
        read_config(ckpt)
    v1 = shutil.copytree(tiny_ckpt, tmp_path / "v1")  # Qwen-Audio's files may lack it: read as Qwen-Audio's
    config = json.loads((v1 / "config.json").read_text())
    config.pop("model_type", None)
    (v1 / "config.json").write_text(json.dumps(config))
    assert family_of(read_config(v1)) is QWEN_AUDIO


def test_more_audio_placeholders_than_clips_is_a_tokenizer_error(base):
    with pytest.raises(TokenizerError, match=r"2 <\|AUDIO\|> token\(s\) but 1 audio_spans"):
        base.generate([ASR + CAPTION], [[CLIPS["speech"]]], max_new_tokens=1)


def test_audio_run_that_does_not_match_its_clip_is_an_input_error(base):
    """The processor's ids for (speech, glass) given the clips the other way round: each run's length is the other
    clip's. transformers refuses the same ("Audio features and audio tokens do not match")."""
    ids, mask = forward_batch()
    spans = [GOLD["encoder.glass"], GOLD["encoder.speech"]]
    speech, glass = len(GOLD["encoder.speech"]), len(GOLD["encoder.glass"])
    with pytest.raises(InputError, match=rf"<\|AUDIO\|> run 0 \(row 0, columns 1\.\.{speech}\) holds {speech} tokens "
                                         rf"but clip 0's encoding has shape \({glass}, 64\)"):
        base.decoder.logits(ids, mask, spans)


def test_clip_too_short_for_one_audio_position_is_an_audio_error(base):
    with pytest.raises(AudioError, match=r"clip 0: 320 samples .* is too short"):
        base.generate([ASR], [[CLIPS["speech"][:320]]], max_new_tokens=1)


def test_clip_of_400_samples_gets_its_one_audio_position(base):
    """transformers' processor gives a clip of 321 to 479 samples one `<|AUDIO|>` (tests/test_audio_qwen2.py
    compares the count at 321 samples with it), so the model must take such a clip."""
    assert base.encoder.span_length(400) == 1
    assert len(base.generate([ASR], [[CLIPS["speech"][:400]]], max_new_tokens=1, full_vocab=True)[0]) == 1

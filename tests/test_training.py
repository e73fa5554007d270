"""The training objective against the official model in training mode (tests/golden/record_training.py): the loss of
a right-padded batch holding a task-form row and a two-clip chat row, and the gradients of the embedding, a c_attn,
a w2, lm_head, an encoder block and the audio projection."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwenaudio
from qwenaudio.core.checkpoint import module_path
from qwenaudio.core.model import IGNORE_INDEX, next_token_loss

GOLDEN = Path(__file__).parent / "golden"
RECORD = json.loads((GOLDEN / "training_official.json").read_text())
GRADIENTS = load_file(GOLDEN / "training_official.safetensors")
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIPS = {"clip0": REPO_ROOT / "tests" / "golden" / "clip0.wav", "clip1": REPO_ROOT / "tests" / "golden" / "clip1.wav"}


def relative(ours: torch.Tensor, official: torch.Tensor) -> float:
    return float((ours - official).abs().max() / official.abs().max())


def parameter(model, name: str) -> torch.nn.Parameter:
    owner, path = module_path(name)
    return getattr(model, owner).get_parameter(path)


@pytest.fixture(scope="module")
def trained(tiny_ckpt):
    """The tiny model in training mode after one backward pass of the recorded batch, and its loss."""
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False).train()
    audio = [CLIPS["clip1"], CLIPS["clip0"], CLIPS["clip1"]]  # the <audio> regions in row-major order
    loss = model.loss(torch.tensor(RECORD["input_ids"]), torch.tensor(RECORD["labels"]),
                      torch.tensor(RECORD["attention_mask"]), audio)
    loss.backward()
    return model, loss


def test_the_recorded_ids_are_our_tokenizer_s(tokenizer):
    from qwenaudio.core.audio import audio_span, load_audio

    spans = {name: audio_span(len(load_audio(path))) for name, path in CLIPS.items()}
    for pieces, ids, spans_row in zip(RECORD["pieces"], RECORD["input_ids"], RECORD["audio_span_tokens"]):
        ours = []
        for text, _ in pieces:
            ours += tokenizer.encode(text, audio_spans=[spans[name] for name in CLIPS if f"/{name}.wav<" in text])
        assert ids[: len(ours)] == ours and set(ids[len(ours):]) <= {151643}
        assert [spans[n] for n in ("clip0", "clip1") if f"/{n}.wav<" in "".join(t for t, _ in pieces)] == \
            sorted(spans_row)


def test_loss_equals_the_official_training_forward(trained):
    _, loss = trained
    assert abs(loss.item() - RECORD["loss"]) <= 1e-6 * RECORD["loss"]


@pytest.mark.parametrize("name", RECORD["gradients"])
def test_gradients_equal_the_official(trained, name):
    model, _ = trained
    assert relative(parameter(model, name).grad, GRADIENTS[name]) <= 1e-4


@pytest.mark.parametrize("name", ["transformer.wte.weight", "lm_head.weight"])
def test_embedding_and_lm_head_gradients_equal_the_official(trained, name):
    model, _ = trained
    rows = torch.tensor(RECORD["rows"])
    assert relative(parameter(model, name).grad[rows], GRADIENTS[f"{name}.rows"]) <= 1e-4


def test_audio_tags_get_no_gradient_and_every_encoder_weight_does(trained):
    """The spans overwrite the embeddings of <audio>, the pads and </audio>, so those rows learn nothing, as in the
    official model; the encoder is not frozen."""
    model, _ = trained
    tags = [155163, 155164, 151851]
    assert model.decoder.wte.weight.grad[tags].abs().max() == 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.encoder.parameters())


def test_the_loss_is_one_mean_over_label_tokens():
    """Two rows with 1 and 3 labels: the loss weighs each token once (mean of 4), not each row."""
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX]])
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b, t in ((0, 1), (1, 1), (1, 2), (1, 3))]
    assert torch.allclose(next_token_loss(logits, labels), torch.stack(terms).mean(), rtol=1e-12, atol=0)


def test_activation_checkpointing_gives_the_official_gradients_too(tiny_ckpt, trained):
    """Recomputing block activations in the backward pass changes memory, not the loss or gradients."""
    reference, loss = trained
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False).train()
    model.decoder.activation_checkpointing = model.encoder.activation_checkpointing = True
    again = model.loss(torch.tensor(RECORD["input_ids"]), torch.tensor(RECORD["labels"]),
                       torch.tensor(RECORD["attention_mask"]), [CLIPS["clip1"], CLIPS["clip0"], CLIPS["clip1"]])
    again.backward()
    assert again.item() == pytest.approx(loss.item(), rel=1e-7)
    for name in RECORD["gradients"]:
        assert relative(parameter(model, name).grad, parameter(reference, name).grad) <= 1e-6, name


def test_the_loss_skips_positions_without_a_label_and_stays_the_same(trained):
    """QwenAudio.loss runs lm_head only where a label is predicted; next_token_loss over all logits agrees."""
    model, loss = trained
    audio = model.encode_audio([CLIPS["clip1"], CLIPS["clip0"], CLIPS["clip1"]])
    with torch.no_grad():
        logits = model.decoder.logits(torch.tensor(RECORD["input_ids"]), torch.tensor(RECORD["attention_mask"]), audio)
    assert next_token_loss(logits, torch.tensor(RECORD["labels"])).item() == pytest.approx(loss.item(), rel=1e-6)

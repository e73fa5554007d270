"""Record transformers' Qwen2-Audio model (encoder, every decoder layer, logits, greedy ids, training loss and
gradients) on tiny random checkpoints as a golden file.

What it records: transformers' ``Qwen2AudioForConditionalGeneration`` (recorded with transformers 5.25.0), loaded
with ``from_pretrained`` in fp32 on CPU from the two tiny checkpoints the tests' fixtures build with
``qwenaudio.testing.make_tiny_qwen2_checkpoint`` and the real qwen.tiktoken (the ``dashscope`` wheel's):

    base      make_tiny_qwen2_checkpoint(seed=0)                  (fixture tiny_qwen2_ckpt)
    instruct  make_tiny_qwen2_checkpoint(seed=1, instruct=True)   (fixture tiny_qwen2_instruct_ckpt)

Every input is transformers' own: ``Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128),
AutoTokenizer.from_pretrained(checkpoint))`` builds the ids (each ``<|AUDIO|>`` expanded to the clip's count), the
128-bin log-mel and its frame mask, from two recordings loaded with ``qwenaudio.load_audio`` (16 kHz, on the 16-bit
grid; the same waveforms as ``qwen2_front_end_transformers.safetensors``' ``speech`` and ``glass``, whose sha256 the
metadata names):

    speech  ../shared/audio/1272-128104-0000.flac       glass  ../shared/audio/glass-breaking-151256.mp3

Cases, all on ``base`` except ``chat``:

- ``encoder``: the projector's output (``multi_modal_projector``, hooked in the model's own forward), cut to each
  clip's ``<|AUDIO|>`` count, for each clip alone and for the two as one batch;
- ``forward``: a left-padded batch of two rows, ``ASR`` + speech and ``CAPTION`` + glass, in eval mode with
  ``output_hidden_states=True`` and the position ids transformers' generate passes for it
  (``_prepare_position_ids_for_generation``: each row counts its real tokens from 0). Kept: every hidden state
  (the embeddings with the audio written in, each layer's output, the last one after the final norm, as
  transformers returns them) plus the last layer's output before the norm (hooked), and the logits: all 156,032 at
  each row's last position, and at every position the columns ``COLS``, the float64 logsumexp and the argmax;
- ``generate``: greedy ids (``generate(do_sample=False, max_new_tokens=16)``) of ``single`` (ASR + speech),
  ``batch`` (the forward's two rows, left-padded) and ``chat`` (instruct: the processor's chat template over a user
  turn with both clips and a question, left-padded as one row);
- ``training``: in train mode (the tiny configs' dropouts are 0), ``forward(labels=...)`` of a right-padded batch
  of two rows (ASR + speech + a transcript + <|endoftext|>, CAPTION + glass + a caption + <|endoftext|>), labels
  -100 on the prompt and the padding, then ``loss.backward()``: the loss and the gradients of ``GRADIENTS`` (by
  checkpoint name; for the embedding and lm_head, the rows ``ROWS`` only).

Files: ``qwen2_model_transformers.safetensors`` (tensors below; metadata: versions, checkpoints, clip hashes, COLS
rule) and ``qwen2_model_transformers.json`` (prompts, ids, labels, greedy ids, loss).

    encoder.{speech,glass}            [n, hidden]     one clip alone
    encoder.batch{0,1}                [n, hidden]     speech, glass encoded as one batch
    forward.hidden_states.{0,1,2}     [2, S, hidden]  output_hidden_states
    forward.last_layer                [2, S, hidden]  the last decoder layer's output (before model.norm)
    forward.logits_last               [2, vocab]      logits at position S - 1
    forward.logits_cols               [2, S, NC]      logits[..., COLS]
    forward.logits_lse                float64 [2, S]  logsumexp over the vocabulary
    forward.logits_argmax             int64 [2, S]
    cols, rows                        int64           COLS, ROWS
    grad.{name}                       the gradient of checkpoint tensor `name` (rows ROWS for embed/lm_head)

How to run (any venv with transformers, torch, safetensors, soundfile, dashscope and jinja2), from the repository
root, with the shared recordings at ../shared/audio:

    PYTHONPATH=src python tests/golden/record_qwen2_model.py

It is deterministic (fp32 on CPU, fixed seeds, no sampling) and rewrites the two files next to this script; the
tests only read them.
"""

import hashlib
import json
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helper: deterministic save)
import record_tokenizer  # noqa: E402  (shared helper: json with flat lists on one line)

OUT_TENSORS = os.path.join(HERE, "qwen2_model_transformers.safetensors")
OUT_JSON = os.path.join(HERE, "qwen2_model_transformers.json")
SHARED_AUDIO = os.path.join(HERE, "..", "..", "..", "shared", "audio")
RECORDINGS = {"speech": "1272-128104-0000.flac", "glass": "glass-breaking-151256.mp3"}
CHECKPOINTS = {"base": {"seed": 0}, "instruct": {"seed": 1, "instruct": True}}
VOCAB_SIZE = 156_032
MAX_NEW_TOKENS = 16
EOD, IGNORE = 151643, -100

AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"
ASR = AUDIO + "Detect the language and recognize the speech:"
CAPTION = AUDIO + "Generate the caption in English:"
ANSWERS = [" mister quilter is the apostle of the middle classes<|endoftext|>", " Glass is breaking.<|endoftext|>"]
CONVERSATION = [{"role": "user", "content": [{"type": "audio", "audio_url": "speech"},
                                             {"type": "audio", "audio_url": "glass"},
                                             {"type": "text", "text": "Which clip is speech?"}]}]

# 384 random vocab ids (PCG64(2407)), the first 128 ids and the special tokens, sorted.
_rng = np.random.Generator(np.random.PCG64(2407))
COLS = sorted(set(_rng.choice(VOCAB_SIZE, 384, replace=False).tolist()) | set(range(128)) |
              set(range(151643, 151649)))
COLS_RULE = ("sorted(set(Generator(PCG64(2407)).choice(156032, 384, replace=False)) | set(range(128)) | "
             "set(range(151643, 151649)))")
EXTRA_ROWS = [0, 1, 100, 1000, 50000, 151642, 151644, 151645, 151646, 151647, 151648, 156031]
GRADIENTS = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
             "language_model.model.layers.0.self_attn.q_proj.weight",
             "language_model.model.layers.0.self_attn.q_proj.bias",
             "language_model.model.layers.1.mlp.gate_proj.weight", "multi_modal_projector.linear.weight",
             "multi_modal_projector.linear.bias", "audio_tower.conv1.weight",
             "audio_tower.layers.0.self_attn.k_proj.weight"]
ROW_GRADIENTS = GRADIENTS[:2]


def transformers_name(name: str) -> str:
    """transformers' parameter name for a checkpoint tensor name (its conversion mapping's renames)."""
    for stored, theirs in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                           ("audio_tower.", "model.audio_tower."),
                           ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(stored):
            return theirs + name.removeprefix(stored)
    raise KeyError(name)


def load(checkpoint: Path):
    """transformers' model (fp32, eval) and processor for a checkpoint, after checking that every checkpoint tensor
    reached the model (a missing one would be silently initialised at random)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, \
        WhisperFeatureExtractor

    model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    theirs = dict(model.named_parameters())
    stored = {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert len(stored) == len(theirs), (len(stored), len(theirs))
    for name, tensor in stored.items():
        assert torch.equal(theirs[transformers_name(name)], tensor.float()), name
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return model, Qwen2AudioProcessor(WhisperFeatureExtractor(feature_size=128), tokenizer)


def inputs(processor, texts, clips, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    return processor(text=texts, audio=[c.numpy() for c in clips], sampling_rate=16000, padding=True,
                     return_tensors="pt")


def encoded(model, batch) -> list[torch.Tensor]:
    """The projector's output for the batch's clips, hooked in the model's forward, cut to each clip's tokens."""
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    counts = (batch["input_ids"] == model.config.audio_token_id).sum(-1).tolist()
    return [seen[0][i, :n] for i, n in enumerate(counts)]


def position_ids(model, batch) -> torch.Tensor:
    return model._prepare_position_ids_for_generation(batch["input_ids"], {"attention_mask": batch["attention_mask"]})


def record_forward(model, batch, out):
    last = []
    hook = model.model.language_model.layers[-1].register_forward_hook(lambda m, a, o: last.append(o))
    with torch.no_grad():
        result = model(**batch, position_ids=position_ids(model, batch), output_hidden_states=True)
    hook.remove()
    for k, h in enumerate(result.hidden_states):
        out[f"forward.hidden_states.{k}"] = h
    out["forward.last_layer"] = last[0]
    logits = result.logits
    assert logits.shape[-1] == VOCAB_SIZE
    out["forward.logits_last"] = logits[:, -1].contiguous()
    out["forward.logits_cols"] = logits[..., COLS].contiguous()
    out["forward.logits_lse"] = logits.double().logsumexp(-1)
    out["forward.logits_argmax"] = logits.argmax(-1)


def greedy(model, processor, texts: list[str], clips: dict[str, torch.Tensor], names: list[list[str]],
           eos: list[int]) -> dict:
    """A left-padded batch of `texts` (row i's clips: `names[i]`) and the new ids of each row, up to (not including)
    its first stop, as transformers' greedy generate gives them."""
    batch = inputs(processor, texts, [clips[n] for row in names for n in row])
    with torch.no_grad():
        ids = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, top_p=None, top_k=None)
    rows = ids[:, batch["input_ids"].shape[1]:].tolist()
    return {"texts": texts, "clips": names, "eos": eos, "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "new_ids": [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]}


def record_training(model, processor, clips, out) -> dict:
    """Loss and gradients of a right-padded batch with labels on the answers only."""
    texts = [ASR + ANSWERS[0], CAPTION + ANSWERS[1]]
    batch = inputs(processor, texts, clips, padding_side="right")
    prompts = [inputs(processor, [p], [c])["input_ids"][0] for p, c in zip((ASR, CAPTION), clips)]
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch["input_ids"][row, : len(prompt)], prompt), "the answer changed the prompt's ids"
        labels[row, : len(prompt)] = IGNORE
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    model.eval()
    rows = sorted(set(batch["input_ids"].flatten().tolist()) | set(EXTRA_ROWS))
    params = dict(model.named_parameters())
    out["rows"] = torch.tensor(rows)
    for name in GRADIENTS:
        grad = params[transformers_name(name)].grad
        out[f"grad.{name}"] = (grad[rows] if name in ROW_GRADIENTS else grad).contiguous()
    return {"texts": texts, "input_ids": batch["input_ids"].tolist(), "attention_mask":
            batch["attention_mask"].tolist(), "labels": labels.tolist(), "loss": loss.item(),
            "gradients": GRADIENTS, "row_gradients": ROW_GRADIENTS}


def sha256(wave: torch.Tensor) -> str:
    """Of the clip's int16 samples (little-endian): the identity the tests check their input against."""
    pcm = torch.round(wave * 32768)
    assert torch.equal(pcm / 32768, wave), "not on the 16-bit grid"
    return hashlib.sha256(pcm.to(torch.int16).numpy().astype("<i2").tobytes()).hexdigest()


def main() -> None:
    import dashscope

    from qwenaudio import load_audio
    from qwenaudio.testing import make_tiny_qwen2_checkpoint

    torch.manual_seed(0)
    vocab = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    clips = {name: load_audio(os.path.join(SHARED_AUDIO, file)) for name, file in RECORDINGS.items()}
    speech, glass = clips["speech"], clips["glass"]
    out, record = {"cols": torch.tensor(COLS)}, {"prompts": {"asr": ASR, "caption": CAPTION}}
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = {name: make_tiny_qwen2_checkpoint(Path(scratch) / name, vocab_file=vocab, **settings)
                for name, settings in CHECKPOINTS.items()}
        model, processor = load(ckpt["base"])
        out["encoder.speech"], = encoded(model, inputs(processor, [ASR], [speech]))
        out["encoder.glass"], = encoded(model, inputs(processor, [CAPTION], [glass]))
        pair = inputs(processor, [ASR, CAPTION], [speech, glass])
        out["encoder.batch0"], out["encoder.batch1"] = encoded(model, pair)
        record_forward(model, pair, out)
        record["forward"] = {"input_ids": pair["input_ids"].tolist(), "attention_mask":
                             pair["attention_mask"].tolist(), "position_ids": position_ids(model, pair).tolist()}
        record["generate"] = {"single": greedy(model, processor, [ASR], clips, [["speech"]], [EOD]),
                              "batch": greedy(model, processor, [ASR, CAPTION], clips, [["speech"], ["glass"]], [EOD])}
        record["training"] = record_training(model, processor, [speech, glass], out)

        model, processor = load(ckpt["instruct"])
        chat = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
        eos = list(model.generation_config.eos_token_id)
        record["generate"]["chat"] = greedy(model, processor, [chat], clips, [["speech", "glass"]], eos)
    out = {k: v.detach().contiguous() for k, v in out.items()}
    metadata = {
        "transformers": version("transformers"), "torch": torch.__version__, "numpy": np.__version__,
        "model": "Qwen2AudioForConditionalGeneration.from_pretrained(dtype=float32), CPU",
        "checkpoints": json.dumps(CHECKPOINTS), "clips_sha256": json.dumps({k: sha256(v) for k, v in clips.items()}),
        "cols_rule": COLS_RULE, "max_new_tokens": str(MAX_NEW_TOKENS),
    }
    record["metadata"] = metadata
    record_encoder.save_deterministic(out, OUT_TENSORS, metadata)
    with open(OUT_JSON, "w", encoding="utf-8") as f:
        f.write(record_tokenizer.dumps(record) + "\n")
    print(f"wrote {len(out)} tensors, {os.path.getsize(OUT_TENSORS)} bytes to {OUT_TENSORS}; {OUT_JSON}")
    for case, c in record["generate"].items():
        print(case, c["new_ids"])
    print("loss", record["training"]["loss"])


if __name__ == "__main__":
    main()

"""Record the official Qwen-Audio training loss and gradients (training mode, fp32) on a tiny checkpoint.

What it records, with the official code of QwenLM/Qwen-Audio at commit e81cc26 (modeling_qwen.py
``QWenLMHeadModel.forward`` with ``labels``: the shifted ``CrossEntropyLoss`` over all label tokens; the audio
encoder run inside the same forward, so it gets gradients too) loaded through transformers' remote code in fp32 on
CPU from ``qwenaudio.testing.make_tiny_checkpoint(seed=0)`` with the real qwen.tiktoken, in ``model.train()``
(dynamic NTK and logn off; the tiny config's dropout probabilities are 0, as in the released configs):

- one right-padded batch of two rows, padded with <|endoftext|> (151643), labels -100 and attention mask 0 there:
  row 0, task form: ``<audio>tests/golden/clip1.wav</audio>`` + the ASR tags, then the response and <|endoftext|>,
  labels on the response and <|endoftext|> only;
  row 1, chat form with two clips: the ChatML context Qwen-Audio-Chat is trained on (system, a user turn with
  ``Audio 1:<audio>clip0</audio>\\nAudio 2:<audio>clip1</audio>\\n`` and a question, the assistant's answer),
  labels on the answer's tokens and its <|im_end|> only;
  each row's text pieces tokenized apart by the official tokenizer (special tokens allowed) and concatenated, as
  make_context builds ChatML; ``audio_info`` per row from the official ``process_audio`` (its ffmpeg loader);
- ``loss`` (the official forward's), and the loss of each row alone (``loss_alone``: row 1 alone crops the encoder's
  mel to its own longest clip, the same as in the batch, row 0 likewise);
- gradients after ``loss.backward()`` of: the token embedding (the rows of the ids in the batch, and of
  ``EXTRA_ROWS``), ``transformer.h.0.attn.c_attn`` (weight, bias), ``transformer.h.1.mlp.w2.weight``, ``lm_head``
  (the same rows as the embedding), encoder block 0 (``attn.query.weight``, ``mlp.0.weight``) and the audio
  projection (``proj.weight``, ``proj.bias``), into ``training_official.safetensors``; the ids, labels, mask,
  spans and losses into ``training_official.json``.

How to run (same venv and official files as record_encoder.py; ffmpeg on PATH), from the repository root:

    HF_HUB_OFFLINE=1 /work/official/venv/bin/python tests/golden/record_training.py --official-files DIR

It rewrites the two files next to this script (clip0.wav and clip1.wav come from record_generation.py).
"""

import json
import os
import sys
from importlib.metadata import version

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_encoder  # noqa: E402  (shared helpers: model loading)

REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT_JSON = os.path.join(HERE, "training_official.json")
OUT_TENSORS = os.path.join(HERE, "training_official.safetensors")
EOD, IGNORE = 151643, -100
CLIP0, CLIP1 = "tests/golden/clip0.wav", "tests/golden/clip1.wav"
SYSTEM = "You are a helpful assistant."
ASR = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
# (text, is it a label) pieces per row
ROWS = [
    [(f"<audio>{CLIP1}</audio>{ASR}", False), ("mister quilter is the apostle", True), ("<|endoftext|>", True)],
    [(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nAudio 1:<audio>{CLIP0}</audio>\n"
      f"Audio 2:<audio>{CLIP1}</audio>\nWhich clip is longer?<|im_end|>\n<|im_start|>assistant\n", False),
     ("The second one, by about a second.", True), ("<|im_end|>", True), ("\n", False)],
]
EXTRA_ROWS = [0, 1, 2, 100, 1000, 50000, 151642, 151644, 151645, 155163, 155164, 155946]
GRADIENTS = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
             "transformer.h.1.mlp.w2.weight", "transformer.audio.blocks.0.attn.query.weight",
             "transformer.audio.blocks.0.mlp.0.weight", "transformer.audio.proj.weight", "transformer.audio.proj.bias"]


def encode_row(tokenizer, pieces):
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tokenizer.encode(text, allowed_special="all", audio_info=tokenizer.process_audio(text))
        ids += piece
        labels += piece if labelled else [IGNORE] * len(piece)
    text = "".join(t for t, _ in pieces)
    return ids, labels, tokenizer.process_audio(text)


def batch(rows):
    width = max(len(ids) for ids, _, _ in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return (torch.tensor([pad(ids, EOD) for ids, _, _ in rows]), torch.tensor([pad(lab, IGNORE) for _, lab, _ in rows]),
            torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in rows]))


def main():
    args = record_encoder.parse_args(__doc__.split("\n\n")[0], OUT_JSON)
    official_dir = os.path.abspath(args.official_files)
    os.chdir(REPO_ROOT)  # the clip paths are relative to the repository root
    with record_encoder.official_workdir() as work_dir:
        from transformers import AutoTokenizer

        model = record_encoder.load_official_model(official_dir, work_dir)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=True)
        model.train()
        rows = [encode_row(tokenizer, pieces) for pieces in ROWS]
        input_ids, labels, mask = batch(rows)
        audio_info = [info for _, _, info in rows]
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, audio_info=audio_info)
        out.loss.backward()
        params = dict(model.named_parameters())
        used = sorted(set(input_ids.flatten().tolist()) | set(EXTRA_ROWS))
        tensors = {name: params[name].grad.detach().clone().contiguous() for name in GRADIENTS}
        tensors["transformer.wte.weight.rows"] = params["transformer.wte.weight"].grad[used].clone()
        tensors["lm_head.weight.rows"] = params["lm_head.weight"].grad[used].clone()
        alone = []
        with torch.no_grad():
            for ids, lab, info in rows:
                one = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            labels=torch.tensor([lab]), audio_info=[info])
                alone.append(one.loss.item())
        record = {
            "reference": {"code": "QwenLM/Qwen-Audio@e81cc26 modeling_qwen.py QWenLMHeadModel.forward(labels=...)",
                          "checkpoint": "make_tiny_checkpoint(seed=0), real qwen.tiktoken, fp32, CPU, model.train()",
                          "transformers": version("transformers"), "torch": torch.__version__},
            "pieces": [[[text, labelled] for text, labelled in pieces] for pieces in ROWS],
            "input_ids": input_ids.tolist(), "labels": labels.tolist(), "attention_mask": mask.tolist(),
            "audio_span_tokens": [info["audio_span_tokens"] for info in audio_info],
            "loss": out.loss.item(), "loss_alone": alone, "label_tokens": int((labels[:, 1:] != IGNORE).sum()),
            "rows": used, "gradients": GRADIENTS,
        }
    save_file(tensors, OUT_TENSORS, metadata={"recorded_by": "tests/golden/record_training.py"})
    with open(OUT_JSON, "w", encoding="utf-8") as f:
        json.dump(record, f, separators=(",", ":"))
        f.write("\n")
    print(f"loss {record['loss']:.8f}, alone {alone}; wrote {OUT_JSON} and {OUT_TENSORS}")


if __name__ == "__main__":
    main()

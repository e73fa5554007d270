"""Record the official model's ``output_hidden_states`` as a golden file.

What it records: ``QWenLMHeadModel.forward(..., output_hidden_states=True, return_dict=True)`` of the official code
(QwenLM/Qwen-Audio at commit e81cc26, modeling_qwen.py + audio.py + tokenization_qwen.py), loaded through
transformers' remote code in fp32 on CPU (eval, no_grad) from ``make_tiny_checkpoint(seed=0,
num_hidden_layers=3)`` with the real qwen.tiktoken. Three blocks, so the tuple shows its shape: the official
``hidden_states`` holds the embeddings (audio spliced in), the outputs of blocks 0 .. N-2, and then ``ln_f`` of the
last block's output (not the raw block output): N + 1 tensors.

One case, a left-padded batch of two rows: record_encoder.py's synthetic clip 0 with the ASR tags, and a ChatML
text prompt (the same rows as record_decoder.py's ``batch`` case). Tensors, float32 except the int64 ids / mask:

    input_ids, attention_mask   int64 [2, S]
    hidden_states.{i}           [2, S, D] for i in 0 .. 3
    last_hidden_state           [2, S, D]
    logits_lse                  [2, S]    logsumexp of the logits over the full vocabulary (computed in float64)

How to run (same venv and official files as record_encoder.py), from the repository root:

    HF_HUB_OFFLINE=1 /work/official/venv/bin/python tests/golden/record_hidden_states.py --official-files DIR

It writes ``hidden_states_official.safetensors`` next to this script; the tests only read that file.
"""

import importlib
import json
import os
import sys
from importlib.metadata import version

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import record_decoder  # noqa: E402  (prompts, tokenizing and padding as the decoder golden does)
import record_encoder  # noqa: E402  (model loading, clips, audio inputs, deterministic save)

OUT_PATH = os.path.join(HERE, "hidden_states_official.safetensors")
CHECKPOINT = {"seed": 0, "num_hidden_layers": 3}
TEXTS = ["<audio>clip0.wav</audio>" + record_decoder.ASR_TAGS, record_decoder.CHAT_TEXT]


def main():
    args = record_encoder.parse_args(__doc__.split("\n\n")[0], OUT_PATH)
    official_dir = os.path.abspath(args.official_files)
    with record_encoder.official_workdir() as work_dir:
        from transformers import AutoTokenizer

        model = record_encoder.load_official_model(official_dir, work_dir, **CHECKPOINT)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=True)
        audio_module = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".audio")
        clip = record_encoder.make_waveform(0, record_encoder.CLIP_LENGTHS[0])
        audios, lengths, spans = record_encoder.official_inputs(audio_module, [clip])
        audio_info = {"input_audios": audios, "input_audio_lengths": lengths, "audio_span_tokens": spans}
        input_ids, mask = record_decoder.left_pad(record_decoder.tokenize_rows(tokenizer, TEXTS, spans))
        with torch.no_grad():
            output = model(input_ids=input_ids, attention_mask=mask, audio_info=audio_info,
                           output_hidden_states=True, return_dict=True)
            assert len(output.hidden_states) == CHECKPOINT["num_hidden_layers"] + 1
        out = {"input_ids": input_ids, "attention_mask": mask,
               **{f"hidden_states.{i}": h for i, h in enumerate(output.hidden_states)},
               "last_hidden_state": model.transformer(input_ids=input_ids, attention_mask=mask,
                                                      audio_info=audio_info, return_dict=True).last_hidden_state,
               "logits_lse": torch.logsumexp(output.logits.double(), -1).float()}
    out = {name: t.contiguous() for name, t in out.items()}
    metadata = {
        "code": record_decoder.CODE_REF,
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "checkpoint": f"qwenaudio.testing.make_tiny_checkpoint({', '.join(f'{k}={v}' for k, v in CHECKPOINT.items())}"
                      ", vocab_file=qwen.tiktoken)",
        "prompts": json.dumps(TEXTS),
        "waveforms": "record_encoder.make_waveform(0, 8000)",
        "dtype": "float32",
    }
    record_encoder.save_deterministic(out, args.out, metadata)
    print(f"wrote {len(out)} tensors, {os.path.getsize(args.out)} bytes to {args.out}")


if __name__ == "__main__":
    main()

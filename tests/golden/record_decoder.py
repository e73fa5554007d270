"""Record the official Qwen-Audio language model's activations, logits and cached decoding steps as a golden file.

What it records: the official ``QWenLMHeadModel`` (QwenLM/Qwen-Audio at commit e81cc26, modeling_qwen.py +
audio.py + tokenization_qwen.py), loaded through transformers' remote code in fp32 on CPU (eval, no_grad) from two
tiny random checkpoints built by ``qwenaudio.testing.make_tiny_checkpoint`` with the real qwen.tiktoken:

    A = make_tiny_checkpoint(seed=0)                  default tiny dims, seq_length 2048 (NTK alpha 1, no logn)
    B = make_tiny_checkpoint(seed=1, seq_length=16)   so dynamic NTK and logn scaling are active on short prompts

Prompt ids come from the official tokenizer (``tokenizer(text, audio_info=...)``); audio inputs are built as the
official ``process_audio`` builds them, from record_encoder.py's synthetic clips 0, 1, 2 (spans 14, 34, 52).

Cases (PROMPTS below): ``text``, ``one_clip``, ``two_clips``, ``batch`` (one_clip + text, left-padded) on A;
``ntk_text`` (40 tokens: alpha 7), ``ntk_batch`` (40 + 20 tokens, left-padded: alpha 7 and 3) and ``ntk_short``
(12 tokens: alpha 1, decoding crosses seq_length) on B.  Every model call goes through the official
``prepare_inputs_for_generation`` then ``forward`` (use_cache=True), as transformers' greedy generate does.
Tensors, float32 except the int64 ids/masks and the float64 alpha lists:

    cols                   int64 [NC]     vocab columns kept from the logits (COLS below)
    {case}.input_ids       int64 [B, S]   prompt ids (left-padded with 151643 in the batch cases)
    {case}.attention_mask  int64 [B, S]   1 real / 0 pad; all ones where no mask was passed (see `masked_cases`)
    {case}.embeds          [B, S, D]      input of transformer.h[0]: token embeddings with the audio spans spliced in
    {case}.block{i}        [B, S, D]      output hidden state of transformer.h[i]
    {case}.ln_f            [B, S, D]      output of transformer.ln_f
    {case}.logits_cols     [B, S, NC]     logits[..., cols]
    {case}.logits_lse      [B, S]         logsumexp over the full vocabulary (computed in float64)
    {case}.logits_argmax   int64 [B, S]   argmax over the full vocabulary
    {case}.ntk_alpha       float64 [R]    transformer.rotary_emb._ntk_alpha_cached_list after the prefill
  decoding cases (one_clip, batch, ntk_text, ntk_batch, ntk_short), 8 greedy steps with the KV cache:
    {case}.step_ids        int64 [B, 8]   token fed at each step (argmax of the previous logits)
    {case}.step_logits_cols, {case}.step_logits_lse   [B, 8, NC], [B, 8]   logits of each step, as above
    {case}.step_ntk_alpha  float64 [R]    the alpha list after the last step (the official code freezes it)

Metadata: code ref, library versions, checkpoints, COLS rule, ``masked_cases`` and ``prompts`` (JSON).

How to run (same venv and official files as record_encoder.py), from the repository root:

    HF_HUB_OFFLINE=1 /work/official/venv/bin/python tests/golden/record_decoder.py --official-files DIR

It writes ``decoder_official.safetensors`` next to this script; the tests only read that file.
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
import record_encoder  # noqa: E402  (shared helpers: model loading, clips, audio inputs, deterministic save)

OUT_PATH = os.path.join(HERE, "decoder_official.safetensors")
CODE_REF = "QwenLM/Qwen-Audio@e81cc26 modeling_qwen.py+audio.py+tokenization_qwen.py"
PAD_ID = 151643  # <|endoftext|>: eos = pad
VOCAB_SIZE = 155947
N_STEPS = 8
CHECKPOINTS = {"A": {"seed": 0}, "B": {"seed": 1, "seq_length": 16}}

# 384 random vocab ids (PCG64(1234)) plus the first 128 ids, sorted.
_rng = np.random.Generator(np.random.PCG64(1234))
COLS = sorted(set(_rng.choice(VOCAB_SIZE, 384, replace=False).tolist()) | set(range(128)))
COLS_RULE = "sorted(set(Generator(PCG64(1234)).choice(155947, 384, replace=False)) | set(range(128)))"

ASR_TAGS = "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
CHAT_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "What is in this recording?<|im_end|>\n<|im_start|>assistant\n")
LONG_40 = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch, "
           "sipping coffee and wondering whether the rain will come before the harvest is finished this autumn "
           "evening. Rain fell")
MEDIUM_20 = "A small boat drifted slowly across the quiet lake as the morning mist lifted above the tall pine trees."
SHORT_12 = "Please describe the weather in the mountains today and tomorrow morning."

# case: (checkpoint, [row texts], clip indices for audio_info, token count per row, decode?)
PROMPTS = {
    "text": ("A", [CHAT_TEXT], [], None, False),
    "one_clip": ("A", ["<audio>clip0.wav</audio>" + ASR_TAGS], [0], None, True),
    "two_clips": ("A", ["<|im_start|>user\nAudio 1:<audio>clip1.wav</audio>\nAudio 2:<audio>clip2.wav</audio>\n"
                        "which is longer?<|im_end|>\n<|im_start|>assistant\n"], [1, 2], None, False),
    "batch": ("A", ["<audio>clip0.wav</audio>" + ASR_TAGS, CHAT_TEXT], [0], None, True),
    "ntk_text": ("B", [LONG_40], [], [40], True),
    "ntk_batch": ("B", [LONG_40, MEDIUM_20], [], [40, 20], True),
    "ntk_short": ("B", [SHORT_12], [], [12], True),
}
EXPECTED_ALPHA = {"text": [1], "one_clip": [1], "two_clips": [1], "batch": [1],
                  "ntk_text": [7], "ntk_batch": [7, 3], "ntk_short": [1]}


def tokenize_rows(tokenizer, texts, spans):
    """Official ids per row; the audio spans are consumed in row-major order, as the model consumes the clips."""
    rows, used = [], 0
    for text in texts:
        n_audio = text.count("<audio>")
        audio_info = {"audio_span_tokens": spans[used : used + n_audio]} if n_audio else None
        ids = tokenizer(text, audio_info=audio_info)["input_ids"]
        assert ids == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text, audio_info=audio_info))
        rows.append(ids)
        used += n_audio
    assert used == len(spans)
    return rows


def left_pad(rows):
    """input_ids and attention_mask [B, S], left-padded with PAD_ID like the official batch evaluation."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    return ids, mask


def logits_summary(logits):
    """(logits[..., COLS], float64 logsumexp -> float32, argmax) of a [B, S, V] logits tensor."""
    return (logits[..., COLS], torch.logsumexp(logits.double(), -1).float(), logits.argmax(-1))


def call_official(model, input_ids, past, attention_mask, audio_info):
    """One step of transformers' greedy generate: prepare_inputs_for_generation, then forward with the cache."""
    inputs = model.prepare_inputs_for_generation(
        input_ids, past_key_values=past, attention_mask=attention_mask, use_cache=True, audio_info=audio_info)
    return model(**inputs, return_dict=True)


def record_case(model, tokenizer, audio_module, case, waveforms, out, masked_cases):
    """Tokenize, prefill with hooks on the blocks, check, then (for decoding cases) run the cached steps."""
    _, texts, clips, n_tokens, decode = PROMPTS[case]
    audio_info = None
    if clips:
        input_audios, input_audio_lengths, spans = record_encoder.official_inputs(
            audio_module, [waveforms[k] for k in clips])
        audio_info = {"input_audios": input_audios, "input_audio_lengths": input_audio_lengths,
                      "audio_span_tokens": spans}
    rows = tokenize_rows(tokenizer, texts, audio_info["audio_span_tokens"] if audio_info else [])
    if n_tokens is not None:
        assert [len(r) for r in rows] == n_tokens, (case, [len(r) for r in rows])
    input_ids, mask = left_pad(rows)
    attention_mask = mask if len(rows) > 1 else None  # single prompts: no mask, like a plain model(input_ids)
    if attention_mask is not None:
        masked_cases.append(case)

    transformer = model.transformer
    seen = {}

    def save_output(name):
        return lambda module, args, output: seen.__setitem__(
            name, (output[0] if isinstance(output, tuple) else output).detach().clone())

    hooks = [transformer.h[0].register_forward_pre_hook(
        lambda module, args: seen.__setitem__("embeds", args[0].detach().clone()))]
    hooks += [block.register_forward_hook(save_output(f"block{i}")) for i, block in enumerate(transformer.h)]
    hooks.append(transformer.ln_f.register_forward_hook(save_output("ln_f")))
    try:
        output = call_official(model, input_ids, None, attention_mask, audio_info)
    finally:
        for hook in hooks:
            hook.remove()
    alpha = [float(a) for a in transformer.rotary_emb._ntk_alpha_cached_list]
    assert alpha == EXPECTED_ALPHA[case], (case, alpha)

    out[f"{case}.input_ids"] = input_ids
    out[f"{case}.attention_mask"] = mask
    for name in ["embeds"] + [f"block{i}" for i in range(len(transformer.h))] + ["ln_f"]:
        out[f"{case}.{name}"] = seen[name]
    cols, lse, argmax = logits_summary(output.logits)
    out[f"{case}.logits_cols"], out[f"{case}.logits_lse"], out[f"{case}.logits_argmax"] = cols, lse, argmax
    out[f"{case}.ntk_alpha"] = torch.tensor(alpha, dtype=torch.float64)
    check_audio_rows(transformer, input_ids, seen["embeds"], audio_info)

    if decode:
        decode_steps(model, case, input_ids, attention_mask, audio_info, output, out)
        assert out[f"{case}.step_ntk_alpha"].tolist() == alpha


def check_audio_rows(transformer, input_ids, embeds, audio_info):
    """The spliced rows of `embeds` are exactly what the official encoder returns for the same inputs."""
    starts = (input_ids == 155163).nonzero().tolist()
    ends = (input_ids == 155164).nonzero().tolist()
    assert len(starts) == len(ends) == (len(audio_info["audio_span_tokens"]) if audio_info else 0)
    if not starts:
        return
    spans = transformer.audio.encode(
        audio_info["input_audios"], audio_info["input_audio_lengths"], audio_info["audio_span_tokens"])
    for (row, a), (row_end, b), span in zip(starts, ends, spans):
        assert row == row_end and torch.equal(embeds[row, a : b + 1], span)


def decode_steps(model, case, input_ids, attention_mask, audio_info, output, out):
    """N_STEPS greedy steps with past_key_values, growing input_ids and the mask as generate does."""
    step_ids, step_logits = [], []
    past = output.past_key_values
    next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(N_STEPS):
        input_ids = torch.cat([input_ids, next_ids], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], 1)
        output = call_official(model, input_ids, past, attention_mask, audio_info)
        past = output.past_key_values
        step_ids.append(next_ids)
        step_logits.append(output.logits[:, -1:])
        next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
    cols, lse, _ = logits_summary(torch.cat(step_logits, dim=1))
    out[f"{case}.step_ids"] = torch.cat(step_ids, dim=1)
    out[f"{case}.step_logits_cols"], out[f"{case}.step_logits_lse"] = cols, lse
    out[f"{case}.step_ntk_alpha"] = torch.tensor(
        [float(a) for a in model.transformer.rotary_emb._ntk_alpha_cached_list], dtype=torch.float64)


def describe_checkpoint(model, kwargs):
    """make_tiny_checkpoint call and the config values that matter, for the metadata."""
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    fields = ("hidden_size", "num_attention_heads", "kv_channels", "num_hidden_layers", "intermediate_size",
              "seq_length", "vocab_size", "layer_norm_epsilon", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn")
    return {"made_by": f"qwenaudio.testing.make_tiny_checkpoint({args}, vocab_file=qwen.tiktoken)",
            **{k: getattr(model.config, k) for k in fields}, "audio": model.config.audio}


def main():
    args = record_encoder.parse_args(__doc__.split("\n\n")[0], OUT_PATH)
    official_dir = os.path.abspath(args.official_files)

    with record_encoder.official_workdir() as work_dir:
        from transformers import AutoTokenizer

        models = {}
        for name, kwargs in CHECKPOINTS.items():  # one directory each, same dynamic-module name (same code)
            os.makedirs(os.path.join(work_dir, name))
            models[name] = record_encoder.load_official_model(official_dir, os.path.join(work_dir, name), **kwargs)
        model_a = models["A"]
        tokenizer = AutoTokenizer.from_pretrained(model_a.name_or_path, trust_remote_code=True)
        audio_module = importlib.import_module(type(model_a).__module__.rsplit(".", 1)[0] + ".audio")

        waveforms = [record_encoder.make_waveform(k, n) for k, n in enumerate(record_encoder.CLIP_LENGTHS)]
        out = {"cols": torch.tensor(COLS, dtype=torch.int64)}
        masked_cases = []
        with torch.no_grad():
            for case, (ckpt, *_) in PROMPTS.items():
                record_case(models[ckpt], tokenizer, audio_module, case, waveforms, out, masked_cases)
        checkpoints = {name: describe_checkpoint(models[name], kwargs) for name, kwargs in CHECKPOINTS.items()}

    for name, tensor in out.items():
        assert not (tensor.is_floating_point() and tensor.isnan().any()), name
    out = {name: (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).contiguous()
           for name, t in out.items()}
    metadata = {
        "code": CODE_REF,
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "checkpoints": json.dumps(checkpoints, sort_keys=True),
        "case_checkpoint": json.dumps({case: p[0] for case, p in PROMPTS.items()}),
        "cols": f"{len(COLS)} ids: {COLS_RULE}",
        "masked_cases": json.dumps(masked_cases),
        "prompts": json.dumps({case: p[1] for case, p in PROMPTS.items()}),
        "clips": json.dumps({case: p[2] for case, p in PROMPTS.items()}),
        "waveforms": "record_encoder.make_waveform(k, n) for k, n in enumerate([8000, 20800, 32000])",
        "decoding": f"{N_STEPS} greedy steps (argmax of raw logits, no logits processors) through "
                    "prepare_inputs_for_generation + forward(use_cache=True); mask grown by a ones column per step",
        "dtype": "float32",
    }
    record_encoder.save_deterministic(out, args.out, metadata)
    print(f"wrote {len(out)} tensors, {os.path.getsize(args.out)} bytes to {args.out}")
    for case, (_, texts, *_r) in PROMPTS.items():
        print(f"  {case}: input_ids {tuple(out[f'{case}.input_ids'].shape)}, "
              f"real tokens {out[f'{case}.attention_mask'].sum(1).tolist()}, alpha {out[f'{case}.ntk_alpha'].tolist()}")


if __name__ == "__main__":
    main()

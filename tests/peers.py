"""Our tensors under the names of transformers' Qwen2-Audio encoder and Qwen2 decoder, the closest maintained peers.

Their math is Qwen-Audio's (below seq_length), so loading our weights into them gives an independent reference
(tests/test_encoder.py, tests/test_decoder.py) and a speed comparison on equal terms (benchmarks/bench.py).
transformers itself is not imported here.
"""

import torch


def qwen2_audio_encoder_weights(encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `AudioEncoder` state dict under the names of transformers' `Qwen2AudioEncoder` (same math, other names;
    it has no projection or BOS/EOS rows)."""
    out = {"conv1.weight": encoder["conv1.weight"], "conv1.bias": encoder["conv1.bias"],
           "conv2.weight": encoder["conv2.weight"], "conv2.bias": encoder["conv2.bias"],
           "embed_positions.weight": encoder["positional_embedding"],
           "layer_norm.weight": encoder["ln_post.weight"], "layer_norm.bias": encoder["ln_post.bias"]}
    renames = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
               "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
               "mlp_ln": "final_layer_norm"}
    for name, tensor in encoder.items():
        if name.startswith("blocks."):
            _, layer, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            out[f"layers.{layer}.{renames[module]}.{param}"] = tensor
    return out


def qwen2_decoder_weights(decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `Decoder` state dict under transformers' `Qwen2ForCausalLM` names: q/k/v split out of c_attn (views, no
    copies), up = w1, gate = w2 (Qwen puts the SiLU on w2), down = c_proj. Same math below seq_length."""
    out = {"model.embed_tokens.weight": decoder["wte.weight"], "model.norm.weight": decoder["ln_f.weight"],
           "lm_head.weight": decoder["lm_head.weight"]}
    renames = {"attn.c_proj": "self_attn.o_proj", "mlp.w1": "mlp.up_proj", "mlp.w2": "mlp.gate_proj",
               "mlp.c_proj": "mlp.down_proj", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
    for name, tensor in decoder.items():
        if not name.startswith("h."):
            continue
        _, layer, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        prefix = f"model.layers.{layer}."
        if module == "attn.c_attn":
            for part, chunk in zip("qkv", tensor.chunk(3)):
                out[f"{prefix}self_attn.{part}_proj.{param}"] = chunk
        else:
            out[f"{prefix}{renames[module]}.{param}"] = tensor
    return out


QWEN2_AUDIO_RENAMES = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                       "audio_tower.": "model.audio_tower.", "multi_modal_projector.": "model.multi_modal_projector."}


def qwen2_audio_parameter_name(name: str) -> str:
    """transformers' `Qwen2AudioForConditionalGeneration` parameter name of a Qwen2-Audio checkpoint tensor (the
    published names, which are ours: transformers renames them as it loads)."""
    prefix = next(p for p in QWEN2_AUDIO_RENAMES if name.startswith(p))
    return QWEN2_AUDIO_RENAMES[prefix] + name.removeprefix(prefix)

"""Every tensor of an official checkpoint, with its shape, in order, for any dimensions: the table by hand.

Written from the official checkpoint (Qwen/Qwen-Audio: the names in model.safetensors.index.json, the shapes
in the shard headers; Qwen-Audio-Chat's are the same): at full size, 749 tensors and 8,396,222,464 parameters.
The order is the official model's state-dict order (`transformer.wte`, `transformer.h.*`, `transformer.ln_f`,
`transformer.audio.*`, then `lm_head`). It is also the order `make_tiny_checkpoint` draws random weights in, so
every tiny checkpoint, and every recording in this folder made from one, depends on it. `qwenaudio.tensor_shapes`
reads the same table off our modules; tests/test_checkpoint.py holds the two equal.
"""

from qwenaudio import QwenAudioConfig

Shape = tuple[int, ...]


def official_tensors(config: QwenAudioConfig) -> dict[str, Shape]:
    """Every tensor a checkpoint with these dimensions stores (plus the int8 scales of a quantized one), in order."""
    d, ff, a = config.hidden_size, config.mlp_width, config.audio
    shapes: dict[str, Shape] = {"transformer.wte.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        h = f"transformer.h.{i}."
        shapes |= {
            h + "ln_1.weight": (d,),
            h + "attn.c_attn.weight": (3 * d, d),  # q | k | v stacked
            h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d),
            h + "ln_2.weight": (d,),
            h + "mlp.w1.weight": (ff, d),
            h + "mlp.w2.weight": (ff, d),  # carries the SiLU gate
            h + "mlp.c_proj.weight": (d, ff),
        }
    shapes |= {"transformer.ln_f.weight": (d,)}
    e = "transformer.audio."
    shapes |= {
        e + "positional_embedding": (a.n_ctx, a.n_state),
        e + "conv1.weight": (a.n_state, a.n_mels, 3),
        e + "conv1.bias": (a.n_state,),
        e + "conv2.weight": (a.n_state, a.n_state, 3),
        e + "conv2.bias": (a.n_state,),
    }
    for j in range(a.n_layer):
        b = f"{e}blocks.{j}."
        shapes |= {
            b + "attn.query.weight": (a.n_state, a.n_state),
            b + "attn.query.bias": (a.n_state,),
            b + "attn.key.weight": (a.n_state, a.n_state),  # Whisper's key projection has no bias
            b + "attn.value.weight": (a.n_state, a.n_state),
            b + "attn.value.bias": (a.n_state,),
            b + "attn.out.weight": (a.n_state, a.n_state),
            b + "attn.out.bias": (a.n_state,),
            b + "attn_ln.weight": (a.n_state,),
            b + "attn_ln.bias": (a.n_state,),
            b + "mlp.0.weight": (4 * a.n_state, a.n_state),
            b + "mlp.0.bias": (4 * a.n_state,),
            b + "mlp.2.weight": (a.n_state, 4 * a.n_state),
            b + "mlp.2.bias": (a.n_state,),
            b + "mlp_ln.weight": (a.n_state,),
            b + "mlp_ln.bias": (a.n_state,),
        }
    shapes |= {
        e + "ln_post.weight": (a.n_state,),
        e + "ln_post.bias": (a.n_state,),
        e + "proj.weight": (a.output_dim, a.n_state),
        e + "proj.bias": (a.output_dim,),
        e + "audio_bos_eos_token.weight": (2, a.output_dim),  # row 0 BOS, row 1 EOS
        "lm_head.weight": (config.vocab_size, d),
    }
    if config.quantization:  # ours, not official: int8 weights keep their shapes and gain one scale per row, last
        shapes |= {n + "_scale": shapes[n][:1] for n in quantized_weights(config)}
    return shapes


def quantized_weights(config: QwenAudioConfig) -> list[str]:
    """The weights int8 quantization replaces: every linear layer of the language model, in order."""
    layers = [f"transformer.h.{i}.{m}.weight" for i in range(config.num_hidden_layers)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")]
    return layers + ["lm_head.weight"]

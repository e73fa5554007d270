"""A model of either family assembled: configuration, tokenizer, audio encoder and decoder, built as its `Family`
record says (`model.family`: Qwen-Audio or Qwen2-Audio, from config.json) and loaded from one checkpoint.

Modules are created on the meta device (no memory, no random init) and then take the checkpoint's tensors
directly with `load_state_dict(assign=True)`: each weight is read once, converted to the requested dtype, and never
copied again, so loading needs no more memory than the weights themselves. Which official tensor goes to which
module, under which attribute path, is `checkpoint.split_state`'s to say.

`QwenAudio.generate` is the one way prompts with clips are answered (tasks, evaluation and chat all call it, or
`stream` for one reply in pieces): the batch, the clips' spans, the settings and `generate.generate`, put together
once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio import AudioSource, as_waveform, audio_span, log_mel_spectrogram, source_name
from .checkpoint import QUANTIZATIONS, int4_group_size, load_checkpoint, quantize_layout, quantizer, split_state
from .checks import expect, renamed, shown
from .config import GenerationConfig
from .decoder import Decoder
from .encoder import AudioEncoder
from .errors import ConfigError, InputError
from .families import QWEN_AUDIO, Config, family_of, read_config
from .generate import Session, Step, compile_decoding, decode_one_token, generate, stream_text
from .qwen2_audio import Qwen2AudioEncoder, Qwen2Decoder
from .tokenizer import Batch, Tokenizer


@dataclass(frozen=True)
class Output:
    """Logits and hidden states, named as the official model's `output_hidden_states=True` names them."""

    logits: Tensor  # [B, S, vocab_size]
    hidden_states: tuple[Tensor, ...]  # num_hidden_layers + 1 of [B, S, hidden_size]: the embeddings (audio spliced
    # in), the output of each block but the last, then the final RMSNorm (ln_f) of the last block's output

    @property
    def last_hidden_state(self) -> Tensor:
        """What lm_head reads: ln_f of the last block's output (the official `last_hidden_state`)."""
        return self.hidden_states[-1]


class QwenAudio(nn.Module):
    """The whole model, of either family (`family`): `encoder` turns clips into spans, `decoder` reads prompts with
    the spans written over their audio tokens."""

    def __init__(self, config: Config, tokenizer: Tokenizer, generation_config: GenerationConfig):
        super().__init__()
        self.family = family = family_of(config)
        expect(tokenizer, family.tokenizer, "tokenizer", f"a qwenaudio {family.tokenizer.__name__} ({family.name}'s)")
        expect(generation_config, GenerationConfig, "generation_config", "a GenerationConfig")
        if tokenizer.audio_token_id != config.audio_token_id:
            raise ConfigError(f"config.json: the audio token is {config.audio_token_id} but the vocabulary's is "
                              f"{tokenizer.audio_token_id}")
        self.config, self.tokenizer, self.generation_config = config, tokenizer, generation_config
        self.encoder = family.encoder(config)
        self.decoder = family.decoder(config)
        self.decode_step: Step = decode_one_token  # what `generate` and `stream` feed each token with

    def compile_decoding(self, **options) -> None:
        """Have this model's `generate` and `stream` decode with the compiled step (`generate.compile_decoding`,
        whose `options` these are); other models, and the core's functions, are unchanged."""
        self.decode_step = compile_decoding(**options)

    def generate(self, prompts: Sequence[str], clips: Sequence[Sequence[Tensor | AudioSource]] | None = None, *,
                 progress: Callable[[int, int], None] | None = None, **settings) -> list[list[int]]:
        """New ids of each prompt, up to (not including) its stop: the one way a batch of prompts is answered.

        `prompts` are texts with `<audio>PATH</audio>` regions, `clips[i]` the clips (16 kHz waveforms, or anything
        `load_audio` reads) of prompt i in region order. The prompts are left-padded into one batch, each region
        sized to its clip, the clips encoded as one batch, and `settings` applied to the model's generation config
        (None keeps its default). `progress(steps, budget)` is `core.generate.generate`'s."""
        expect(prompts, (list, tuple), "prompts", "a list of str (texts with <audio>PATH</audio> regions)")
        clips = [[] for _ in prompts] if clips is None else clips
        numbered = iter(range(sum(len(own) for own in clips)))
        waves = [[as_waveform(c, source_name(c, next(numbered)), self.encoder.min_samples) for c in own]
                 for own in clips]
        batch = prompt_batch(self.tokenizer, prompts, waves, self.encoder.span_length)
        config = self.generation_config.replace(**settings)
        return generate(self.decoder, self.tokenizer, batch.input_ids.to(self.device),
                        attention_mask=batch.attention_mask.to(self.device),
                        audio=self.encode_audio([w for own in waves for w in own]), config=config,
                        progress=progress, step=self.decode_step)

    def stream(self, input_ids: Tensor, clips: Sequence[Tensor | AudioSource] = (), *,
               session: Session | None = None, **settings) -> Iterator[str]:
        """The reply to one prompt's ids [1, S] (its clips in region order), in text pieces as they decode; a
        `session` kept from the previous turn of a conversation is reused where it extends to these ids
        (`generate_steps`). `settings` are applied to the model's generation config (None keeps its default)."""
        audio = self.encode_audio(clips)
        config = self.generation_config.replace(**settings)
        yield from stream_text(self.decoder, self.tokenizer, input_ids.to(self.device), audio=audio, config=config,
                               session=session, step=self.decode_step)

    @property
    def device(self) -> torch.device:
        return self.decoder.lm_head.weight.device

    def encode_audio(self, clips: Sequence[Tensor | AudioSource]) -> list[Tensor]:
        """Encoded spans of clips (16 kHz waveforms, or anything `load_audio` reads), encoded as one batch, as the
        official code batches the clips of one prompt or one evaluation batch. For inference: no autograd graph is
        kept (`loss` keeps one)."""
        with torch.no_grad():
            return self._encode(clips)

    def _encode(self, clips: Sequence[Tensor | AudioSource]) -> list[Tensor]:
        expect(clips, (list, tuple), "clips", "a list of clips (16 kHz waveforms or audio files)")
        clips = [as_waveform(c, source_name(c, i), self.encoder.min_samples) for i, c in enumerate(clips)]
        if not clips:
            return []
        mel = torch.stack([log_mel_spectrogram(c.to(self.device), self.encoder.n_mels) for c in clips])
        return self.encoder.encode(mel, [len(c) for c in clips])

    def loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
             audio: Sequence[Tensor | AudioSource] = ()) -> Tensor:
        """The official training objective, `next_token_loss`, with the clips encoded in the same graph, so the audio
        encoder is trained end to end as in the official model (nothing is detached). Call it in `train()` mode to
        get the official training forward (dynamic NTK and logn off).

        Only the positions that predict a label go through lm_head: the loss is the same mean over the same tokens,
        while a batch of 1,000-token prompts with 20-token answers skips 98 % of its 155,947-wide logits."""
        expect(input_ids, Tensor, "input_ids", "a torch.Tensor of token ids [B, S]")
        expect(labels, Tensor, "labels", "a torch.Tensor of token ids [B, S]")
        labels = labels.to(self.device)
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        logits = self.decoder.logits(input_ids.to(self.device), attention_mask, self._encode(audio), select=predicts)
        return F.cross_entropy(logits, labels[:, 1:][predicts[:, :-1]])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                audio: Sequence[Tensor | AudioSource] | None = None, *,
                output_hidden_states: bool = False) -> Tensor | Output:
        """Full-sequence logits [B, S, vocab] for ids with `<audio>` regions and their clips (16 kHz waveforms, or
        anything `load_audio` reads), no KV cache: the official model's forward. With `output_hidden_states`, an
        `Output` with the logits and the hidden states as the official model returns them."""
        hidden: list[Tensor] | None = [] if output_hidden_states else None
        expect(input_ids, Tensor, "input_ids", "a torch.Tensor of token ids [B, S]")
        logits = self.decoder.logits(input_ids.to(self.device), attention_mask, self.encode_audio(audio or []),
                                     hidden_states=hidden)
        return Output(logits, tuple(hidden)) if hidden is not None else logits


def expect_model(model: object, name: str = "model") -> None:
    """A loaded `QwenAudio`, as `qwenaudio.load` returns: a path or repo id is not loaded here."""
    if not isinstance(model, QwenAudio):
        hint = f" (load it first: qwenaudio.load({model!r}))" if isinstance(model, str) else ""
        raise InputError(f"{name} must be a QwenAudio model, got {shown(model)}{hint}")


def prompt_batch(tokenizer: Tokenizer, prompts: Sequence[str], clips: Sequence[Sequence[Tensor]],
                 span_length: Callable[[int], int] = audio_span) -> Batch:
    """The left-padded ids of a batch of prompts, as the official evaluation's collate_fn makes them: each audio
    region (Qwen-Audio's `<audio>PATH</audio>`, Qwen2-Audio's `<|AUDIO|>`) sized to its clip (`clips[i]`: prompt i's
    16 kHz waveforms, in region order; past 30 s a clip takes a 30 s span, all the model hears) by `span_length`
    (the encoder's: tokens per clip of n samples)."""
    return tokenizer.encode_batch(prompts, audio_spans=[[span_length(len(c)) for c in own] for own in clips])


IGNORE_INDEX = -100  # a label that adds nothing to the loss: prompt, padding, anything not to be learned


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The official loss (modeling_qwen.py, QWenLMHeadModel.forward): position t's logits predict label t + 1, by
    cross-entropy, averaged over every label of the batch that is not IGNORE_INDEX, so an example counts by its
    number of label tokens (not a mean of per-example means)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it fast, else fp32 (CPU) or fp16 (older GPUs).

    bf16 is the checkpoint's own dtype and what the official code runs in. On CPUs, oneDNN runs bf16 matmuls in
    hardware only with AVX-512 (and AVX512_BF16 / AMX); there it is 2-3x faster than fp32 (BENCHMARKS.md), while on
    AVX2-only CPUs it is emulated and far slower, so those stay in fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A float dtype from a torch dtype or its usual names ("bf16", "float16", …); None stays None."""
    chosen = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and chosen not in DTYPES.values():
        raise InputError(f"dtype {dtype!r} is not one of: float32 (fp32), bfloat16 (bf16), float16 (fp16, half)")
    return chosen


def as_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (default: CUDA when torch sees it), refused here if torch cannot use it."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device (try 'cpu', 'cuda' or 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r}: torch sees no CUDA device")
    return device


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
               quantize: str | None = None, true_positions: bool = False,
               progress: Callable[[int, int], None] | None = None, int8: bool = False, int4: bool = False) -> QwenAudio:
    """Load the checkpoint directory `path`, of either family (config.json's `model_type` says which), onto `device`
    (default: CUDA if available) in `dtype` (a torch dtype or a name like "bf16"; default: `default_dtype`).
    `progress(done, total)` is called after each tensor read.

    `quantize="int8"` quantizes the decoder's linears as they are read (`int8.py`): the full model then needs about
    10.7 GiB at its peak instead of 15.5 in bf16 (BENCHMARKS.md); `quantize="int4"` (`int4.py`, inference only) to
    int4 in groups of 64 (or of 32 where 64 does not divide a layer's inputs: a warning says so). A checkpoint written
    by `qwenaudio quantize` loads as it was quantized without asking. `int8=True` / `int4=True` are the deprecated
    spellings of `quantize`. `true_positions` is Qwen-Audio's choice (see `Decoder`); Qwen2-Audio always numbers a
    row's positions by its real tokens, as transformers does. (`qwenaudio.load` is this plus repo ids and a progress
    bar.)"""
    device = as_device(device)
    dtype = as_dtype(dtype) or default_dtype(device)
    path = Path(path)
    config = _configured(read_config(path), true_positions)
    family = family_of(config)
    tokenizer = family.tokenizer.from_pretrained(path)
    method, group_size = _quantization(config, quantize_option(quantize, int8, int4))
    state = _read(path, config, dtype, device, method, group_size, progress=progress)
    generation_config = GenerationConfig.from_json(path)
    with torch.device("meta"):
        model = QwenAudio(config, tokenizer, generation_config)
        if method:
            quantize_layout(model.decoder, method, group_size)  # the layout (on meta: no work), filled below
    owned = split_state(state, family)
    model.encoder.load_state_dict(owned["encoder"], assign=True)
    model.decoder.load_state_dict(owned["decoder"], assign=True)
    return model.eval()


__getattr__ = renamed(__name__, {"load": ("core.model.load_model", load_model)})


def load_encoder(path: str | Path, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> AudioEncoder | Qwen2AudioEncoder:
    """The audio encoder of a checkpoint, in eval mode, reading only its own tensors (0.6 B of the 8.4 B)."""
    config = read_config(path)
    family = family_of(config)
    state = load_checkpoint(path, config, dtype=as_dtype(dtype), device=as_device(device),
                            prefix=family.prefixes("encoder"))
    with torch.device("meta"):
        encoder = family.encoder(config)
    encoder.load_state_dict(split_state(state, family)["encoder"], assign=True)
    return encoder.eval()


def load_decoder(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 quantize: str | None = None, true_positions: bool = False, int8: bool = False,
                 int4: bool = False) -> Decoder | Qwen2Decoder:
    """The language model of a checkpoint, in eval mode (`true_positions` sets Qwen-Audio's, see `Decoder`;
    `load_model` for `quantize`)."""
    config = _configured(read_config(path), true_positions)
    family = family_of(config)
    method, group_size = _quantization(config, quantize_option(quantize, int8, int4))
    state = _read(path, config, as_dtype(dtype), as_device(device), method, group_size)
    with torch.device("meta"):
        decoder = family.decoder(config)
        if method:
            quantize_layout(decoder, method, group_size)
    decoder.load_state_dict(split_state(state, family)["decoder"], assign=True)
    return decoder.eval()


def _configured(config: Config, true_positions: bool) -> Config:
    """`config` with Qwen-Audio's `true_positions` choice applied (Qwen2-Audio's positions are always true)."""
    return replace(config, true_positions=true_positions) if family_of(config) is QWEN_AUDIO else config


def quantize_option(quantize: str | None, int8: bool = False, int4: bool = False) -> str | None:
    """The loaders' `quantize` ("int8", "int4" or None), checked, with the deprecated booleans `int8` / `int4`
    folded in (with a DeprecationWarning)."""
    old = [name for name, wanted in (("int8", int8), ("int4", int4)) if wanted]
    if old:
        warnings.warn(f"{old[0]}=True is deprecated: pass quantize={old[0]!r}", DeprecationWarning, stacklevel=3)
    if len(old) > 1 or (old and quantize not in (None, old[0])):
        raise InputError("int8 and int4: choose one")
    quantize = quantize or (old[0] if old else None)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"quantize={quantize!r}: choose one of {', '.join(map(repr, QUANTIZATIONS))} or None")
    return quantize


def _quantization(config: Config, quantize: str | None) -> tuple[str | None, int | None]:
    """(method, int4 group size) the decoder's linears load in: the checkpoint's own, or the one asked for."""
    asked = QUANTIZATIONS[quantize].method if quantize else None
    if config.quantization:
        if asked and asked != config.quantization:
            raise InputError(f"the checkpoint is already {config.quantization}; load its float original to quantize "
                             f"it as {asked}")
        return config.quantization, config.quantization_group_size
    if not asked:
        return None, None
    return asked, int4_group_size(config) if quantize == "int4" else None


def _read(path: Path, config: Config, dtype: torch.dtype | None, device: torch.device, method: str | None,
          group_size: int | None, progress=None) -> dict[str, Tensor]:
    """The checkpoint's tensors, the decoder's linears quantized on arrival when `method` asks for it and the
    checkpoint is not quantized already."""
    convert = quantizer(method, config, dtype, group_size) if method and not config.quantization else None
    return load_checkpoint(path, config, dtype=dtype, device=device, progress=progress, convert=convert)


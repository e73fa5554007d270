"""The language model against its references.

1. Activations recorded from the official code (tests/golden/decoder_official.safetensors, made by
   tests/golden/record_decoder.py): every block, the final norm and the logits for a text prompt, one clip, two
   clips and a left-padded batch; NTK and logn cases on a checkpoint with seq_length 16; cached decoding steps.
2. transformers' Qwen2ForCausalLM with mapped weights (below seq_length its math is Qwen-7B's).
3. A slow float64 reference written here from the formulas of docs/MODEL.md#decoder, for dynamic NTK, logn and
   frozen alpha.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import qwenaudio
from qwenaudio import InputError, QwenAudioConfig, load_checkpoint, load_decoder, load_encoder
from qwenaudio.core import generate
from qwenaudio.core.audio import log_mel_spectrogram
from qwenaudio.core.checkpoint import split_state
from qwenaudio.core.decoder import Decoder, KVCache, ntk_alpha, positions_and_mask
from qwenaudio.core.generate import Session, decode_one_token, extends, prefill
from qwenaudio.testing import make_tiny_checkpoint

from .conftest import GOLDEN, reference
from .golden.official_tensors import official_tensors
from .peers import qwen2_decoder_weights

with safe_open(GOLDEN / "decoder_official.safetensors", framework="pt") as f:
    OFFICIAL = {name: f.get_tensor(name) for name in f.keys()}
    META = f.metadata()
with safe_open(GOLDEN / "encoder_official.safetensors", framework="pt") as f:
    CLIPS = [f.get_tensor(f"single{k}.waveform") for k in range(3)]  # the clips both recordings used
CASES = list(json.loads(META["case_checkpoint"]))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def decoder(tiny_ckpt):
    return load_decoder(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """seq_length 16, so dynamic NTK and logn scaling start after 16 tokens. Its tests feed token ids, so the
    byte-level stand-in vocabulary serves."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("short") / "ckpt", seed=1, seq_length=16)


def text_ids(tokenizer, n: int, seed: int = 0) -> list[int]:
    words = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly under pale moonlight".split()
    g = torch.Generator().manual_seed(seed)
    text = " ".join(words[int(i)] for i in torch.randint(len(words), (4 * n,), generator=g))
    return tokenizer.encode(text)[:n]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[151643] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def decode_incrementally(decoder: Decoder, ids, mask, prefill_len: int, step=decode_one_token, session=None):
    """Prefill `prefill_len` slots, then feed the rest one token per `step` (decoded tokens are real: the mask is 1
    there); the logits [B, S - prefill_len + 1, V] of slots prefill_len - 1 … S - 1."""
    if session is None:
        session = Session(KVCache(decoder.config, ids.shape[0], ids.shape[1] + 4, torch.float32))
    out = [prefill(decoder, session, ids[:, :prefill_len], mask[:, :prefill_len])]
    out += [step(decoder, session.cache, ids[:, p : p + 1], torch.tensor([p]), session.rope_base)
            for p in range(prefill_len, ids.shape[1])]
    return torch.stack(out, dim=1)


# --- the official code ---------------------------------------------------------------------------------------------

def test_golden_was_recorded_from_official_code():
    assert META["code"].startswith("QwenLM/Qwen-Audio@e81cc26") and META["transformers"] == "4.32.0"
    assert CASES == ["text", "one_clip", "two_clips", "batch", "ntk_text", "ntk_batch", "ntk_short"]


def run_case(case, ckpt):
    """Run the case's ids (splicing its clips, encoded as the official code batched them) through the full forward,
    then prefill them into a KV cache and feed the official greedy steps one at a time; returns the hooked
    activations and logits of the full forward, the step logits and the session."""
    ids, mask = OFFICIAL[f"{case}.input_ids"], OFFICIAL[f"{case}.attention_mask"]
    audio = []
    clips = [CLIPS[k] for k in json.loads(META["clips"])[case]]
    if clips:
        mels = torch.stack([log_mel_spectrogram(c) for c in clips])
        audio = load_encoder(ckpt, dtype=torch.float32).encode(mels, [len(c) for c in clips])
    decoder = load_decoder(ckpt, dtype=torch.float32)
    acts = {}

    def keep_prefill(name):  # keep the first call's; hooks must return None to leave the model alone
        def hook(module, args, out=None):
            acts.setdefault(name, args[0] if out is None else out)
        return hook

    hooks = [decoder.h[0].register_forward_pre_hook(keep_prefill("embeds")),
             decoder.ln_f.register_forward_hook(keep_prefill("ln_f"))]
    hooks += [b.register_forward_hook(keep_prefill(f"block{i}")) for i, b in enumerate(decoder.h)]
    steps = OFFICIAL.get(f"{case}.step_ids")
    b, s = ids.shape
    session = Session(KVCache(decoder.config, b, s + 8, torch.float32))
    with torch.no_grad():
        logits = decoder.logits(ids, mask, audio)
        for h in hooks:
            h.remove()
        last = prefill(decoder, session, ids, mask, audio)
        assert relative_error(last, logits[:, -1]) < 1e-5  # the cached prefill's last slot
        step_logits = [decode_one_token(decoder, session.cache, steps[:, t : t + 1], torch.tensor([s + t]),
                                        session.rope_base) for t in range(8)] if steps is not None else []
    return acts, logits, step_logits, session


@pytest.fixture(scope="module")
def checkpoints(tiny_weights, short_ckpt):
    return {"A": tiny_weights, "B": short_ckpt}  # A: seed 0, default tiny dims; B: seed 1, seq_length 16


@pytest.mark.parametrize("case", CASES)
def test_every_layer_and_logits_equal_official(checkpoints, case):
    acts, logits, _, session = run_case(case, checkpoints[json.loads(META["case_checkpoint"])[case]])
    real = OFFICIAL[f"{case}.attention_mask"].bool()  # padded rows are never read; compare the real ones
    for name in ("embeds", "block0", "block1", "ln_f"):
        assert relative_error(acts[name][real], OFFICIAL[f"{case}.{name}"][real]) < 1e-5, name
    cols = OFFICIAL["cols"]
    assert relative_error(logits[..., cols][real], OFFICIAL[f"{case}.logits_cols"][real]) < 1e-5
    assert relative_error(logits.double().logsumexp(-1)[real], OFFICIAL[f"{case}.logits_lse"][real]) < 1e-5
    assert torch.equal(logits.argmax(-1)[real], OFFICIAL[f"{case}.logits_argmax"][real])
    dim = session.cache.k[0].shape[-1]  # head_dim
    alphas = OFFICIAL[f"{case}.ntk_alpha"].tolist()
    assert session.rope_base.tolist() == [10000 * a ** (dim / (dim - 2)) for a in alphas] * (len(real) // len(alphas))


@pytest.mark.parametrize("case", [c for c in CASES if f"{c}.step_ids" in OFFICIAL])
def test_cached_decoding_steps_equal_official(checkpoints, case):
    _, logits, step_logits, _ = run_case(case, checkpoints[json.loads(META["case_checkpoint"])[case]])
    steps = OFFICIAL[f"{case}.step_ids"]
    assert torch.equal(logits[:, -1].argmax(-1), steps[:, 0])  # greedy: the official fed its argmax
    for t, step in enumerate(step_logits):
        assert relative_error(step[:, OFFICIAL["cols"]], OFFICIAL[f"{case}.step_logits_cols"][:, t]) < 1e-5
        assert relative_error(step.double().logsumexp(-1), OFFICIAL[f"{case}.step_logits_lse"][:, t]) < 1e-5
        if t < 7:
            assert torch.equal(step.argmax(-1), steps[:, t + 1])


# --- structure ----------------------------------------------------------------------------------------------------

def test_module_names_map_to_official(tiny_ckpt, decoder):
    official = split_state(official_tensors(QwenAudioConfig.from_json(tiny_ckpt)))["decoder"]
    assert {n: tuple(t.shape) for n, t in decoder.state_dict().items()} == official


@pytest.mark.parametrize("length, alpha", [(1, 1), (2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15)])
def test_ntk_alpha_values(length, alpha):
    assert ntk_alpha(length, 2048) == alpha  # docs/MODEL.md#dynamic-ntk


# --- transformers' Qwen2 ------------------------------------------------------------------------------------------

def qwen2_reference(tiny_ckpt):
    """Qwen2ForCausalLM with our weights (`qwen2_decoder_weights`: q/k/v split out of c_attn, up = w1,
    gate = w2, down = c_proj)."""
    transformers = reference("transformers")
    c = QwenAudioConfig.from_json(tiny_ckpt)
    config = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_width,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, rms_norm_eps=c.layer_norm_epsilon, rope_theta=c.rotary_emb_base,
        max_position_embeddings=c.seq_length, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.load_state_dict(qwen2_decoder_weights(load_decoder(tiny_ckpt, dtype=torch.float32).state_dict()), strict=True)
    return model


def test_equals_transformers_qwen2(tiny_ckpt, decoder, tokenizer):
    reference = qwen2_reference(tiny_ckpt)
    ids = torch.tensor([text_ids(tokenizer, 48)])
    blocks = []
    hooks = [b.register_forward_hook(lambda m, a, out: blocks.append(out)) for b in decoder.h]
    with torch.no_grad():
        ours = decoder.logits(ids)
        theirs = reference(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    for i, block in enumerate(blocks[:-1]):  # Qwen2's last hidden state is after the final norm
        assert relative_error(block, theirs.hidden_states[i + 1]) < 1e-5
    assert relative_error(ours, theirs.logits) < 1e-5


# --- float64 reference for NTK, logn and frozen alpha ---------------------------------------------------------------

def reference_logits(ckpt, ids: torch.Tensor, mask: torch.Tensor, prefill: int,
                     training: bool = False) -> torch.Tensor:
    """The formulas of docs/MODEL.md#decoder in float64, one full pass: alpha of each row from its real tokens among
    the first `prefill` slots (per row only when prefill > seq_length), positions = slots, logn on queries past
    seq_length; `training`: the official train() mode, with neither NTK nor logn."""
    c = QwenAudioConfig.from_json(ckpt)
    w = {k: v.double() for k, v in load_checkpoint(ckpt, c).items() if not k.startswith("transformer.audio.")}
    b, k_len = ids.shape
    heads, dh, seq = c.num_attention_heads, c.kv_channels, c.seq_length

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.layer_norm_epsilon) * weight

    lengths = mask[:, :prefill].sum(-1) if prefill > seq and not training else torch.full((b,), min(prefill, seq))
    alphas = [max(2 ** math.ceil(math.log2(int(n) / seq) + 1) - 1, 1) for n in lengths]
    inv_freq = torch.stack([(c.rotary_emb_base * a ** (dh / (dh - 2))) ** (-torch.arange(0, dh, 2).double() / dh)
                            for a in alphas])  # [B, dh/2]
    pos = torch.arange(k_len).double()
    angle = pos[None, :, None] * inv_freq[:, None, :]  # [B, K, dh/2]
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, :, None], torch.cat([angle.sin()] * 2, -1)[:, :, None]
    rotate = lambda t: t * cos + torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1) * sin  # noqa: E731
    logn = torch.where(pos + 1 > seq, torch.log(pos + 1) / math.log(seq), torch.ones_like(pos))[None, :, None, None]
    logn = torch.ones_like(logn) if training else logn
    allowed = (torch.arange(k_len)[None, :] <= torch.arange(k_len)[:, None])[None] & mask.bool()[:, None, :]
    x = w["transformer.wte.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"transformer.h.{i}."
        qkv = rms(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(b, k_len, heads, dh) for t in qkv.chunk(3, -1))
        q, k = rotate(q) * logn, rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).nan_to_num(0.0), v).reshape(b, k_len, -1)
        x = x + y @ w[p + "attn.c_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        x = x + ((h @ w[p + "mlp.w1.weight"].T) * F.silu(h @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def masked_relative_error(ours, ref, mask):
    keep = mask.bool()
    return relative_error(ours[keep], ref[keep])


def test_ntk_and_logn_on_prefill(short_ckpt, tokenizer):
    """40 tokens with seq_length 16: alpha 7 and logn on every query from position 16 on."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32)
    ids = torch.tensor([text_ids(tokenizer, 40)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert relative_error(decoder.logits(ids), reference_logits(short_ckpt, ids, mask, prefill=40)) < 1e-5


def test_training_mode_turns_ntk_and_logn_off(short_ckpt, tokenizer):
    """The official model in train(): no dynamic NTK and no logn, whatever the length (the fine-tuning forward)."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32).train()
    ids = torch.tensor([text_ids(tokenizer, 40)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = decoder.logits(ids)
    assert relative_error(ours, reference_logits(short_ckpt, ids, mask, prefill=40, training=True)) < 1e-5
    assert relative_error(ours, reference_logits(short_ckpt, ids, mask, prefill=40)) > 1e-3


def test_alpha_is_frozen_while_decoding_past_seq_length(short_ckpt, tokenizer):
    """Prefill 12 tokens (alpha 1), decode to 28: alpha stays 1 while logn switches on at position 16."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32)
    ids = torch.tensor([text_ids(tokenizer, 28)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = decode_incrementally(decoder, ids, mask, 12)
        frozen = reference_logits(short_ckpt, ids, mask, prefill=12)[:, 11:]
        assert relative_error(ours, frozen) < 1e-5
        assert relative_error(ours, reference_logits(short_ckpt, ids, mask, prefill=28)[:, 11:]) > 1e-3  # alpha 3


def test_per_row_alpha_under_left_padding(short_ckpt, tokenizer):
    """Rows of 40 and 20 real tokens padded to 40: alpha 7 and 3, then 6 frozen decoding steps."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32)
    full = [text_ids(tokenizer, 46, seed=1), text_ids(tokenizer, 26, seed=2)]
    ids, mask = left_pad(full)
    session = Session(KVCache(decoder.config, 2, ids.shape[1], torch.float32))
    with torch.no_grad():
        ours = decode_incrementally(decoder, ids, mask, 40, session=session)
    assert session.rope_base.tolist() == [10000 * a ** (16 / 14) for a in (7, 3)]
    reference = reference_logits(short_ckpt, ids, mask, prefill=40)[:, 39:]
    assert masked_relative_error(ours, reference, mask[:, 39:]) < 1e-5


# --- the KV cache ---------------------------------------------------------------------------------------------------

def test_last_only_gives_the_last_row(decoder, tokenizer):
    ids = torch.tensor([text_ids(tokenizer, 12)])
    with torch.no_grad():
        last = decoder.logits(ids, last_only=True)
        assert relative_error(last, decoder.logits(ids)[:, -1:]) < 1e-6  # matmul rounding only


def test_cache_equals_full_sequence_batch_1(decoder, tokenizer):
    ids = torch.tensor([text_ids(tokenizer, 30)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = decoder.logits(ids)
        assert relative_error(decode_incrementally(decoder, ids, mask, 20), full[:, 19:]) < 1e-5


def test_cache_equals_full_sequence_batch_3_left_padded(tiny_ckpt, tokenizer):
    decoder = load_decoder(tiny_ckpt, dtype=torch.float32)
    ids, mask = left_pad([text_ids(tokenizer, 30, seed=s) for s in (3, 4, 5)][:1] +
                         [text_ids(tokenizer, 22, seed=6), text_ids(tokenizer, 9, seed=7)])
    with torch.no_grad():
        full = decoder.logits(ids, mask)
        ours = decode_incrementally(decoder, ids, mask, ids.shape[1] - 6)
    assert masked_relative_error(ours, full[:, -7:], mask[:, -7:]) < 1e-5


def test_chat_prefix_reused_across_turns(tiny_ckpt, tokenizer):
    """Turn 2 extends the cache of turn 1 (prompt + reply); the logits equal re-running the whole conversation,
    which is what the official chat does."""
    decoder = load_decoder(tiny_ckpt, dtype=torch.float32)
    turn1 = tokenizer.encode("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    reply = tokenizer.encode("hi, how can I help?<|im_end|>")
    turn2 = tokenizer.encode("\n<|im_start|>user\nsay it again<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([turn1 + reply + turn2])
    a, b = len(turn1), len(turn1) + len(reply)
    with torch.no_grad():
        full = decoder.logits(ids)
        session = Session(KVCache(decoder.config, 1, 64, torch.float32))
        logits = [prefill(decoder, session, ids[:, :a])]
        for p in range(a, b):
            session.ids = ids[:, : p + 1]  # as generation records what it feeds
            logits.append(decode_one_token(decoder, session.cache, ids[:, p : p + 1], torch.tensor([p]),
                                           session.rope_base))
        assert extends(decoder, session, ids)
        logits.append(prefill(decoder, session, ids, start=b))
    expected = full[:, [*range(a - 1, b), ids.shape[1] - 1]]
    assert relative_error(torch.stack(logits, dim=1), expected) < 1e-5


def test_prefix_reuse_refused_when_alpha_would_change(short_ckpt, tokenizer):
    decoder = load_decoder(short_ckpt, dtype=torch.float32)
    ids = torch.tensor([text_ids(tokenizer, 30)])
    session = Session(KVCache(decoder.config, 1, 32, torch.float32))
    with torch.no_grad():
        prefill(decoder, session, ids[:, :10])
        assert extends(decoder, session, ids[:, :16]) and not extends(decoder, session, ids)  # 30 > seq_length 16
        with pytest.raises(InputError, match="would change the NTK rotary base .*prefill the whole sequence"):
            prefill(decoder, session, ids, start=10)


@pytest.mark.parametrize("true_positions", [False, True])
def test_decoding_on_a_reused_cache_equals_the_full_forward(short_ckpt, tokenizer, true_positions):
    """`decode_one_token`, the check-free step generation runs, on a cache whose later slots still hold a longer
    earlier run: left-padded rows with their own NTK alpha (7 and 3) and logn past seq_length."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32, true_positions=true_positions)
    ids, mask = left_pad([text_ids(tokenizer, 46, seed=1), text_ids(tokenizer, 26, seed=2)])
    session = Session(KVCache(decoder.config, 2, ids.shape[1] + 4, torch.float32))
    with torch.no_grad():
        decode_incrementally(decoder, ids, mask, 42, session=session)  # leaves slots 0..45 filled
        ours = decode_incrementally(decoder, ids[:, :44], mask[:, :44], 40, session=session)
        reference = decoder.logits(ids[:, :44], mask[:, :44])[:, 39:]
    assert masked_relative_error(ours, reference, mask[:, 39:44]) < 1e-6


def test_per_row_slots_equal_shared_ones_when_the_rows_agree(decoder, tokenizer):
    """Slots [B, S] (each row its own) give what slots [S] give when every row has the same ones: the mask, the
    positions and a decoding step's logits and cache writes."""
    ids, mask = left_pad([text_ids(tokenizer, 12, seed=1), text_ids(tokenizer, 7, seed=2)])
    valid = torch.cat([mask.bool(), torch.zeros(2, 4, dtype=torch.bool)], 1)
    for true_positions in (False, True):
        shared = positions_and_mask(valid, torch.tensor([10, 11]), true_positions)
        per_row = positions_and_mask(valid, torch.tensor([[10, 11], [10, 11]]), true_positions)
        assert all(torch.equal(a, b) for a, b in zip(shared, per_row))
    caches = [Session(KVCache(decoder.config, 2, 16, torch.float32)) for _ in range(2)]
    with torch.no_grad():
        for session in caches:
            prefill(decoder, session, ids, mask)
        one = decode_one_token(decoder, caches[0].cache, ids[:, :1], torch.tensor([12]), caches[0].rope_base)
        two = decode_one_token(decoder, caches[1].cache, ids[:, :1], torch.tensor([[12], [12]]), caches[1].rope_base)
    assert torch.equal(one, two) and torch.equal(caches[0].cache.valid, caches[1].cache.valid)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].cache.k + caches[0].cache.v,
                                                 caches[1].cache.k + caches[1].cache.v))


@pytest.mark.parametrize("true_positions", [False, True])
def test_rows_prefilled_alone_decode_together_at_their_own_slots(short_ckpt, tokenizer, true_positions):
    """A serving batch: prompts of 46, 26 and 9 tokens prefilled one at a time into the rows of one cache
    (`KVCache.rows`: views, so the writes land in the batch's cache) over slots an earlier, longer occupant left
    filled, then decoded together, each row at its own slot (`slot` [B, 1]) with its own NTK base (alpha 7, 3, 1)
    and logn past seq_length: each row's logits are its prompt's full forward alone."""
    decoder = load_decoder(short_ckpt, dtype=torch.float32, true_positions=true_positions)
    prompts = [torch.tensor([text_ids(tokenizer, n, seed=n)]) for n in (46, 26, 9)]
    cache = KVCache(decoder.config, 3, 50, torch.float32)
    steps, logits, bases = 4, [], []
    with torch.no_grad():
        prefill(decoder, Session(cache), torch.tensor([text_ids(tokenizer, 48, seed=0)] * 3))  # the earlier occupant
        for r, ids in enumerate(prompts):
            session = Session(cache.rows(slice(r, r + 1)))
            session.cache.valid.zero_()  # as the engine frees a row
            logits.append([prefill(decoder, session, ids[:, :-steps])[0]])
            bases.append(session.rope_base)
        for t in range(steps):
            slots = torch.tensor([[ids.shape[1] - steps + t] for ids in prompts])
            fed = torch.stack([ids[0, slots[r, 0]] for r, ids in enumerate(prompts)])[:, None]
            for r, row in enumerate(decode_one_token(decoder, cache, fed, slots, torch.cat(bases))):
                logits[r].append(row)
        for ids, ours in zip(prompts, logits):
            reference = decoder.logits(ids)[0, -steps - 1 :]
            assert relative_error(torch.stack(ours), reference) < 1e-5
    assert [len(set(b.tolist())) for b in bases] == [1, 1, 1] and len(set(torch.cat(bases).tolist())) == 3


def test_a_cache_view_refuses_rows_that_would_copy(decoder):
    cache = KVCache(decoder.config, 3, 8, torch.float32)
    view = cache.rows(slice(1, 3))
    view.k[0].fill_(1.0)
    view.valid[:, 2] = True
    assert cache.k[0][1:].eq(1).all() and cache.k[0][0].eq(0).all() and cache.valid[1:, 2].all()
    with pytest.raises(InputError, match=r"KVCache.rows takes a slice of consecutive rows .*got \[0, 2\]"):
        cache.rows([0, 2])


@pytest.mark.slow
def test_compiled_decoding_equals_eager(tiny_ckpt, tokenizer):
    """torch.compile(fullgraph=True) captures the whole step (a graph break would raise) and changes no numbers
    beyond fused-kernel rounding."""
    decoder = load_decoder(tiny_ckpt, dtype=torch.float32)
    ids, mask = left_pad([text_ids(tokenizer, 20, seed=3), text_ids(tokenizer, 14, seed=4)])
    with torch.no_grad():
        eager = decode_incrementally(decoder, ids, mask, 16)
        step = generate.compile_decoding()  # only returned: generation runs it where it is passed as step=
        compiled = decode_incrementally(decoder, ids, mask, 16, step=step)
    assert masked_relative_error(compiled, eager, mask[:, 15:]) < 1e-5


# --- positions under padding ------------------------------------------------------------------------------------

def test_true_positions_make_padding_invisible(short_ckpt, tokenizer):
    """A 12-token prompt left-padded to 20 slots (seq_length 16). Rotary scores depend only on position
    differences, so the official shift matters through logn alone: slots 16..19 get scaled queries that the
    unpadded prompt never has. With true_positions the padded row's logits equal the unpadded prompt's."""
    prompt, other = text_ids(tokenizer, 12, seed=8), text_ids(tokenizer, 20, seed=9)
    ids, mask = left_pad([prompt, other])
    with torch.no_grad():
        for true_positions, matches in ((False, False), (True, True)):
            decoder = load_decoder(short_ckpt, dtype=torch.float32, true_positions=true_positions)
            alone = decoder.logits(torch.tensor([prompt]))[0]
            padded = decoder.logits(ids, mask)[0, -len(prompt):]
            assert (relative_error(padded, alone) < 1e-5) == matches
            ours = decode_incrementally(decoder, ids, mask, ids.shape[1] - 3)  # the cache agrees too
            assert masked_relative_error(ours, decoder.logits(ids, mask)[:, -4:], mask[:, -4:]) < 1e-5


def test_true_positions_is_the_configs_choice_and_never_written(tiny_ckpt):
    """The rule lives in `config.true_positions`, as use_dynamic_ntk and use_logn_attn do: the loaders and `Decoder`
    set it, no module keeps a copy, and config.json (`to_dict`, which `quantize` writes) never holds it."""
    official = QwenAudioConfig.from_json(tiny_ckpt)
    decoder = load_decoder(tiny_ckpt, dtype=torch.float32, true_positions=True)
    model = qwenaudio.load(tiny_ckpt, dtype=torch.float32, true_positions=True, progress=False)
    assert decoder.config.true_positions and model.config.true_positions and model.decoder.config is model.config
    assert not official.true_positions and not hasattr(decoder, "true_positions")
    with torch.device("meta"):
        assert Decoder(official, true_positions=True).config.true_positions
        assert Decoder(decoder.config).config.true_positions  # None keeps the config's
        assert not Decoder(decoder.config, true_positions=False).config.true_positions
    assert decoder.config.to_dict() == official.to_dict() and "true_positions" not in official.to_dict()
    raw = {**official.to_dict(), "true_positions": True}  # a config.json that holds it: kept as an unknown key
    assert not QwenAudioConfig.from_dict(raw).true_positions and QwenAudioConfig.from_dict(raw).to_dict() == raw


# --- dtypes -------------------------------------------------------------------------------------------------------

# Measured relative logit error against fp32: bf16 8.3e-3, fp16 1.1e-3.
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2.5e-2), (torch.float16, 3.5e-3)])
def test_reduced_precision_stays_near_fp32(tiny_ckpt, decoder, tokenizer, dtype, tolerance):
    ids = torch.tensor([text_ids(tokenizer, 24)])
    low = load_decoder(tiny_ckpt, dtype=dtype)
    with torch.no_grad():
        out = low.logits(ids)
        assert out.dtype == dtype and relative_error(out, decoder.logits(ids)) < tolerance


# --- bad input ----------------------------------------------------------------------------------------------------

def test_token_id_out_of_range(decoder):
    for bad in (155947, -1):
        with pytest.raises(InputError, match=rf"token id {bad} at \[0, 1\] is outside the vocabulary \(0..155946\)"):
            decoder.logits(torch.tensor([[9707, bad, 0]]))


def test_audio_regions_must_match_clips(tiny_ckpt, decoder, tokenizer):
    encoder = load_encoder(tiny_ckpt, dtype=torch.float32)
    clip = torch.randn(8000) * 0.1
    from qwenaudio.core.audio import log_mel_spectrogram

    with torch.no_grad():
        span = encoder.encode(log_mel_spectrogram(clip)[None], [8000])[0]
    one = torch.tensor([tokenizer.encode("<audio>a.wav</audio>hi", audio_spans=[14])])
    two = torch.tensor([tokenizer.encode("<audio>a</audio>x<audio>b</audio>", audio_spans=[14, 14])])
    with torch.no_grad():
        assert decoder.logits(one, audio=[span]).shape == (1, 15, 155947)  # 14-token span + "hi"
        with pytest.raises(InputError, match=r"hold 1 <audio>…</audio> region\(s\) but 2 encoded clip\(s\)"):
            decoder.logits(one, audio=[span, span])
        with pytest.raises(InputError, match=r"hold 2 <audio>…</audio> region\(s\) but 1 encoded clip\(s\)"):
            decoder.logits(two, audio=[span])
        with pytest.raises(InputError, match=r"hold 1 <audio>…</audio> region\(s\) but 0 encoded clip\(s\)"):
            decoder.logits(one)
        with pytest.raises(InputError, match=r"region 0 \(row 0, columns 0..13\) holds 14 tokens but clip 0's encoding "
                                             r"has shape \(13, 64\)"):
            decoder.logits(one, audio=[span[:13]])
        with pytest.raises(InputError, match="unbalanced audio tags"):
            decoder.logits(torch.tensor([[155163, 9707, 0]]), audio=[span])


def test_prompt_must_fit_the_cache(tiny_ckpt):
    decoder = load_decoder(tiny_ckpt, dtype=torch.float32)
    session = Session(KVCache(decoder.config, 1, 8, torch.float32))
    with torch.no_grad(), pytest.raises(InputError, match=r"a \[1, 10\] prompt does not fit a KV cache of 1 rows and 8"):
        prefill(decoder, session, torch.zeros(1, 10, dtype=torch.long))
    with torch.no_grad(), pytest.raises(InputError, match=r"a \[2, 3\] prompt does not fit a KV cache of 1 rows"):
        prefill(decoder, session, torch.zeros(2, 3, dtype=torch.long))
    with torch.no_grad(), pytest.raises(InputError, match="start=3: a prefill starts at slot 0 or extends the 0 ids"):
        prefill(decoder, session, torch.zeros(1, 5, dtype=torch.long), start=3)


def test_hidden_states_equal_official(tmp_path):
    """`model(..., output_hidden_states=True)` against the official forward's own `hidden_states` and
    `last_hidden_state` (tests/golden/record_hidden_states.py): three blocks, a left-padded batch with a clip."""
    with safe_open(GOLDEN / "hidden_states_official.safetensors", "pt") as f:
        official = {n: f.get_tensor(n) for n in f.keys()}
    ckpt = make_tiny_checkpoint(tmp_path / "three", seed=0, num_hidden_layers=3)
    model = qwenaudio.load(ckpt, dtype=torch.float32, device="cpu", progress=False)
    clip = CLIPS[0]
    with torch.no_grad():
        out = model(official["input_ids"], official["attention_mask"], audio=[clip], output_hidden_states=True)
    real = official["attention_mask"].bool()
    assert len(out.hidden_states) == 4
    for i, hidden in enumerate(out.hidden_states):
        assert relative_error(hidden[real], official[f"hidden_states.{i}"][real]) < 1e-5, i
    assert relative_error(out.last_hidden_state[real], official["last_hidden_state"][real]) < 1e-5
    assert relative_error(out.logits.double().logsumexp(-1)[real], official["logits_lse"][real]) < 1e-5
    with torch.no_grad():
        assert torch.equal(model(official["input_ids"], official["attention_mask"], audio=[clip]), out.logits)

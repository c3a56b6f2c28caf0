"""gdn_lab.generate on the CPU: sampling filters, seeds, padding, the fixed-buffer (captured) step,
also with short convs on the attention layers and with sliding-window attention (a ring buffer)."""
from __future__ import annotations

import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gdn_lab.config import ConfigError, get_preset
from gdn_lab.data import ByteTokenizer
from gdn_lab.generate import (
    CapturedDecoder,
    TextStreamer,
    filter_logits,
    generate,
    pad_prompts,
    prefill,
    sample_next,
)
from gdn_lab.models import build_model

PROMPTS = [[5, 9, 2, 7, 7, 3, 1], [4, 4], [8, 1, 6, 2]]  # lengths 7, 2, 4: left padding of 0, 5, 3
# hybrid: GDN layer 0, attention layer 1; swa: GDN layer 0, a 3-token window in layer 1 (prompts of 2 to 7 tokens)
LAYERS = {"gdn": dict(attn_layers="gdn"), "transformer": dict(attn_layers="transformer"),
          "hybrid": dict(attn_layers=(1,)), "swa": dict(swa_layers=(1,), swa_window=3)}


@pytest.fixture(scope="module")
def models():
    """Tiny 2-layer models (64d, GDN 2 heads x 16, attention 1 head x 64) with 64-token vocabularies."""
    built = {}
    for name, layers in LAYERS.items():
        torch.manual_seed(0)
        config = get_preset("tiny").model.replace(vocab_size=64, backend="torch", **layers)
        built[name] = build_model(config).eval()
    return built


@pytest.fixture(scope="module")
def conv_models():
    """The hybrid and transformer tiny models with `attn_conv_size=3` and random attention conv weights
    (the identity init would hide a conv window carried wrongly)."""
    built = {}
    for name in ("hybrid", "transformer", "swa"):
        torch.manual_seed(0)
        config = get_preset("tiny").model.replace(vocab_size=64, attn_conv_size=3, backend="torch", **LAYERS[name])
        model = build_model(config).eval()
        with torch.no_grad():
            for block in model.model.layers:
                if block.mixer in ("attn", "swa"):
                    for conv in (block.attn.q_conv1d, block.attn.k_conv1d, block.attn.v_conv1d):
                        conv.weight.normal_(0, 0.5)
        built[name] = model
    return built


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).clamp_min(1e-12).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_filter_logits_top_k_and_top_p_on_hand_made_logits():
    logits = probs_to_logits([0.2, 0.5, 0.05, 0.25])        # ranks: 1 (0.5), 3 (0.25), 0 (0.2), 2 (0.05)
    assert kept(filter_logits(logits, top_k=1)) == [1]
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=10)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.4)) == [1]         # 0.5 alone reaches 0.4
    assert kept(filter_logits(logits, top_p=0.6)) == [1, 3]      # 0.5 < 0.6 <= 0.75
    assert kept(filter_logits(logits, top_p=0.9)) == [0, 1, 3]   # 0.75 < 0.9 <= 0.95
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2, 3]
    # top-p after top-k: renormalised over {1, 3}, 0.5 / 0.75 = 0.67 already reaches 0.6
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [1]
    # ties with the k-th value are kept; kept logits are unchanged
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert kept(filter_logits(tied, top_k=1)) == [1, 2]
    torch.testing.assert_close(filter_logits(logits, top_p=0.6)[0, [1, 3]], logits[0, [1, 3]])
    # rows are filtered independently
    rows = torch.cat([probs_to_logits([0.9, 0.05, 0.05]), probs_to_logits([0.4, 0.35, 0.25])])
    assert torch.isfinite(filter_logits(rows, top_p=0.7)).tolist() == [[True, False, False], [True, True, False]]


def test_sample_next_greedy_seeds_and_frequencies():
    logits = probs_to_logits([0.1, 0.6, 0.3]).repeat(4000, 1)
    assert sample_next(logits[:3], temperature=0).tolist() == [1, 1, 1]

    draw = sample_next(logits, generator=torch.Generator().manual_seed(7))
    again = sample_next(logits, generator=torch.Generator().manual_seed(7))
    other = sample_next(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(draw, again) and not torch.equal(draw, other)
    frequencies = torch.bincount(draw, minlength=3).float() / len(draw)
    torch.testing.assert_close(frequencies, torch.tensor([0.1, 0.6, 0.3]), atol=0.03, rtol=0)  # ~4 sigma

    nucleus = sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(7))
    assert set(nucleus.tolist()) == {1}
    top2 = sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(7))
    assert set(top2.tolist()) == {1, 2}
    cold = sample_next(logits, temperature=0.25, generator=torch.Generator().manual_seed(7))
    assert (cold == 1).float().mean() > 0.9   # p ~ 0.6^4 / (0.1^4 + 0.6^4 + 0.3^4) = 0.94


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_settings_raise_one_line_errors(models, kwargs, message):
    call = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ConfigError, match=message):
        generate(models["gdn"], PROMPTS, **call)


def test_pad_prompts_left_pads_and_masks():
    input_ids, mask = pad_prompts([[3, 4, 5], [6]])
    assert input_ids.tolist() == [[3, 4, 5], [0, 0, 6]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert pad_prompts([[1, 2], [3, 4]])[1] is None
    with pytest.raises(ConfigError, match="at least one token"):
        pad_prompts([[1], []])


@pytest.mark.parametrize("name", list(LAYERS))
def test_captured_step_gives_the_plain_tokens(models, name):
    """Fixed buffers (preallocated KV, length and positions as tensors) == the growing cache."""
    model = models[name]
    plain = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    captured = generate(model, PROMPTS, max_new_tokens=10, temperature=0, captured=True)
    assert captured == plain
    assert [len(row) for row in plain] == [10, 10, 10]
    sampled = dict(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.95, seed=3)
    assert generate(model, PROMPTS, captured=True, **sampled) == generate(model, PROMPTS, **sampled)


@pytest.mark.parametrize("name", list(LAYERS))
def test_batched_left_padded_equals_one_by_one(models, name):
    model = models[name]
    batched = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    alone = [generate(model, [prompt], max_new_tokens=8, temperature=0)[0] for prompt in PROMPTS]
    assert batched == alone


@torch.no_grad()
@pytest.mark.parametrize("name", list(LAYERS))
def test_captured_logits_match_plain_logits(models, name):
    """The step on fixed buffers computes the plain step's logits (fp32, same inputs), at every position."""
    model = models[name]
    input_ids, mask = pad_prompts(PROMPTS)
    decoder = CapturedDecoder(model, batch_size=3, max_len=16)
    cache = model.new_cache(3)
    expected = prefill(model, input_ids, cache, mask)
    torch.testing.assert_close(decoder.prefill(input_ids, mask), expected, atol=1e-5, rtol=1e-5)
    for t in range(16 - input_ids.shape[1]):
        tokens = torch.tensor([t, 2 * t, 3 * t]) % 64
        expected = model(tokens[:, None], cache=cache)[:, -1]
        torch.testing.assert_close(decoder.step(tokens), expected, atol=1e-5, rtol=1e-5)
    assert decoder.position == 16
    with pytest.raises(ConfigError, match="max_len"):
        decoder.step(tokens)


@torch.no_grad()
@pytest.mark.parametrize("name", ["hybrid", "transformer", "swa"])
def test_attention_conv_decodes_like_the_full_forward(conv_models, name):
    """With attention short convs, the plain cache and the fixed-buffer step (conv windows carried
    in the KV states) give the logits of one forward over the whole left-padded sequences, and
    generate's tokens agree between the two paths and with each prompt decoded alone."""
    model = conv_models[name]
    input_ids, mask = pad_prompts(PROMPTS)
    decoder = CapturedDecoder(model, batch_size=3, max_len=12)
    cache = model.new_cache(3)
    tokens = torch.randint(0, 64, (3, 12 - input_ids.shape[1]), generator=torch.Generator().manual_seed(4))
    whole_mask = torch.cat([mask, torch.ones_like(tokens, dtype=torch.bool)], 1)
    full = model(torch.cat([input_ids, tokens], 1), attention_mask=whole_mask)[:, input_ids.shape[1] - 1:]
    torch.testing.assert_close(prefill(model, input_ids, cache, mask), full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoder.prefill(input_ids, mask), full[:, 0], atol=1e-5, rtol=1e-5)
    for t in range(tokens.shape[1]):
        torch.testing.assert_close(model(tokens[:, t:t + 1], cache=cache)[:, -1], full[:, t + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoder.step(tokens[:, t]), full[:, t + 1], atol=1e-5, rtol=1e-5)

    plain = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=0, captured=True) == plain
    assert [generate(model, [prompt], max_new_tokens=8, temperature=0)[0] for prompt in PROMPTS] == plain


def test_decoder_is_reusable_and_checks_its_sizes(models):
    model = models["hybrid"]
    decoder = CapturedDecoder(model, batch_size=3, max_len=20)
    first = generate(model, PROMPTS, max_new_tokens=6, temperature=0, captured=decoder)
    second = generate(model, PROMPTS, max_new_tokens=6, temperature=0, captured=decoder)
    assert first == second == generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    with pytest.raises(ConfigError, match="batch_size=3"):
        generate(model, PROMPTS[:2], max_new_tokens=2, captured=decoder)
    with pytest.raises(ConfigError, match="max_len=20"):
        generate(model, PROMPTS, max_new_tokens=14, captured=decoder)
    with pytest.raises(ConfigError, match="another model"):
        generate(models["gdn"], PROMPTS, max_new_tokens=2, captured=decoder)


def test_seeded_sampling_is_reproducible(models):
    model = models["hybrid"]
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = generate(model, PROMPTS, seed=11, **kwargs)
    assert generate(model, PROMPTS, seed=11, **kwargs) == first
    assert generate(model, PROMPTS, seed=12, **kwargs) != first


def test_prefill_in_pieces_matches_one_call(models):
    model = models["hybrid"]
    input_ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :40] = False
    whole = prefill(model, input_ids, model.new_cache(2), mask)
    pieces_cache = model.new_cache(2)
    pieces = prefill(model, input_ids, pieces_cache, mask, max_tokens_per_call=128)   # 64-step pieces
    torch.testing.assert_close(pieces, whole, atol=1e-4, rtol=1e-4)
    assert pieces_cache.seen_tokens == 150


@torch.no_grad()
def test_gdn_decode_cost_does_not_grow_with_context(models):
    """Cache bytes and FLOPs of one decode step after 8 vs 300 context tokens are equal for GDN and
    for the GDN + sliding-window model (its ring holds 3 tokens); the transformer's KV cache grows."""

    def after_context(model, context: int):
        cache = model.new_cache(1)
        prefill(model, torch.randint(0, 64, (1, context), generator=torch.Generator().manual_seed(1)), cache)
        with FlopCounterMode(display=False) as counter:
            model(torch.tensor([[3]]), cache=cache)
        cache_bytes = sum(t.numel() * t.element_size() for s in cache.states for t in vars(s).values()
                          if isinstance(t, torch.Tensor))
        return cache_bytes, counter.get_total_flops()

    gdn_short, gdn_long = after_context(models["gdn"], 8), after_context(models["gdn"], 300)
    assert gdn_short == gdn_long and gdn_short[1] > 0
    assert after_context(models["swa"], 8) == after_context(models["swa"], 300)
    attn_short, attn_long = after_context(models["transformer"], 8), after_context(models["transformer"], 300)
    assert attn_long[0] > 10 * attn_short[0]


def test_eos_stops_each_sequence(models):
    model = models["gdn"]
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    eos = free[0][2]                                    # the third token of the first sequence
    stopped = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos)
    for row_free, row_stopped in zip(free, stopped, strict=True):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped == row_free[:cut]


def test_stream_callback_and_text_streamer(models):
    model = models["gdn"]
    seen = []
    tokens = generate(model, PROMPTS, max_new_tokens=5, temperature=0, stream=lambda step, ids: seen.append(ids))
    assert [list(step) for step in zip(*seen, strict=True)] == tokens

    out = io.StringIO()
    streamer = TextStreamer(ByteTokenizer(), prompt="> ", file=out)
    chunks = []
    for step, byte in enumerate("aé€".encode()):      # 1 + 2 + 3 bytes
        streamer(step, [byte])
        chunks.append(out.getvalue())
    assert chunks == ["> a", "> a", "> aé", "> aé", "> aé", "> aé€"]   # no half characters printed
    streamer.end()
    assert out.getvalue() == "> aé€\n" and streamer.text == "aé€"

"""Long-context probes: haystack construction, passkey scoring, loss by position, the length scan."""
from __future__ import annotations

import math
import re

import pytest
import torch

from gdn_lab import longctx
from gdn_lab.config import ConfigError, ModelConfig
from gdn_lab.data import ByteTokenizer, train_bpe

BYTES = ByteTokenizer()


def count_subsequence(ids: list[int], pattern: list[int]) -> int:
    return sum(ids[i: i + len(pattern)] == pattern for i in range(len(ids) - len(pattern) + 1))


def longest_sentence(tokenizer, haystack: str) -> int:
    sentences = longctx.NOISE_SENTENCES if haystack == "noise" else longctx._text_sentences("pydoc")
    return max(len(tokenizer.encode(" " + s)) for s in sentences)


def needle_ids(key: str, passkey: str, tokenizer=BYTES) -> list[int]:
    return tokenizer.encode(" " + longctx.NEEDLE.format(key=key, passkey=passkey))


@pytest.mark.parametrize("haystack", longctx.HAYSTACKS)
@pytest.mark.parametrize("context_len", [150, 333, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_haystack_exact_length_needles_once_at_depth(haystack, context_len, depth):
    ex = longctx.make_haystack(BYTES, context_len, depth, haystack=haystack, seed=7)
    ids = ex.input_ids.tolist()
    text = BYTES.decode(ids)
    needle = needle_ids(ex.key, ex.passkey)
    assert len(ids) == context_len
    assert count_subsequence(ids, needle) == 1
    assert text.count(ex.passkey) == 1
    start, end = ex.needle_span
    assert ids[start:end] == needle
    # the needle's haystack offset is a sentence boundary within half a sentence of the asked depth
    assert abs(ex.depth - depth) * ex.haystack_len <= longest_sentence(BYTES, haystack) / 2
    assert start == 0 or text[:start].rstrip()[-1] in ".!?" or ex.depth == 1.0
    (d_start, d_end), = ex.distractor_spans
    assert ids[d_start:d_end] == needle_ids(ex.distractor_keys[0], ex.distractor_passkeys[0])
    assert d_end <= start or end <= d_start  # the needles do not overlap
    assert text.endswith(" " + longctx.QUESTION.format(key=ex.key) + " ")
    assert BYTES.decode(ex.answer_ids.tolist()) == ex.passkey


def test_haystack_depth_orders_the_needle():
    examples = [longctx.make_haystack(BYTES, 2048, d, seed=1) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    offsets = [ex.depth * ex.haystack_len for ex in examples]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert examples[-1].depth == 1.0  # depth 1: right before the question
    question = BYTES.encode(" " + longctx.QUESTION.format(key=examples[-1].key) + " ")
    assert examples[-1].needle_span[1] == 2048 - len(question)


def test_question_names_the_needles_key_and_the_distractor_differs():
    for seed in range(40):
        ex = longctx.make_haystack(BYTES, 400, 0.3, haystack="text", seed=seed)
        text = BYTES.decode(ex.input_ids.tolist())
        asked = re.search(r"What is the pass key for (\w+)\?", text).group(1)
        assert asked == ex.key
        start, end = ex.needle_span
        assert BYTES.decode(ex.input_ids[start:end].tolist()) == " " + longctx.NEEDLE.format(key=asked,
                                                                                           passkey=ex.passkey)
        assert ex.key not in ex.distractor_keys and ex.passkey not in ex.distractor_passkeys
        # every "pass key for K is N" in the prompt: the asked pair once, the distractor once, nothing else
        pairs = re.findall(r"pass key for (\w+) is (\d+)\.", text)
        assert sorted(pairs) == sorted([(ex.key, ex.passkey), *zip(ex.distractor_keys, ex.distractor_passkeys)])
    more = longctx.make_haystack(BYTES, 600, 0.5, seed=3, distractors=3)
    assert len(set(more.distractor_keys) | {more.key}) == 4
    assert len(set(more.distractor_passkeys) | {more.passkey}) == 4


@pytest.mark.parametrize("haystack", longctx.HAYSTACKS)
def test_haystack_starts_at_a_random_offset(haystack):
    examples = [longctx.make_haystack(BYTES, 300, 1.0, haystack=haystack, seed=seed) for seed in range(30)]
    starts = {ex.haystack_start for ex in examples}
    assert len({sentence for sentence, _ in starts}) > (3 if haystack == "noise" else 20)
    assert any(cut > 0 for _, cut in starts)  # some begin mid-sentence
    assert len({ex.input_ids[:20].tolist().__repr__() for ex in examples}) > 10  # the first tokens differ


@pytest.mark.parametrize("haystack", longctx.HAYSTACKS)
def test_haystack_exact_length_with_bpe(tmp_path, haystack):
    from gdn_lab.data import embedded_corpus

    bpe = train_bpe(embedded_corpus("pydoc", max_chars=60_000), 400, cache_dir=tmp_path)
    assert len(longctx.make_haystack(bpe, longctx.shortest_prompt(bpe), 0.5, seed=2).input_ids) > 0
    for context_len in (150, 700):
        ex = longctx.make_haystack(bpe, context_len, 0.4, haystack=haystack, seed=3)
        assert len(ex.input_ids) == context_len
        full = bpe.decode(ex.input_ids.tolist() + ex.answer_ids.tolist())
        assert full.count(f"pass key for {ex.key} is {ex.passkey}") == 2  # the needle, then the answer
        assert bpe.decode(ex.answer_ids.tolist()).strip() == ex.passkey
        assert bpe.decode(ex.input_ids[slice(*ex.needle_span)].tolist()).strip() == \
            longctx.NEEDLE.format(key=ex.key, passkey=ex.passkey)


def test_haystack_is_seeded_and_samples_share_keys_numbers_and_start():
    a = longctx.make_haystack(BYTES, 300, 0.5, haystack="text", seed=11)
    b = longctx.make_haystack(BYTES, 300, 0.5, haystack="text", seed=11)
    assert torch.equal(a.input_ids, b.input_ids)
    short = longctx.passkey_examples(BYTES, 200, 0.1, num_samples=4, seed=5)
    long = longctx.passkey_examples(BYTES, 800, 0.9, num_samples=4, seed=5)
    for field in ("passkey", "key", "distractor_keys", "distractor_passkeys", "haystack_start"):
        assert [getattr(e, field) for e in short] == [getattr(e, field) for e in long], field
    assert len({e.passkey for e in short}) == 4


def test_haystack_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="use context_len >= "):
        longctx.make_haystack(BYTES, 100, 0.5)
    with pytest.raises(ConfigError, match="depth"):
        longctx.make_haystack(BYTES, 300, 1.5)
    with pytest.raises(ConfigError, match="haystack"):
        longctx.make_haystack(BYTES, 300, 0.5, haystack="essays")
    with pytest.raises(ConfigError, match="distractors"):
        longctx.make_haystack(BYTES, 300, 0.5, distractors=-1)


def _asked_number(text: bytes) -> bytes:
    key = re.findall(rb"What is the pass key for (\w+)\?", text)[-1]
    return re.search(rb"The pass key for " + key + rb" is (\d+)\.", text).group(1)


class RetrievalOracle(torch.nn.Module):
    """Reads the question's key, finds that key's needle and predicts its digits after the question (bytes)."""

    def forward(self, inputs):
        B, T = inputs.shape
        logits = torch.zeros(B, T, 256)
        for b, row in enumerate(inputs.tolist()):
            text = bytes(row)
            digits = _asked_number(text)
            question_end = [m.end() for m in re.finditer(rb"\? The pass key for \w+ is ", text)][-1]
            for j, digit in enumerate(digits):  # position question_end - 1 predicts the first digit
                if question_end - 1 + j < T:
                    logits[b, question_end - 1 + j, digit] = 1.0
        return logits


class LastNumber(RetrievalOracle):
    """Answers with the number of the needle nearest the question, whatever its key: the shortcut the
    distractor is there to defeat."""

    def forward(self, inputs):
        B, T = inputs.shape
        logits = torch.zeros(B, T, 256)
        for b, row in enumerate(inputs.tolist()):
            text = bytes(row)
            digits = re.findall(rb"The pass key for \w+ is (\d+)\.", text)[-1]
            question_end = [m.end() for m in re.finditer(rb"\? The pass key for \w+ is ", text)][-1]
            for j, digit in enumerate(digits):
                if question_end - 1 + j < T:
                    logits[b, question_end - 1 + j, digit] = 1.0
        return logits


class AlwaysZero(torch.nn.Module):
    def forward(self, inputs):
        logits = torch.zeros(*inputs.shape, 256)
        logits[..., ord("0")] = 1.0
        return logits


@pytest.mark.parametrize("haystack", longctx.HAYSTACKS)
def test_passkey_accuracy_of_fake_models(haystack):
    lengths, depths = [150, 400], [0.0, 0.5, 1.0]
    records = longctx.passkey_accuracy(RetrievalOracle(), BYTES, lengths, depths, num_samples=5, seed=2,
                                       haystack=haystack, batch_size=2)
    assert [(r["context_len"], r["depth"]) for r in records] == [(n, d) for n in lengths for d in depths]
    assert all(r["accuracy"] == 1.0 and r["digit_accuracy"] == 1.0 for r in records)

    records = longctx.passkey_accuracy(AlwaysZero(), BYTES, lengths, depths, num_samples=5, seed=2,
                                       haystack=haystack, batch_size=3)
    passkeys = [e.passkey for e in longctx.passkey_examples(BYTES, 150, 0.0, 5, seed=2, haystack=haystack)]
    zeros = sum(p.count("0") for p in passkeys) / sum(len(p) for p in passkeys)
    assert zeros > 0  # seed 2 draws passkeys with zeros in them, so the value below is informative
    for r in records:
        assert r["accuracy"] == 0.0  # passkeys never start with 0
        assert r["digit_accuracy"] == pytest.approx(zeros, abs=1e-12)


def test_the_distractor_defeats_copying_the_nearest_number():
    examples = [ex for depth in (0.0, 0.5, 1.0) for ex in longctx.passkey_examples(BYTES, 400, depth, 20, seed=9)]
    scores = longctx.score_passkey(LastNumber(), examples, batch_size=10)
    after = sum(ex.needle_span[0] > ex.distractor_spans[0][0] for ex in examples) / len(examples)
    assert scores["accuracy"] == pytest.approx(after)  # right exactly when the needle comes last
    assert 0.2 < scores["accuracy"] < 0.9
    assert scores["distractor_rate"] == pytest.approx(1 - after)  # the distractor's number otherwise
    oracle = longctx.score_passkey(RetrievalOracle(), examples, batch_size=10)
    assert (oracle["accuracy"], oracle["distractor_rate"]) == (1.0, 0.0)
    assert longctx.score_passkey(AlwaysZero(), examples, batch_size=7)["distractor_rate"] == 0.0
    lone = longctx.passkey_examples(BYTES, 300, 0.5, 4, seed=1, distractors=0)
    assert longctx.score_passkey(LastNumber(), lone, batch_size=3) == {"accuracy": 1.0, "digit_accuracy": 1.0,
                                                                      "distractor_rate": 0.0}


def test_passkey_grid_is_depth_by_length():
    records = [{"context_len": n, "depth": d, "accuracy": n + d} for n in (256, 128) for d in (0.5, 0.0)]
    lengths, depths, grid = longctx.passkey_grid(records)
    assert lengths == [128, 256] and depths == [0.0, 0.5]
    assert grid == [[128.0, 256.0], [128.5, 256.5]]
    assert math.isnan(longctx.passkey_grid(records[1:])[2][1][1])  # (256, 0.5) is missing


def test_average_cells_and_accuracy_by_length():
    def table(value):
        return [{"context_len": n, "depth": d, "accuracy": value * d, "digit_accuracy": value}
                for n in (100, 200) for d in (0.0, 1.0)]

    cells = longctx.average_cells([table(1.0), table(0.5)])
    assert [(c["context_len"], c["depth"]) for c in cells] == [(100, 0.0), (100, 1.0), (200, 0.0), (200, 1.0)]
    assert [c["accuracy"] for c in cells] == [0.0, 0.75, 0.0, 0.75] and all(c["runs"] == 2 for c in cells)
    assert longctx.accuracy_by_length(cells) == {100: 0.375, 200: 0.375}
    assert longctx.accuracy_by_length(cells, "digit_accuracy") == {100: 0.75, 200: 0.75}


def test_render_example_marks_both_needles():
    ex = longctx.make_haystack(BYTES, 300, 0.5, seed=4)
    text = longctx.render_example(BYTES, ex)
    assert f">> {longctx.NEEDLE.format(key=ex.key, passkey=ex.passkey)} >>" in text
    assert f"!! {longctx.NEEDLE.format(key=ex.distractor_keys[0], passkey=ex.distractor_passkeys[0])} !!" in text
    assert text.endswith("|" + ex.passkey)


def test_passkey_prompt_lengths_span_the_asked_range():
    shortest = longctx.shortest_prompt(BYTES)
    data = longctx.PasskeyData(BYTES, seq_len=200, seed=4, min_context_len=shortest)
    lengths = {len(data._row("train", 0, i).input_ids) for i in range(300)}
    assert min(lengths) == shortest and max(lengths) == 200 + 1 - 5
    for seed in range(20):  # the shortest prompt fits needles and question for any keys
        longctx.make_haystack(BYTES, shortest, 0.5, "99999", seed=seed)
    assert longctx.PasskeyData(BYTES, seq_len=400).min_context_len == 200
    assert longctx.PasskeyData(BYTES, seq_len=200).min_context_len == shortest  # half of 200 is too short
    with pytest.raises(ConfigError, match="min_context_len=20"):
        longctx.PasskeyData(BYTES, seq_len=200, min_context_len=20)
    with pytest.raises(ConfigError, match="use seq_len >="):
        longctx.PasskeyData(BYTES, seq_len=64)
    with pytest.raises(ConfigError, match="haystack"):
        longctx.PasskeyData(BYTES, seq_len=200, haystack="essays")


def test_passkey_data_batches():
    data = longctx.PasskeyData(BYTES, seq_len=200, seed=4)
    batch = data.train_batch(step=3, batch_size=4)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (4, 200)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    lengths = []
    for row in range(4):
        positions = batch.mask[row].nonzero().flatten()
        # the mask covers exactly the five answer digits, contiguous, right where the prompt ends
        assert len(positions) == 5 and positions.tolist() == list(range(int(positions[0]), int(positions[0]) + 5))
        answer = BYTES.decode(batch.targets[row][batch.mask[row]].tolist())
        assert answer.isdigit() and len(answer) == 5
        prompt = bytes(batch.inputs[row, : int(positions[0]) + 1].tolist())
        assert prompt.endswith(b" is ") and _asked_number(prompt).decode() == answer
        lengths.append(int(positions[0]))
        assert (batch.targets[row, int(positions[0]) + 5:] == 0).all()  # right padding, outside the mask
    assert len(set(lengths)) > 1 and all(data.min_context_len - 1 <= n < 200 for n in lengths)
    again = data.train_batch(step=3, batch_size=4)
    assert torch.equal(batch.inputs, again.inputs)
    two_ranks = [data.train_batch(step=3, batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([b.inputs for b in two_ranks]), batch.inputs)
    assert not torch.equal(data.val_batches(4, 1)[0].inputs, batch.inputs)


def test_passkey_data_replace_changes_the_stream_and_keeps_the_rest():
    data = longctx.PasskeyData(BYTES, seq_len=200, seed=4, haystack="text", min_context_len=150)
    same, other = data.replace(), data.replace(seed=5)
    assert torch.equal(same.train_batch(0, 4).inputs, data.train_batch(0, 4).inputs)
    assert other.seed == 5 and other.describe() == {**data.describe(), "seed": 5}
    assert not torch.equal(other.train_batch(0, 4).inputs, data.train_batch(0, 4).inputs)
    assert not torch.equal(other.val_batches(4, 1)[0].inputs, data.val_batches(4, 1)[0].inputs)
    assert other.test_seed != data.test_seed
    assert data.replace(haystack="noise").haystack == "noise" and data.replace(haystack="noise").min_context_len == 150
    assert data.describe()["distractors"] == 1


def test_score_passkey_data_of_fake_models():
    data = longctx.PasskeyData(BYTES, seq_len=200, seed=1, haystack="text")
    score = longctx.score_passkey_data(RetrievalOracle(), data, depths=(0.0, 1.0), num_samples=4, batch_size=4)
    assert score == {"exact_match": 1.0, "digit_accuracy": 1.0, "distractor_rate": 0.0,
                     "exact_match_by_depth": {"0": 1.0, "1": 1.0}, "test_samples": 8}
    assert longctx.score_passkey_data(AlwaysZero(), data, depths=(0.5,), num_samples=4)["exact_match"] == 0.0
    # at depth 0 the asked needle comes first, so the last number before the question is the distractor's
    last = longctx.score_passkey_data(LastNumber(), data, depths=(0.0,), num_samples=4)
    assert (last["exact_match"], last["distractor_rate"]) == (0.0, 1.0)
    assert longctx.learned(0.9) and not longctx.learned(0.89) and not longctx.learned(None)


class UniformModel(torch.nn.Module):
    def forward(self, inputs):
        return torch.zeros(*inputs.shape, 256)


class ConfidentNext(torch.nn.Module):
    """Puts logit 0.1 * t on token (x_t + 1) % 256: the loss at position t is log(1 + 255 e^(-0.1 t))."""

    def forward(self, inputs):
        B, T = inputs.shape
        logits = torch.zeros(B, T, 256)
        logits.scatter_(2, ((inputs + 1) % 256)[..., None], 0.1 * torch.arange(T, dtype=torch.float)[None, :, None]
                        .expand(B, T, 1))
        return logits


def test_loss_by_position_uniform_is_log_vocab():
    tokens = torch.randint(256, (1000,), generator=torch.Generator().manual_seed(0))
    losses = longctx.loss_by_position(UniformModel(), tokens, seq_len=64, batch_size=4)
    assert losses.shape == (64,)
    torch.testing.assert_close(losses, torch.full((64,), math.log(256)), rtol=0, atol=1e-5)


def test_loss_by_position_keeps_positions_apart():
    tokens = torch.arange(1000) % 256  # the next token is always x + 1
    losses = longctx.loss_by_position(ConfidentNext(), tokens, seq_len=32, batch_size=3, num_windows=7)
    expected = torch.log1p(255 * torch.exp(-0.1 * torch.arange(32, dtype=torch.float64))).float()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    buckets = longctx.bucket_losses(losses)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    assert buckets[3]["loss"] == pytest.approx(float(expected[4:8].mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="shorter seq_len"):
        longctx.loss_by_position(UniformModel(), tokens[:20], seq_len=32)


TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, attn_num_heads=2, backend="torch")


def test_scan_lengths_records_on_cpu():
    configs = {"gdn": ModelConfig(**TINY), "transformer": ModelConfig(**TINY, attn_layers="transformer")}
    records = longctx.scan_lengths(configs, [16, 32], device="cpu", warmup=0, repeats=1)
    assert [(r["model"], r["seq_len"]) for r in records] == [("gdn", 16), ("gdn", 32), ("transformer", 16),
                                                             ("transformer", 32)]
    for r in records:
        assert r["status"] == "ok" and r["batch_size"] == 1
        assert r["forward_ms"] > 0 and r["train_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["train_peak_mib"] is None  # no memory counter on the CPU
    ratios = longctx.scan_ratios(records, "gdn", "transformer")
    assert [r["seq_len"] for r in ratios] == [16, 32]
    assert ratios[0]["train_time"] == pytest.approx(records[0]["train_ms"] / records[2]["train_ms"])
    assert ratios[0]["train_memory"] is None

    forward_only = longctx.scan_lengths({"gdn": configs["gdn"]}, [16, 32], tokens_per_step=64, device="cpu",
                                        backward=False, warmup=0, repeats=1)
    assert [r["batch_size"] for r in forward_only] == [4, 2]
    assert all(r["train_ms"] is None and r["forward_ms"] > 0 for r in forward_only)


def test_scan_lengths_records_out_of_memory(monkeypatch):
    measure = longctx._measure

    def runs_out_at_32(model, vocab_size, seq_len, *args):
        if seq_len >= 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return measure(model, vocab_size, seq_len, *args)

    monkeypatch.setattr(longctx, "_measure", runs_out_at_32)
    records = longctx.scan_lengths({"gdn": ModelConfig(**TINY)}, [16, 32, 64], device="cpu", warmup=0, repeats=1)
    assert [r["status"] for r in records] == ["ok", "oom", "skipped"]
    assert records[1]["train_ms"] is None and records[2]["forward_ms"] is None


def test_state_norm_over_context_matches_the_layers_own_state():
    from gdn_lab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "num_layers": 3}, attn_layers=(1,)))
    ids = torch.randint(64, (1, 50), generator=torch.Generator().manual_seed(1))
    result = longctx.state_norm_over_context(model, ids, num_points=6)
    assert result.layers == (0, 2)
    assert result.positions.tolist() == [0, 10, 20, 29, 39, 49]
    assert result.norms.shape == (2, 2, 6)

    layer_inputs = {}

    def keep_input(module, args, output):
        layer_inputs[module.layer_idx] = args[0]

    blocks = model.model.layers
    hooks = [blocks[i].attn.register_forward_hook(keep_input) for i in (0, 2)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    for row, i in enumerate((0, 2)):
        layer = blocks[i].attn
        for column, t in enumerate(result.positions.tolist()):
            state = layer.empty_state(1)
            with torch.no_grad():
                layer(layer_inputs[i][:, : t + 1], state)  # the real layer, run over the prefix
            expected = state.recurrent[0].norm(dim=(-2, -1))
            torch.testing.assert_close(result.norms[row, :, column], expected, rtol=1e-4, atol=1e-6)

    transformer = build_model(ModelConfig(**TINY, attn_layers="transformer"))
    with pytest.raises(ConfigError, match="no Gated DeltaNet layer"):
        longctx.state_norm_over_context(transformer, ids)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_scan_lengths_measures_cuda_memory():
    configs = {"gdn": ModelConfig(**{**TINY, "backend": "auto"}),
               "transformer": ModelConfig(**TINY, attn_layers="transformer")}
    records = longctx.scan_lengths(configs, [256, 1024], device="cuda", dtype=torch.bfloat16, warmup=1, repeats=2)
    assert all(r["status"] == "ok" for r in records)
    for r in records:
        assert r["train_peak_mib"] > r["weights_mib"] > 0 and r["train_ms"] > 0
    gdn_short, gdn_long = records[0], records[1]
    assert gdn_long["train_peak_mib"] - gdn_long["weights_mib"] > gdn_short["train_peak_mib"] - gdn_short["weights_mib"]


@pytest.mark.gpu
@gpu
def test_state_norm_over_context_same_on_both_backends():
    from gdn_lab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "backend": "fla"}), device="cuda")
    ids = torch.randint(64, (1, 2048), generator=torch.Generator().manual_seed(1))
    with_fla = longctx.state_norm_over_context(model, ids, num_points=64)
    model.set_backend("torch")
    with_torch = longctx.state_norm_over_context(model, ids, num_points=64)
    torch.testing.assert_close(with_fla.norms, with_torch.norms, rtol=1e-4, atol=1e-5)

"""Synthetic tasks: generator semantics on fixed seeds, determinism, sharding, accuracy helpers."""
import doctest

import pytest
import torch
import torch.nn.functional as F

from gdn_lab import tasks
from gdn_lab.config import ConfigError, ModelConfig, TrainConfig
from gdn_lab.data import Batch
from gdn_lab.models import build_model
from gdn_lab.tasks import PAD, SEP, TaskData, copy_task, evaluate_task, exact_match, masked_accuracy, mqar_task
from gdn_lab.train import train


def test_docstring_examples_are_true():
    result = doctest.testmod(tasks)
    assert result.attempted == 3 and result.failed == 0


@pytest.mark.parametrize("task", ["copy", "reverse", "mqar"])
def test_shapes_and_dtypes(task):
    batch = TaskData(task, vocab_size=64, seq_len=32, seed=0).sample(5, seed=3)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (5, 32)
    assert batch.inputs.dtype == batch.targets.dtype == torch.long and batch.mask.dtype == torch.bool
    assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < 64
    assert bool(batch.mask.any(dim=1).all())


@pytest.mark.parametrize("reverse", [False, True])
def test_copy_and_reverse_answers(reverse):
    generate = tasks.reverse_task if reverse else tasks.copy_task
    batch = generate(64, seq_len=24, vocab_size=20, min_length=1, max_length=12, seed=7)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets are the next token everywhere
    lengths = set()
    for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist(), strict=True):
        length = inputs.index(SEP)
        string = inputs[:length]
        lengths.add(length)
        assert 1 <= length <= 12 and all(t >= 2 for t in string)
        answer = string[::-1] if reverse else string
        assert [t for t, m in zip(targets, mask, strict=True) if m] == answer
        assert [i for i, m in enumerate(mask) if m] == list(range(length, 2 * length))  # from SEP on
        assert inputs[2 * length + 1:] == [PAD] * (24 - 2 * length - 1)
    assert lengths == set(range(1, 13))  # 64 draws cover every length


def test_mqar_answers_match_zoology_layout():
    V, T, pairs = 64, 48, 6
    batch = mqar_task(32, seq_len=T, vocab_size=V, num_kv_pairs=pairs, seed=1)
    assert torch.equal(batch.inputs[:, 1:][~batch.mask[:, :-1]], batch.targets[:, :-1][~batch.mask[:, :-1]])
    for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist(), strict=True):
        keys, values = inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]
        assert all(2 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        queries = [i for i, m in enumerate(mask) if m]
        assert len(queries) == pairs
        assert all(q >= 2 * pairs and (q - 2 * pairs) % 2 == 0 for q in queries)  # even offsets after the pairs
        assert sorted(inputs[q] for q in queries) == sorted(keys)  # every key asked once
        lookup = dict(zip(keys, values, strict=True))
        assert all(targets[q] == lookup[inputs[q]] for q in queries)
        assert all(t >= 2 for t in inputs)  # filler is content, never PAD or SEP


def test_mqar_power_law_puts_queries_near_the_pairs():
    batch = mqar_task(256, seq_len=256, vocab_size=512, num_kv_pairs=4, seed=0)
    gaps = (batch.mask.nonzero()[:, 1] - 8) // 2
    uniform_mean = (256 - 8) // 2 / 2
    assert gaps.float().mean() < 0.5 * uniform_mean  # zoology's power_a=0.01 favours short gaps
    flat = mqar_task(256, seq_len=256, vocab_size=512, num_kv_pairs=4, power_a=1.0, seed=0)
    flat_gaps = (flat.mask.nonzero()[:, 1] - 8) // 2
    assert abs(flat_gaps.float().mean() - uniform_mean) < 0.1 * uniform_mean  # power_a=1 is uniform


def test_generators_are_pure_functions_of_seed():
    a, b, c = (copy_task(4, 16, 32, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.inputs, c.inputs)


def test_taskdata_train_batches_are_deterministic_per_step():
    data = TaskData("mqar", vocab_size=128, seq_len=32, seed=0, num_kv_pairs=4)
    again = TaskData("mqar", vocab_size=128, seq_len=32, seed=0, num_kv_pairs=4)
    assert torch.equal(data.train_batch(3, 8).inputs, again.train_batch(3, 8).inputs)
    assert not torch.equal(data.train_batch(3, 8).inputs, data.train_batch(4, 8).inputs)
    assert not torch.equal(data.train_batch(3, 8).inputs, data.replace(seed=1).train_batch(3, 8).inputs)
    val, val_again = data.val_batches(8, 2), again.val_batches(8, 2)
    assert len(val) == 2 and all(torch.equal(x.inputs, y.inputs) for x, y in zip(val, val_again, strict=True))
    train_rows = {tuple(r) for step in range(20) for r in data.train_batch(step, 8).inputs.tolist()}
    assert not train_rows & {tuple(r) for b in val for r in b.inputs.tolist()}


def test_rank_shards_stack_into_the_single_process_batch():
    data = TaskData("copy", vocab_size=32, seq_len=16, seed=2, min_length=2, max_length=8)
    whole = data.train_batch(5, 12)
    shards = [data.train_batch(5, 12, rank=r, world_size=3) for r in range(3)]
    assert all(s.inputs.shape == (4, 16) for s in shards)
    for field in ("inputs", "targets", "mask"):
        assert torch.equal(torch.cat([getattr(s, field) for s in shards]), getattr(whole, field))
    with pytest.raises(ConfigError, match="divisible"):
        data.train_batch(0, 10, rank=0, world_size=3)


def test_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="choose from"):
        TaskData("sort", vocab_size=32, seq_len=16)
    with pytest.raises(ConfigError, match="num_kv_pairs"):
        TaskData("copy", vocab_size=32, seq_len=16, num_kv_pairs=4)
    with pytest.raises(ConfigError, match="seq_len >= 40"):
        TaskData("copy", vocab_size=32, seq_len=16, max_length=20)
    with pytest.raises(ConfigError, match="lower num_kv_pairs to 4"):
        TaskData("mqar", vocab_size=256, seq_len=16, num_kv_pairs=8)
    with pytest.raises(ConfigError, match="key ids"):
        TaskData("mqar", vocab_size=16, seq_len=64, num_kv_pairs=8)


class PeekingModel(torch.nn.Module):
    """Not causal: predicts each position's next input token, which is the answer in copy and
    reverse and never the answer in MQAR."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return F.one_hot(input_ids.roll(-1, dims=1), self.vocab_size).float()


class ConstantModel(PeekingModel):
    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., 5] = 1.0
        return logits


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_accuracy_of_a_model_that_knows_the_answer_is_one(task):
    data = TaskData(task, vocab_size=16, seq_len=32, seed=0, min_length=1, max_length=16)
    assert evaluate_task(PeekingModel(16), data, batch_size=16, num_batches=2) == {"accuracy": 1.0, "exact_match": 1.0}


def test_accuracy_of_a_constant_model_is_chance():
    data = TaskData("copy", vocab_size=16, seq_len=64, seed=0)
    score = evaluate_task(ConstantModel(16), data, batch_size=32, num_batches=2)  # 2048 answers
    assert data.chance_accuracy == 1 / 14
    assert abs(score["accuracy"] - 1 / 14) < 0.02  # 3.5 standard errors (sqrt(p(1-p)/2048) = 0.0057)
    assert score["exact_match"] == 0.0


def test_mqar_answers_are_not_in_the_inputs():
    data = TaskData("mqar", vocab_size=256, seq_len=64, seed=0, num_kv_pairs=8)
    assert evaluate_task(PeekingModel(256), data, batch_size=32, num_batches=2)["accuracy"] < 0.05
    assert data.chance_accuracy == 1 / 128


def test_masked_accuracy_and_exact_match_count_only_answers():
    batch = copy_task(4, seq_len=16, vocab_size=16, max_length=5, seed=0)
    logits = F.one_hot(batch.targets, 16).float()
    logits[:, :, 3] += 2.0 * ~batch.mask  # wrong everywhere off the answers: must not count
    assert masked_accuracy(logits, batch) == 1.0
    assert exact_match(logits, batch).tolist() == [True] * 4
    first_answer = int(batch.mask[0].nonzero()[0])
    logits[0, first_answer] = 0.0
    logits[0, first_answer, PAD] = 1.0
    assert masked_accuracy(logits, batch) == 19 / 20
    assert exact_match(logits, batch).tolist() == [False, True, True, True]


def test_batch_is_the_data_module_batch():
    assert isinstance(copy_task(1, 4, 8), Batch)


def test_tiny_gdn_learns_copy_above_chance(tmp_path):
    """The real model and the one training loop: 60 steps of a 2-layer, 32-wide GDN on strings
    of 1..4 tokens over 8 symbols (chance 1/8) take a few seconds on the CPU."""
    data = TaskData("copy", vocab_size=10, seq_len=8, seed=0, min_length=1, max_length=4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=10, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                                    backend="torch"))
    untrained = evaluate_task(model, data, batch_size=64, num_batches=2)["accuracy"]
    config = TrainConfig(steps=60, batch_size=16, seq_len=8, lr=1e-2, warmup_steps=3, eval_every=0, eval_batches=1,
                         device="cpu")
    result = train(model, config, data, tmp_path, progress=False)
    trained = evaluate_task(model, data, batch_size=64, num_batches=2)["accuracy"]
    assert untrained < 2 * data.chance_accuracy
    assert trained > 3 * data.chance_accuracy  # measured 0.59 against chance 0.125
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.5


def test_contenders_carry_their_standard_components():
    configs = tasks.contender_configs(vocab_size=16, hidden_size=16, num_layers=2, num_heads=2, head_dim=8,
                                      attn_num_heads=2, backend="torch")
    assert list(configs) == ["GDN", "GDN slow decay", "DeltaNet", "Transformer", "Transformer (no conv)", "Hybrid"]
    assert [c.mixers for c in configs.values()] == [("gdn", "gdn")] * 3 + [("attn", "attn")] * 2 + [("gdn", "attn")]
    assert not configs["DeltaNet"].use_decay and configs["GDN"].use_decay
    assert (configs["GDN slow decay"].dt_min, configs["GDN slow decay"].dt_max) == (1e-4, 1e-3)
    assert (configs["GDN"].dt_min, configs["GDN"].dt_max) == (1e-3, 0.1)  # FLA's init stays the default
    assert configs["Transformer"].attn_conv_size == configs["Hybrid"].attn_conv_size == 4
    assert configs["Transformer (no conv)"].attn_conv_size == 0
    assert tasks.state_key_dims(configs["Hybrid"]) == 16 and tasks.state_key_dims(configs["Transformer"]) == 0


def _greedy_copy(model, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the growing sequence (no cache): the reference."""
    tokens = prompt
    for _ in range(length):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1]:]


@pytest.mark.parametrize("name", ["GDN", "Transformer"])
def test_copy_by_length_generates_instead_of_teacher_forcing(name, tmp_path):
    data = TaskData("copy", vocab_size=6, seq_len=12, seed=0, min_length=1, max_length=6)
    torch.manual_seed(0)
    model = build_model(tasks.contender_configs(vocab_size=6, hidden_size=16, num_heads=2, head_dim=8,
                                                backend="torch")[name])
    # a few steps: the model is neither random nor perfect, so generated and teacher-forced scores differ
    train(model, TrainConfig(steps=30, batch_size=16, seq_len=12, warmup_steps=0, eval_every=0, lr=1e-2,
                             device="cpu"), data, tmp_path, progress=False)
    curve = tasks.copy_by_length(model, data, [2, 5], batch_size=16)
    for point in curve:
        batch = data.replace(min_length=point["length"], max_length=point["length"]).val_batches(16, 1)[0]
        answer = batch.targets[batch.mask].view(16, -1)
        written = _greedy_copy(model.eval(), batch.inputs[:, :point["length"] + 1], point["length"])
        assert point["token_accuracy"] == pytest.approx((written == answer).float().mean().item())
        assert point["exact_match"] == pytest.approx((written == answer).all(dim=1).float().mean().item())
        assert point["exact_match"] <= point["token_accuracy"]
    score = tasks.score_copy(model, data, [2, 5], batch_size=16)
    assert score["exact_match"] == pytest.approx(sum(p["exact_match"] for p in curve) / 2)
    assert score["by_length"] == curve


def test_longest_solved_and_series():
    curve = [{"length": 8, "accuracy": 1.0}, {"length": 32, "accuracy": 0.5}, {"length": 16, "accuracy": 0.95},
             {"length": 64, "accuracy": 0.99}]
    assert tasks.longest_solved(curve, threshold=0.9) == 16  # 64 recovers, but after the first failure
    assert tasks.longest_solved(curve, threshold=1.1) == 0
    assert tasks.longest_solved([{"length": 4, "exact_match": 0.95}], y="exact_match") == 4
    records = [{"model": "GDN", "T": 64, "accuracy": 0.5}, {"model": "GDN", "T": 32, "accuracy": 0.9},
               {"model": "Transformer", "T": 32, "accuracy": 1.0}]
    assert tasks.series(records, x="T") == {"GDN": ([32, 64], [0.9, 0.5]), "Transformer": ([32], [1.0])}


def test_render_marks_wrong_predictions():
    batch = copy_task(1, seq_len=12, vocab_size=10, max_length=5, seed=0)
    predictions = batch.targets.clone()
    predictions[0, 6] = 3
    assert tasks.render(batch, predictions=predictions).splitlines() == [
        "inputs   9 7 2 5 5 | 9 7 2 5 5",
        "answers            9 7 2 5 5",
        "model              9 3 2 5 5",
        "wrong                ^",
    ]

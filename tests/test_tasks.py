"""Synthetic tasks: generator semantics on fixed seeds, determinism, sharding, scoring on logits.

No model runs here (that is tests/test_recall.py): gdn_lab.tasks imports nothing above config and data."""
import doctest

import pytest
import torch
import torch.nn.functional as F

from gdn_lab import tasks
from gdn_lab.config import ConfigError
from gdn_lab.data import Batch
from gdn_lab.tasks import PAD, SEP, TaskData, copy_task, exact_match, masked_accuracy, mqar_task


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


def test_mqar_keys_and_values_are_a_stable_argsort_of_the_draws():
    """The pairs are the ids of each row's smallest uniform draws, in draw order, ties by position:
    what a stable argsort of the same draws gives (the sampler uses topk on exact integer keys)."""
    V, pairs = 8192, 64
    batch = mqar_task(128, seq_len=512, vocab_size=V, num_kv_pairs=pairs, random_non_queries=False, seed=5)
    generator = torch.Generator().manual_seed(5)
    key_draws = torch.rand(128, V // 2 - 2, generator=generator)
    value_draws = torch.rand(128, V // 2, generator=generator)
    keys = 2 + key_draws.argsort(dim=1, stable=True)[:, :pairs]
    values = V // 2 + value_draws.argsort(dim=1, stable=True)[:, :pairs]
    assert torch.equal(batch.inputs[:, 0:2 * pairs:2], keys) and torch.equal(batch.inputs[:, 1:2 * pairs:2], values)
    # 4,094 keys drawn 64 at a time: about uniform over the ids (each expected 128 * 64 / 4094 = 2 times)
    counts = torch.bincount(keys.flatten(), minlength=V // 2)[2:]
    assert counts.sum() == 128 * pairs and counts.max() <= 12


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

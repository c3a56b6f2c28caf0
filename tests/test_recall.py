"""Recall tasks with models: evaluate_task on oracle and constant models, a tiny GDN that learns copy,
the contenders' components, copy scored by greedy generation, and the curve helpers."""
import pytest
import torch
import torch.nn.functional as F

from gdn_lab import recall
from gdn_lab.config import ModelConfig, TrainConfig
from gdn_lab.models import build_model
from gdn_lab.recall import evaluate_task
from gdn_lab.tasks import TaskData
from gdn_lab.train import train


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
    configs = recall.contender_configs(vocab_size=16, hidden_size=16, num_layers=2, num_heads=2, head_dim=8,
                                       attn_num_heads=2, backend="torch")
    assert list(configs) == ["GDN", "GDN slow decay", "DeltaNet", "Transformer", "Transformer (no conv)", "Hybrid"]
    assert [c.mixers for c in configs.values()] == [("gdn", "gdn")] * 3 + [("attn", "attn")] * 2 + [("gdn", "attn")]
    assert not configs["DeltaNet"].use_decay and configs["GDN"].use_decay
    assert (configs["GDN slow decay"].dt_min, configs["GDN slow decay"].dt_max) == (1e-4, 1e-3)
    assert (configs["GDN"].dt_min, configs["GDN"].dt_max) == (1e-3, 0.1)  # FLA's init stays the default
    assert configs["Transformer"].attn_conv_size == configs["Hybrid"].attn_conv_size == 4
    assert configs["Transformer (no conv)"].attn_conv_size == 0
    assert recall.state_key_dims(configs["Hybrid"]) == 16 and recall.state_key_dims(configs["Transformer"]) == 0


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
    model = build_model(recall.contender_configs(vocab_size=6, hidden_size=16, num_heads=2, head_dim=8,
                                                 backend="torch")[name])
    # a few steps: the model is neither random nor perfect, so generated and teacher-forced scores differ
    train(model, TrainConfig(steps=30, batch_size=16, seq_len=12, warmup_steps=0, eval_every=0, lr=1e-2,
                             device="cpu"), data, tmp_path, progress=False)
    curve = recall.copy_by_length(model, data, [2, 5], batch_size=16)
    for point in curve:
        batch = data.replace(min_length=point["length"], max_length=point["length"]).val_batches(16, 1)[0]
        answer = batch.targets[batch.mask].view(16, -1)
        written = _greedy_copy(model.eval(), batch.inputs[:, :point["length"] + 1], point["length"])
        assert point["token_accuracy"] == pytest.approx((written == answer).float().mean().item())
        assert point["exact_match"] == pytest.approx((written == answer).all(dim=1).float().mean().item())
        assert point["exact_match"] <= point["token_accuracy"]
    score = recall.score_copy(model, data, [2, 5], batch_size=16)
    assert score["exact_match"] == pytest.approx(sum(p["exact_match"] for p in curve) / 2)
    assert score["by_length"] == curve


def test_longest_solved_and_series():
    curve = [{"length": 8, "accuracy": 1.0}, {"length": 32, "accuracy": 0.5}, {"length": 16, "accuracy": 0.95},
             {"length": 64, "accuracy": 0.99}]
    assert recall.longest_solved(curve, threshold=0.9) == 16  # 64 recovers, but after the first failure
    assert recall.longest_solved(curve, threshold=1.1) == 0
    assert recall.longest_solved([{"length": 4, "exact_match": 0.95}], y="exact_match") == 4
    records = [{"model": "GDN", "T": 64, "accuracy": 0.5}, {"model": "GDN", "T": 32, "accuracy": 0.9},
               {"model": "Transformer", "T": 32, "accuracy": 1.0}]
    assert recall.series(records, x="T") == {"GDN": ([32, 64], [0.9, 0.5]), "Transformer": ([32], [1.0])}

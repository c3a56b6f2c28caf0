"""Train-and-score helpers for the recall tasks of `gdn_lab.tasks` (copy, reverse, MQAR).

`gdn_lab.tasks` generates the data and scores logits; this module runs models on it:

- `task_logits(model, batch)`, `predict(model, batch)`: one eval-mode forward, logits [B, T, V] or
  argmax ids [B, T];
- `evaluate_task(model, data)`: accuracy and exact match over fixed validation batches (MQAR:
  zoology's per-query accuracy), usable as a `gdn_lab.grid` score;
- `copy_by_length` / `score_copy`: generate the copy greedily (`gdn_lab.generate`) and score exact
  match of the whole string, as the copying literature does;
- experiments of notebook 02 (trained and summarised through `gdn_lab.grid`): `contender_configs`
  (the models at one width, each with its standard components), `state_key_dims`, `longest_solved`
  (how long a string a model copies), `series`, `state_norm_while_copying` (through `gdn_lab.probe`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import probe
from .config import ModelConfig
from .data import Batch
from .env import evaluating, module_device
from .generate import generate
from .models import CausalLM
from .tasks import TaskData, answer_correct, exact_match


@torch.no_grad()
def task_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """`model(batch.inputs)` in eval mode without gradients: logits [B, T, V] on the model's
    device (the model's training mode is restored)."""
    with evaluating(model):
        return model(batch.inputs.to(module_device(model)))


def predict(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's argmax next token at every position: [B, T] long, on the CPU."""
    return task_logits(model, batch).argmax(dim=-1).cpu()


def evaluate_task(model: torch.nn.Module, data: TaskData, batch_size: int = 32, num_batches: int = 4) -> dict:
    """Score `model` on `data.val_batches(batch_size, num_batches)`.

    Returns {"accuracy": answer tokens right / answer tokens, "exact_match": sequences with
    every answer right / sequences}. The model's forward without targets gives logits [B, T, V].
    For MQAR "accuracy" is zoology's metric, the share of queries answered right, read from one
    forward pass: an answer is predicted at its query token and never fed back, so none leaks into
    another. (For copy it is teacher-forced; `copy_by_length` generates.) A grid score as
    `functools.partial(evaluate_task, batch_size=..., num_batches=...)`.
    """
    right = answers = exact = sequences = 0
    for batch in data.val_batches(batch_size, num_batches):
        logits = task_logits(model, batch)
        right += int(answer_correct(logits, batch).sum())
        answers += int(batch.mask.sum())
        exact += int(exact_match(logits, batch).sum())
        sequences += batch.inputs.shape[0]
    return {"accuracy": right / max(1, answers), "exact_match": exact / max(1, sequences)}


def contender_configs(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                      head_dim: int = 64, attn_num_heads: int = 2, hybrid_attn_layers: str | tuple = "late",
                      attn_conv_size: int = 4, slow_dt: tuple[float, float] = (1e-4, 1e-3), backend: str = "auto",
                      **common) -> dict[str, ModelConfig]:
    """The models the notebook compares, at one width (hidden size, depth, MLP), each with the
    components its literature gives it:

    GDN (every layer Gated DeltaNet, FLA's decay init: dt in [1e-3, 0.1]), GDN slow decay (dt in
    `slow_dt`: the state starts near alpha = 1 and forgets slowly), DeltaNet (GDN without the decay
    gate: `use_decay=False`), Transformer (every layer SDPA attention with RoPE and a short conv of
    `attn_conv_size` taps on q, k, v, as zoology's attention baselines have), Transformer (no conv)
    (the same without it: it must build an induction circuit from two layers) and Hybrid (GDN with
    attention, conv included, at `hybrid_attn_layers`; 'late' puts it in the top layer of 2).
    `common`: any other ModelConfig field, shared by all (e.g. tie_embeddings=True).
    """
    base = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                       head_dim=head_dim, attn_num_heads=attn_num_heads, attn_conv_size=attn_conv_size,
                       backend=backend, **common)
    return {"GDN": base, "GDN slow decay": base.replace(dt_min=slow_dt[0], dt_max=slow_dt[1]),
            "DeltaNet": base.replace(use_decay=False), "Transformer": base.replace(attn_layers="transformer"),
            "Transformer (no conv)": base.replace(attn_layers="transformer", attn_conv_size=0),
            "Hybrid": base.replace(attn_layers=hybrid_attn_layers)}


def state_key_dims(config: ModelConfig) -> int:
    """num_heads * head_dim of one GDN layer: how many orthogonal keys its state [H, K, V] can
    hold apart, the delta rule's capacity in key-value associations (0 for a pure transformer)."""
    return config.num_heads * config.head_dim if config.num_gdn_layers else 0


@torch.no_grad()
def copy_by_length(model: CausalLM, data: TaskData, lengths: Sequence[int], batch_size: int = 64,
                   num_batches: int = 1) -> list[dict]:
    """Copy (or reverse) scored the way the literature scores it, at fixed string lengths.

    For each length L the model reads the string and SEP (the prompt, [B, L + 1]) and writes L
    tokens greedily from its own outputs (`gdn_lab.generate.generate`, temperature 0, the
    recurrent or KV cache). Returns [{"length", "exact_match": strings copied without a single
    wrong token / strings, "token_accuracy": generated tokens right / tokens, "teacher_forced_accuracy":
    the argmax accuracy when every earlier answer token is the right one (what the loss trains;
    an upper bound that hides compounding errors)}].
    """
    curve = []
    for length in lengths:
        fixed = data.replace(min_length=length, max_length=length)
        exact = right = tokens = forced = 0
        for batch in fixed.val_batches(batch_size, num_batches):
            prompt = batch.inputs[:, :length + 1]
            answer = batch.targets[batch.mask].view(-1, length)
            written = torch.tensor(generate(model, prompt, max_new_tokens=length, temperature=0))
            hits = written == answer
            exact += int(hits.all(dim=1).sum())
            right += int(hits.sum())
            tokens += hits.numel()
            forced += int(answer_correct(task_logits(model, batch), batch).sum())
        curve.append({"length": length, "exact_match": exact / (tokens // length), "token_accuracy": right / tokens,
                      "teacher_forced_accuracy": forced / tokens})
    return curve


def score_copy(model: CausalLM, data: TaskData, lengths: Sequence[int], batch_size: int = 64,
               num_batches: int = 1) -> dict:
    """`copy_by_length` as a grid score: {"exact_match", "token_accuracy", "teacher_forced_accuracy"}
    averaged over `lengths`, and "by_length" (the curve)."""
    curve = copy_by_length(model, data, lengths, batch_size, num_batches)
    mean = {key: sum(point[key] for point in curve) / len(curve)
            for key in ("exact_match", "token_accuracy", "teacher_forced_accuracy")}
    return {**mean, "by_length": curve}


def longest_solved(curve: Sequence[dict], threshold: float = 0.9, x: str = "length", y: str = "accuracy") -> int:
    """The largest `x` before `y` first falls below `threshold`, scanning in order of x
    (0 when the first point already fails). For copy: the longest string copied reliably."""
    solved = 0
    for point in sorted(curve, key=lambda p: p[x]):
        if point[y] < threshold:
            break
        solved = point[x]
    return solved


def series(records: Sequence[dict], x: str, y: str = "accuracy", by: str = "model") -> dict[str, tuple[list, list]]:
    """{records[by]: (xs, ys)} sorted by x: the input `gdn_lab.viz.line_plot` takes."""
    grouped: dict[str, list[tuple]] = {}
    for record in records:
        grouped.setdefault(str(record[by]), []).append((record[x], record[y]))
    return {name: tuple(map(list, zip(*sorted(points), strict=True))) for name, points in grouped.items()}


def state_norm_while_copying(model: CausalLM, inputs: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """||S_t||_F [T] of one GDN layer (the first when None), averaged over heads, for one
    sequence `inputs [1, T]` (e.g. a copy example: it grows while the string is read)."""
    captured = probe.capture(model, inputs.to(model.device), layers=None if layer is None else [layer])
    first = min(captured.layers) if layer is None else layer
    return captured[first].state_norm[0].mean(dim=-1)

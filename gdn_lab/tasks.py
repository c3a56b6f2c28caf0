"""Synthetic recall tasks: copy, reverse and multi-query associative recall (MQAR).

Each generator is a pure function of sizes and a seed that returns a `Batch` of CPU tensors,
in the style of HazyResearch/zoology: `inputs [B, T]` long, `targets [B, T]` long (the next
token; the answer where `mask`), `mask [B, T]` bool marking the answer positions. Loss and
accuracy count only where `mask` is true.

Vocabulary layout (every task): id 0 is PAD, id 1 is SEP, ids 2 .. vocab_size-1 are content.
MQAR splits the content the way zoology does: keys from the lower half, values from the upper
half, so a value never reads as a key.

    copy:     9 7 2 | 9 7 2           a string, SEP, the same string
    reverse:  9 7 2 | 2 7 9           a string, SEP, the string backwards
    mqar:     4 14 5 15 4 . . . 5     pairs 4:14 and 5:15, then queries: answer 14 at the 4, 15 at the 5

`TaskData` serves any of them through the batch-source protocol of `gdn_lab.data`
(`train_batch(step, batch_size, rank, world_size)`, `val_batches(batch_size, num_batches)`),
so the one training loop in `gdn_lab.train` trains on tasks as it trains on text.

Scoring on logits [B, T, V], no model needed: `answer_correct`, `masked_accuracy(logits, batch)` and
`exact_match(logits, batch)`. Running a model on these tasks (`evaluate_task`, `copy_by_length`,
`contender_configs`, ...) is `gdn_lab.recall`'s job: this module imports nothing of gdn_lab above
`config` and `data`, so a generator can be read, tested and used without the model code.
"""
from __future__ import annotations

import hashlib
import inspect

import torch

from .config import ConfigError
from .data import Batch

PAD = 0
SEP = 1
FIRST_CONTENT_ID = 2


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "train", step): distinct tuples, independent streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _string_then_answer(batch_size: int, seq_len: int, vocab_size: int, min_length: int | None,
                        max_length: int | None, seed: int, reverse: bool) -> Batch:
    max_length = seq_len // 2 if max_length is None else max_length
    min_length = max_length if min_length is None else min_length
    _require(vocab_size > FIRST_CONTENT_ID, f"vocab_size={vocab_size} leaves no content ids; use >= 3")
    _require(1 <= min_length <= max_length,
             f"string lengths must satisfy 1 <= min_length <= max_length, got {min_length}, {max_length}")
    _require(2 * max_length <= seq_len,
             f"a string of {max_length} tokens needs seq_len >= {2 * max_length} (string, SEP, answer); "
             f"raise seq_len or lower max_length to {seq_len // 2}")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (batch_size, 1), generator=generator)
    string = torch.randint(FIRST_CONTENT_ID, vocab_size, (batch_size, max_length), generator=generator)
    position = torch.arange(seq_len + 1).expand(batch_size, -1)
    offset = position - lengths - 1  # index into the answer: 0 at the first token after SEP
    source = torch.where(position < lengths, position, (lengths - 1 - offset) if reverse else offset)
    copied = string.gather(1, source.clamp(0, max_length - 1))
    tokens = torch.where(position < lengths, copied, PAD)
    tokens = torch.where(position == lengths, SEP, tokens)
    answer = (offset >= 0) & (offset < lengths)
    tokens = torch.where(answer, copied, tokens)
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=answer[:, 1:])


def copy_task(batch_size: int, seq_len: int, vocab_size: int, min_length: int | None = None,
              max_length: int | None = None, seed: int = 0) -> Batch:
    """Copy: a random string, SEP, the same string; the answer is the copy.

    String lengths are uniform in [min_length, max_length] per sequence (both default to
    seq_len // 2, the longest that fits); the rest is PAD. Shapes: [batch_size, seq_len].

    >>> print(render(copy_task(1, seq_len=8, vocab_size=10, max_length=3, seed=0)))
    inputs   9 7 2 | 9 7 2
    answers        9 7 2
    """
    return _string_then_answer(batch_size, seq_len, vocab_size, min_length, max_length, seed, reverse=False)


def reverse_task(batch_size: int, seq_len: int, vocab_size: int, min_length: int | None = None,
                 max_length: int | None = None, seed: int = 0) -> Batch:
    """Reverse: a random string, SEP, the string backwards; the answer is the reversed string.

    Same sizes and lengths as `copy_task`. Shapes: [batch_size, seq_len].

    >>> print(render(reverse_task(1, seq_len=8, vocab_size=10, max_length=3, seed=0)))
    inputs   9 7 2 | 2 7 9
    answers        2 7 9
    """
    return _string_then_answer(batch_size, seq_len, vocab_size, min_length, max_length, seed, reverse=True)


def mqar_task(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int = 8, power_a: float = 0.01,
              random_non_queries: bool = True, seed: int = 0) -> Batch:
    """Multi-query associative recall (Arora et al. 2023, zoology's `multiquery_ar`).

    `num_kv_pairs` key-value pairs (distinct keys from [2, V/2), distinct values from
    [V/2, V)), then a query region where every key appears once, at even offsets whose gap from
    the region's start follows zoology's power law (p(gap) ~ gap^(power_a - 1): near queries are
    likelier). The answer to a query is its value, predicted at the query token itself. Other
    query-region tokens are random content ids (PAD when `random_non_queries` is False).
    Shapes: [batch_size, seq_len]; needs seq_len >= 4 * num_kv_pairs.

    >>> print(render(mqar_task(1, seq_len=12, vocab_size=16, num_kv_pairs=2, random_non_queries=False)))
    inputs    4 14  5 15  4  .  .  .  5
    answers              14          15

    Differences from zoology: ids 0 and 1 are reserved (keys start at 2, not 1); the filler is
    drawn from content ids only (zoology draws from the whole vocabulary, so 0 can appear);
    targets hold the next token off the answer positions (zoology: -100), with `mask` saying
    where to score; a torch generator per call instead of numpy's global seed; no `num_passes`.
    """
    context = 2 * num_kv_pairs
    key_ids = torch.arange(FIRST_CONTENT_ID, vocab_size // 2)
    value_ids = torch.arange(vocab_size // 2, vocab_size)
    _require(num_kv_pairs >= 1, f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
    _require(len(key_ids) >= num_kv_pairs and len(value_ids) >= num_kv_pairs,
             f"vocab_size={vocab_size} has {len(key_ids)} key ids for {num_kv_pairs} pairs; "
             f"use vocab_size >= {2 * (num_kv_pairs + FIRST_CONTENT_ID)}")
    _require(seq_len >= 2 * context,
             f"MQAR with {num_kv_pairs} pairs needs seq_len >= {2 * context} (pairs, then a query slot each); "
             f"raise seq_len or lower num_kv_pairs to {seq_len // 4}")
    generator = torch.Generator().manual_seed(seed)

    def distinct(ids: torch.Tensor) -> torch.Tensor:  # [batch_size, num_kv_pairs], no repeats per row
        # the ids of the num_kv_pairs smallest uniform draws of each row, in draw order, ties by position
        # (= a stable argsort's first columns): exact integer keys, since non-negative floats' bits
        # order as integers. topk instead of a full argsort: 5x faster at zoology's 4,095 keys
        draws = torch.rand(batch_size, len(ids), generator=generator)
        order_key = draws.view(torch.int32).long() * len(ids) + torch.arange(len(ids))
        return ids[order_key.topk(num_kv_pairs, dim=1, largest=False, sorted=True).indices]

    keys, values = distinct(key_ids), distinct(value_ids)
    slots = (seq_len - context) // 2
    gap_weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(gap_weights.expand(batch_size, -1), num_kv_pairs, replacement=False,
                             generator=generator)
    query_positions = context + 2 * gaps
    filler = torch.randint(FIRST_CONTENT_ID, vocab_size, (batch_size, seq_len + 1), generator=generator)
    tokens = filler if random_non_queries else torch.full_like(filler, PAD)
    tokens[:, 0:context:2] = keys
    tokens[:, 1:context:2] = values
    tokens.scatter_(1, query_positions, keys)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets.scatter_(1, query_positions, values)
    mask = torch.zeros_like(inputs, dtype=torch.bool).scatter_(1, query_positions, True)
    return Batch(inputs=inputs, targets=targets, mask=mask)


TASKS = {"copy": copy_task, "reverse": reverse_task, "mqar": mqar_task}


def render(batch: Batch, index: int = 0, predictions: torch.Tensor | None = None) -> str:
    """One sequence of a batch as aligned rows: the inputs (SEP as '|', PAD as '.', trailing PAD
    dropped) and, under each answer position, the answer the model must predict there. With
    `predictions [B, T]` (argmax ids, see `gdn_lab.recall.predict`), a third row shows the
    model's answers and a fourth marks the wrong ones with '^'."""
    inputs, targets, mask = (x[index].tolist() for x in (batch.inputs, batch.targets, batch.mask))
    kept = [t for t in range(len(inputs)) if inputs[t] != PAD or mask[t]]
    positions = range(kept[-1] + 1 if kept else 0)
    rows = {"inputs": [{PAD: ".", SEP: "|"}.get(inputs[t], str(inputs[t])) for t in positions],
            "answers": [str(targets[t]) if mask[t] else "" for t in positions]}
    if predictions is not None:
        predicted = predictions[index].tolist()
        rows["model"] = [str(predicted[t]) if mask[t] else "" for t in positions]
        rows["wrong"] = ["^" if mask[t] and predicted[t] != targets[t] else "" for t in positions]
    width = max(len(cell) for cells in rows.values() for cell in cells)
    return "\n".join((f"{label:<9}" + " ".join(cell.rjust(width) for cell in cells)).rstrip()
                     for label, cells in rows.items())


class TaskData:
    """A synthetic task behind the batch-source protocol (the same one `gdn_lab.data.LMData` serves).

    `TaskData("mqar", vocab_size=8192, seq_len=256, seed=0, num_kv_pairs=16)` draws every
    training batch from a seed derived from (seed, "train", step), and validation batches from
    (seed, "val", i), so a batch is a pure function of its arguments and resuming at step n
    sees what an unbroken run saw. `batch_size` is the global batch: rank r of world_size w
    gets its r-th block of batch_size/w rows, so the ranks' blocks stacked in rank order are
    the single-process batch.
    """

    def __init__(self, task: str, vocab_size: int, seq_len: int, seed: int = 0, **task_kwargs):
        _require(task in TASKS, f"unknown task {task!r}; choose from {sorted(TASKS)}")
        generator = TASKS[task]
        accepted = [p for p in inspect.signature(generator).parameters
                    if p not in ("batch_size", "seq_len", "vocab_size", "seed")]
        unknown = sorted(set(task_kwargs) - set(accepted))
        _require(not unknown, f"{task} does not take {unknown}; it takes {accepted}")
        self.task, self.vocab_size, self.seq_len, self.seed = task, vocab_size, seq_len, seed
        self.task_kwargs = dict(task_kwargs)
        self.sample(1, seed)  # size errors surface here, not in the middle of training

    def sample(self, batch_size: int, seed: int) -> Batch:
        """`batch_size` sequences drawn from `seed` (any int): [batch_size, seq_len] tensors."""
        return TASKS[self.task](batch_size=batch_size, seq_len=self.seq_len, vocab_size=self.vocab_size,
                                seed=seed, **self.task_kwargs)

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Rank `rank`'s block of batch_size/world_size rows of step `step`'s global batch of
        `batch_size` sequences (as `LMData.train_batch`): [batch_size/world_size, seq_len]."""
        _require(0 <= rank < world_size, f"rank={rank} must be in [0, world_size={world_size})")
        _require(batch_size % world_size == 0,
                 f"batch_size={batch_size} is not divisible by world_size={world_size}")
        per_rank = batch_size // world_size
        batch = self.sample(batch_size, derive_seed(self.seed, "train", step))
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        return Batch(inputs=batch.inputs[rows], targets=batch.targets[rows], mask=batch.mask[rows])

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation batches (never seen in training: their seeds come from another stream)."""
        return [self.sample(batch_size, derive_seed(self.seed, "val", i)) for i in range(num_batches)]

    def replace(self, **changes) -> TaskData:
        """A copy with some settings changed, e.g. `data.replace(min_length=40, max_length=40)`."""
        settings = {"task": self.task, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "seed": self.seed,
                    **self.task_kwargs, **changes}
        return TaskData(**settings)

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing uniformly among the ids an answer can take."""
        if self.task == "mqar":
            return 1 / (self.vocab_size - self.vocab_size // 2)
        return 1 / (self.vocab_size - FIRST_CONTENT_ID)

    def describe(self) -> dict:
        """What a run directory's config.json records about the data."""
        return {"task": self.task, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "seed": self.seed,
                **self.task_kwargs}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.task_kwargs.items())
        return f"TaskData({self.task!r}, vocab_size={self.vocab_size}, seq_len={self.seq_len}, seed={self.seed}{extra})"


def answer_correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, T] bool: the argmax of `logits [B, T, V]` equals the target at an answer position
    (False everywhere off `batch.mask`)."""
    targets, mask = batch.targets.to(logits.device), batch.mask.to(logits.device)
    return (logits.argmax(dim=-1) == targets) & mask


def masked_accuracy(logits: torch.Tensor, batch: Batch) -> float:
    """Fraction of answer positions (`batch.mask`) where argmax `logits [B, T, V]` is the target."""
    return answer_correct(logits, batch).sum().item() / max(1, int(batch.mask.sum()))


def exact_match(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] bool: every answer position of the sequence is right (a whole string copied, every
    MQAR query answered)."""
    correct = answer_correct(logits, batch)
    return correct.sum(dim=1) == batch.mask.to(logits.device).sum(dim=1)

"""Long-context probes: passkey retrieval, loss by token position, cost vs sequence length.

Passkey retrieval in the style of RULER (Hsieh et al. 2024): its multi-key needle-in-a-haystack
(MK-NIAH) with one distractor. Two needle sentences, each naming a key word and a number, sit at
random depths of a haystack that starts at a random offset of its source; the question names one
key, and the model must continue with that key's number:

    ...is yellow. Here we go. The pass key for walnut is 31842. There and back again. The grass is
    green. ... The pass key for harbor is 73519. The sky is blue. ... What is the pass key for
    harbor? The pass key for harbor is|73519

The distractor (another key, another number) means that copying "the only number in the context"
or "the number nearest the question" does not solve it, and the random start means no absolute
position carries the answer. Two haystacks: `"noise"` repeats five short sentences (RULER's
repeated-noise haystack, the pass-key test of Mohtashami & Jaggi 2023); `"text"` walks through
real prose (`gdn_lab.data.embedded_corpus("pydoc")`, RULER's essay haystack). Every piece is
tokenized on its own and the ids concatenated, so the prompt is exactly `context_len` tokens for
any tokenizer and the needles sit on sentence boundaries.

Accuracy is scored with one teacher-forced forward pass: greedy decoding reproduces the whole
answer exactly when the argmax at every answer position is the right token, so the exact-match
rate equals that of greedy decoding; `digit_accuracy` is the teacher-forced per-token rate (per
digit with the byte tokenizer).

Also: `loss_by_position` (mean next-token loss at each position of long held-out windows),
`scan_lengths` (forward / forward+backward time and peak memory vs sequence length, out-of-memory
recorded, not raised) and `state_norm_over_context` (||S_t|| of every GDN head along a long input).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError, ModelConfig
from .data import Batch, embedded_corpus
from .env import evaluating, module_device, pick_device, pick_dtype
from .tasks import answer_correct, derive_seed, exact_match

HAYSTACKS = ("noise", "text")
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
NEEDLE = "The pass key for {key} is {passkey}."
QUESTION = "What is the pass key for {key}? The pass key for {key} is"
KEYS = ("apple", "anchor", "badger", "bamboo", "beacon", "canyon", "carrot", "castle", "cobalt", "comet",
        "copper", "cricket", "dolphin", "dragon", "ember", "falcon", "fossil", "garnet", "glacier", "hammer",
        "harbor", "hazel", "island", "jasper", "kettle", "lantern", "lemon", "locket", "magnet", "maple",
        "marble", "meadow", "mirror", "nectar", "nickel", "oyster", "parrot", "pebble", "pepper", "pigeon",
        "pillow", "planet", "pocket", "quartz", "rabbit", "raven", "ribbon", "saddle", "salmon", "silver",
        "spider", "tablet", "thistle", "timber", "tomato", "tunnel", "turtle", "velvet", "violet", "walnut",
        "willow", "window", "yellow", "zephyr")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------
# passkey / needle in a haystack
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PasskeyExample:
    """One needle-in-a-haystack prompt with distractors.

    input_ids [context_len] long: haystack with the needles inside, then the question.
    answer_ids [A] long: the passkey's tokens, the continuation the model must produce.
    needle_span: (start, end) token indices of the asked needle in `input_ids`; `key` is the key
    word it and the question name, `passkey` its number.
    depth: where the asked needle actually starts, as a fraction of the haystack tokens before it
    (the asked depth moved to the nearest sentence boundary).
    distractor_spans / distractor_keys / distractor_passkeys: the other needles (other keys, other
    numbers), at their own depths; distractor_answer_ids: each distractor's number as an answer
    (the tokens that would follow the question), to tell a wrong answer that is the distractor's.
    haystack_start: (sentence index in the haystack's source, tokens cut from that sentence's
    front): where this prompt's haystack begins.
    """

    input_ids: torch.Tensor
    answer_ids: torch.Tensor
    needle_span: tuple[int, int]
    passkey: str
    key: str
    depth: float
    haystack_len: int
    distractor_spans: tuple[tuple[int, int], ...] = ()
    distractor_keys: tuple[str, ...] = ()
    distractor_passkeys: tuple[str, ...] = ()
    haystack_start: tuple[int, int] = (0, 0)
    distractor_answer_ids: tuple[torch.Tensor, ...] = ()


def random_passkey(rng: random.Random, num_digits: int = 5) -> str:
    """A number of `num_digits` digits with no leading zero, e.g. '73519'."""
    return str(rng.randrange(10 ** (num_digits - 1), 10 ** num_digits))


@functools.lru_cache(maxsize=4)
def _text_sentences(corpus: str) -> tuple[str, ...]:
    text = " ".join(embedded_corpus(corpus).split())
    sentences = re.split(r"(?<=[.!?])\s+", text)
    keep = tuple(s for s in sentences if 20 <= len(s) <= 200 and "pass key" not in s
                 and not any(ch in s for ch in "|+*=")  # prose, not tables or code
                 and sum(ch.isalpha() or ch == " " for ch in s) >= 0.85 * len(s))
    _require(len(keep) > 100, f"corpus {corpus!r} has too few sentences for a haystack; use haystack='noise'")
    return keep


def _source(haystack: str) -> tuple[str, ...]:
    return NOISE_SENTENCES if haystack == "noise" else _text_sentences("pydoc")


def _haystack_sentences(sentences: Sequence[str], start: int) -> Iterator[str]:
    """An endless stream of haystack sentences from sentence `start` of the source, wrapping around."""
    index = start
    while True:
        yield sentences[index % len(sentences)]
        index += 1


def _split_answer(tokenizer, passkey: str) -> tuple[list[int], list[int]]:
    """Tokens of ' <passkey>' split into (prompt tail, answer): leading tokens that are only
    whitespace (a byte tokenizer's space) belong to the prompt, the rest is the answer."""
    ids = tokenizer.encode(" " + passkey)
    split = 0
    while split < len(ids) - 1 and not tokenizer.decode(ids[: split + 1]).strip():
        split += 1
    return ids[:split], ids[split:]


def shortest_prompt(tokenizer, num_digits: int = 5, distractors: int = 1) -> int:
    """The fewest prompt tokens `make_haystack` accepts for any key and `num_digits`-digit passkey:
    the needles, the question and one haystack token (plus one token of slack: a subword tokenizer
    may split the space before the answer off differently for different digits)."""
    passkey = "0" * num_digits
    tail, _ = _split_answer(tokenizer, passkey)
    needle = max(len(tokenizer.encode(" " + NEEDLE.format(key=k, passkey=passkey))) for k in KEYS)
    question = max(len(tokenizer.encode(" " + QUESTION.format(key=k))) for k in KEYS)
    return (1 + distractors) * needle + question + len(tail) + 2


def _nearest_boundary(boundaries: Sequence[int], target: float, taken: set[int]) -> int:
    """The boundary nearest `target` (ties: the earlier one), avoiding `taken` while any is free."""
    free = [b for b in boundaries if b not in taken] or list(boundaries)
    return min(free, key=lambda b: (abs(b - target), b))


def make_haystack(tokenizer, context_len: int, depth: float, passkey: str | None = None,
                  haystack: str = "noise", seed: int = 0, num_digits: int = 5, distractors: int = 1,
                  key: str | None = None) -> PasskeyExample:
    """A needle-in-a-haystack prompt of exactly `context_len` tokens.

    Layout: the haystack with the asked needle and `distractors` other needles on sentence
    boundaries, then the question, each sentence tokenized as ' ' + sentence. The asked needle
    goes on the boundary nearest to `depth` (0 = first, 1 = right before the question) of the
    haystack tokens, each distractor on another boundary at its own random depth. From `seed`:
    the key (one of `KEYS`, or `key`), the passkey (when None), the distractors' keys (never the
    asked one) and numbers (never the passkey), their depths, and where the haystack starts (a
    random sentence of its source, cut by a random number of tokens, so it may begin mid-sentence).
    None of these draws depends on `context_len` or `depth`: one seed gives the same keys, numbers
    and start at every length and depth. The haystack's last sentence is cut to make the length exact.

    >>> tokenizer = ByteTokenizer()
    >>> ex = make_haystack(tokenizer, 200, depth=0.5, passkey="73519")
    >>> ex.input_ids.shape, tokenizer.decode(ex.answer_ids.tolist())
    (torch.Size([200]), '73519')
    """
    _require(haystack in HAYSTACKS, f"haystack={haystack!r}; use one of {HAYSTACKS}")
    _require(0.0 <= depth <= 1.0, f"depth={depth} must be in [0, 1] (0 = start of the context, 1 = end)")
    _require(0 <= distractors < len(KEYS), f"distractors={distractors}; use 0 to {len(KEYS) - 1}")
    rng = random.Random(derive_seed(seed, "passkey"))
    passkey = random_passkey(rng, num_digits) if passkey is None else passkey
    _require(passkey.isdigit(), f"passkey={passkey!r} must be a string of digits")
    key = rng.choice(KEYS) if key is None else key
    others = rng.sample([k for k in KEYS if k != key], distractors)
    values: list[str] = []
    while len(values) < distractors:
        value = random_passkey(rng, len(passkey))
        if value != passkey and value not in values:
            values.append(value)
    other_depths = [rng.random() for _ in range(distractors)]
    sentences = _source(haystack)
    start_sentence, start_cut = rng.randrange(len(sentences)), rng.random()

    needle = tokenizer.encode(" " + NEEDLE.format(key=key, passkey=passkey))
    other_needles = [tokenizer.encode(" " + NEEDLE.format(key=k, passkey=v)) for k, v in zip(others, values,
                                                                                              strict=True)]
    answer_tail, answer = _split_answer(tokenizer, passkey)
    question = tokenizer.encode(" " + QUESTION.format(key=key)) + answer_tail
    fixed = len(needle) + sum(map(len, other_needles)) + len(question)
    budget = context_len - fixed
    _require(budget >= 1, f"context_len={context_len} leaves no room for a haystack around the needles and question "
                          f"({fixed} tokens); use context_len >= {fixed + 1}")

    filler: list[int] = []
    boundaries = [0]  # token offsets where a haystack sentence starts
    skip = None
    for sentence in _haystack_sentences(sentences, start_sentence):
        ids = tokenizer.encode(" " + sentence)
        if skip is None:  # the first sentence loses a random number of leading tokens
            skip = int(start_cut * len(ids))
            ids = ids[skip:]
        filler += ids
        if len(filler) >= budget:
            break
        boundaries.append(len(filler))
    filler = filler[:budget]
    boundaries.append(budget)

    cut = _nearest_boundary(boundaries, depth * budget, set())
    taken = {cut}
    inserts = [(cut, 0, needle)]
    for i, (ids, where) in enumerate(zip(other_needles, other_depths, strict=True), start=1):
        other_cut = _nearest_boundary(boundaries, where * budget, taken)
        taken.add(other_cut)
        inserts.append((other_cut, i, ids))
    ids, spans, previous = [], {}, 0
    for at, which, piece in sorted(inserts, key=lambda item: (item[0], item[1])):
        ids += filler[previous:at]
        spans[which] = (len(ids), len(ids) + len(piece))
        ids += piece
        previous = at
    ids += filler[previous:] + question
    return PasskeyExample(input_ids=torch.tensor(ids, dtype=torch.long), answer_ids=torch.tensor(answer),
                          needle_span=spans[0], passkey=passkey, key=key, depth=cut / budget, haystack_len=budget,
                          distractor_spans=tuple(spans[i] for i in range(1, distractors + 1)),
                          distractor_keys=tuple(others), distractor_passkeys=tuple(values),
                          haystack_start=(start_sentence, skip or 0),
                          distractor_answer_ids=tuple(torch.tensor(_split_answer(tokenizer, value)[1])
                                                      for value in values))


def passkey_examples(tokenizer, context_len: int, depth: float, num_samples: int, seed: int = 0,
                     haystack: str = "noise", num_digits: int = 5, distractors: int = 1) -> list[PasskeyExample]:
    """`num_samples` prompts with seeds `seed + i`: sample i carries the same keys, numbers and
    haystack start at every length and depth, so the cells of an accuracy table differ only in
    length and depth."""
    return [make_haystack(tokenizer, context_len, depth, haystack=haystack, seed=seed + i, num_digits=num_digits,
                          distractors=distractors)
            for i in range(num_samples)]


def answer_batch(examples: Sequence[PasskeyExample], pad_id: int = 0, width: int | None = None) -> Batch:
    """Teacher-forced batch: each row is the prompt then the answer, shifted by one, right-padded.

    inputs/targets [N, T] with T = width - 1 (width: the longest prompt + answer when None);
    `mask` marks the answer positions (the argmax there must be the next answer token).
    """
    rows = [torch.cat([ex.input_ids, ex.answer_ids]) for ex in examples]
    longest = max(len(r) for r in rows)
    _require(width is None or width >= longest, f"width={width} is shorter than the longest row ({longest} tokens)")
    width = width or longest
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        tokens[i, : len(row)] = row
        mask[i, len(ex.input_ids): len(row)] = True
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=mask[:, 1:])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled)


@torch.no_grad()
def score_passkey(model, examples: Sequence[PasskeyExample], batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> dict:
    """{"accuracy": exact-match rate, "digit_accuracy": answer tokens right / answer tokens,
    "distractor_rate": the share of prompts whose greedy answer is a distractor's number}.

    The distractor rate is scored like the accuracy, with a distractor's number teacher-forced in
    place of the answer (one more forward per distractor; 0 without distractors): a model that
    reads the numbers but not the key lands near 1 / (1 + distractors) on each. Exact for tokenizers
    that split the space before any number alike (the byte tokenizer does).
    `model(inputs [B, T]) -> logits [B, T, vocab]` (a gdn_lab CausalLM or anything alike).
    """
    device = module_device(model)
    exact = right = answers = distracted = 0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start: start + batch_size]
            batch = answer_batch(chunk)
            with _autocast(device, dtype):
                logits = model(batch.inputs.to(device))
            exact += int(exact_match(logits, batch).sum())
            right += int(answer_correct(logits, batch).sum())
            answers += int(batch.mask.sum())
            took_distractor = torch.zeros(len(chunk), dtype=torch.bool, device=logits.device)
            for d in range(min((len(ex.distractor_answer_ids) for ex in chunk), default=0)):
                other = answer_batch([dataclasses.replace(ex, answer_ids=ex.distractor_answer_ids[d]) for ex in chunk])
                with _autocast(device, dtype):
                    took_distractor |= exact_match(model(other.inputs.to(device)), other)
            distracted += int(took_distractor.sum())
    return {"accuracy": exact / len(examples), "digit_accuracy": right / answers,
            "distractor_rate": distracted / len(examples)}


def passkey_accuracy(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], num_samples: int = 10,
                     seed: int = 0, haystack: str = "noise", batch_size: int = 8, num_digits: int = 5,
                     dtype: torch.dtype | None = None, distractors: int = 1) -> list[dict]:
    """Passkey retrieval over a grid of context lengths x needle depths.

    Returns one record per cell: {"context_len", "depth", "haystack", "num_samples",
    "accuracy" (exact match, = greedy decoding's), "digit_accuracy", "distractor_rate"}. `batch_size` prompts go
    through the model at once; `dtype` (e.g. torch.bfloat16) runs the forward under autocast.
    """
    _require(num_samples >= 1, f"num_samples={num_samples}; use >= 1")
    records = []
    for context_len in lengths:
        for depth in depths:
            examples = passkey_examples(tokenizer, context_len, depth, num_samples, seed, haystack, num_digits,
                                        distractors)
            scores = score_passkey(model, examples, batch_size=batch_size, dtype=dtype)
            records.append({"context_len": int(context_len), "depth": float(depth), "haystack": haystack,
                            "num_samples": num_samples, **scores})
    return records


def passkey_grid(records: Sequence[dict], value: str = "accuracy") -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, grid[depth][length]) from `passkey_accuracy` records, for `gdn_lab.viz.passkey_heatmap`."""
    lengths = sorted({r["context_len"] for r in records})
    depths = sorted({r["depth"] for r in records})
    cell = {(r["context_len"], r["depth"]): r[value] for r in records}
    return lengths, depths, [[cell.get((n, d), math.nan) for n in lengths] for d in depths]


_CELL_RATES = ("accuracy", "digit_accuracy", "distractor_rate")


def average_cells(tables: Sequence[Sequence[dict]]) -> list[dict]:
    """`passkey_accuracy` records of several runs (same lengths and depths) averaged cell by cell:
    each rate ("accuracy", "digit_accuracy", "distractor_rate") is the mean over runs, "runs" how many there were."""
    _require(len(tables) >= 1, "average_cells needs at least one table of passkey_accuracy records")
    cells: dict[tuple[int, float], list[dict]] = {}
    for table in tables:
        for record in table:
            cells.setdefault((record["context_len"], record["depth"]), []).append(record)
    return [{**group[0], **{key: statistics.fmean(r[key] for r in group) for key in _CELL_RATES if key in group[0]},
             "runs": len(group)}
            for group in cells.values()]


def accuracy_by_length(records: Sequence[dict], value: str = "accuracy") -> dict[int, float]:
    """{context_len: `value` averaged over the needle depths} of `passkey_accuracy` records, by length."""
    lengths = sorted({r["context_len"] for r in records})
    return {n: statistics.fmean(r[value] for r in records if r["context_len"] == n) for n in lengths}


def render_example(tokenizer, example: PasskeyExample) -> str:
    """The prompt as text with the asked needle between '>>' marks and each distractor between
    '!!' marks (for a reader; the model sees no marks), then '|' and the answer."""
    ids = example.input_ids.tolist()
    spans = sorted([(*example.needle_span, ">>")] + [(*span, "!!") for span in example.distractor_spans])
    text, last = "", 0
    for start, end, mark in spans:
        text += tokenizer.decode(ids[last:start]) + f" {mark}" + tokenizer.decode(ids[start:end]) + f" {mark}"
        last = end
    return text + tokenizer.decode(ids[last:]) + "|" + tokenizer.decode(example.answer_ids.tolist())


class PasskeyData:
    """Passkey prompts as a training set, behind the batch-source protocol of `gdn_lab.data`.

    Every row is a prompt (`make_haystack`: a random key, `distractors` distractor needles, a
    random haystack start) followed by its answer, right-padded to exactly `seq_len` tokens after
    the shift; the loss mask covers the answer only. The prompt length is uniform in
    [min_context_len, max_context_len = seq_len + 1 - num_digits] (min_context_len None: half of
    seq_len, or the shortest prompt that holds needles and question if that is longer) and the
    needle depth uniform in [0, 1]. The length varies on purpose: trained on prompts of one fixed
    length, a transformer learned a solution tied to that length (CPU, tiny preset, rows of 128
    bytes: exact match 1.0 on 124-byte prompts, the training length, and 0.0 on 128-byte ones unless
    the needle sat right before the question). Row i of step n comes from seed (seed, "train", n, i):
    resuming at step n sees the same rows; rank r of w gets rows [r*B, (r+1)*B). `test_seed` starts
    a third stream for held-out test prompts (`score_passkey_data`).
    """

    def __init__(self, tokenizer, seq_len: int, seed: int = 0, haystack: str = "noise", num_digits: int = 5,
                 min_context_len: int | None = None, distractors: int = 1):
        _require(haystack in HAYSTACKS, f"haystack={haystack!r}; use one of {HAYSTACKS}")
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.haystack, self.num_digits, self.distractors = haystack, num_digits, distractors
        self.max_context_len = seq_len + 1 - num_digits  # an answer takes at most one token per digit
        shortest = shortest_prompt(tokenizer, num_digits, distractors)
        _require(self.max_context_len >= shortest,
                 f"seq_len={seq_len} leaves {self.max_context_len} prompt tokens; needles and question need "
                 f"{shortest}: use seq_len >= {seq_len + shortest - self.max_context_len}")
        self._min_context_len = min_context_len
        self.min_context_len = max(shortest, seq_len // 2) if min_context_len is None else min_context_len
        _require(shortest <= self.min_context_len <= self.max_context_len,
                 f"min_context_len={min_context_len} must be in [{shortest}, {self.max_context_len}] "
                 f"for seq_len={seq_len}")

    def _row(self, split: str, *index: int) -> PasskeyExample:
        rng = random.Random(derive_seed(self.seed, split, *index))
        passkey = random_passkey(rng, self.num_digits)
        context_len = rng.randint(self.min_context_len, self.max_context_len)
        return make_haystack(self.tokenizer, context_len, rng.random(), passkey, self.haystack,
                             seed=rng.randrange(2 ** 31), num_digits=self.num_digits, distractors=self.distractors)

    def _batch(self, examples: list[PasskeyExample]) -> Batch:
        return answer_batch(examples, width=self.seq_len + 1)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def test_seed(self) -> int:
        """First seed of the held-out test prompts (`passkey_examples(..., seed=test_seed)`): a
        stream of its own per data seed, so the spread over seeds covers the test prompts too."""
        return derive_seed(self.seed, "test") % 2 ** 31

    def replace(self, **changes) -> PasskeyData:
        """A copy with some settings changed, e.g. `data.replace(seed=1)` (what `gdn_lab.grid` calls)."""
        settings = {"tokenizer": self.tokenizer, "seq_len": self.seq_len, "seed": self.seed,
                    "haystack": self.haystack, "num_digits": self.num_digits,
                    "min_context_len": self._min_context_len, "distractors": self.distractors, **changes}
        return PasskeyData(**settings)

    def describe(self) -> dict:
        """What a run directory's config.json records about the data."""
        return {"task": "passkey", "seq_len": self.seq_len, "haystack": self.haystack, "num_digits": self.num_digits,
                "distractors": self.distractors, "context_len": [self.min_context_len, self.max_context_len],
                "seed": self.seed, "tokenizer": getattr(self.tokenizer, "name", None)}

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's `batch_size` rows of step `step`: inputs/targets [B, seq_len], mask on the answer."""
        _require(0 <= rank < world_size, f"rank={rank} must be in [0, world_size={world_size})")
        rows = range(rank * batch_size, (rank + 1) * batch_size)
        return self._batch([self._row("train", step, i) for i in rows])

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation batches from a seed stream training never draws from."""
        return [self._batch([self._row("val", b, i) for i in range(batch_size)]) for b in range(num_batches)]

    def __repr__(self) -> str:
        return (f"PasskeyData(seq_len={self.seq_len}, context_len={self.min_context_len}..{self.max_context_len}, "
                f"haystack={self.haystack!r}, num_digits={self.num_digits}, distractors={self.distractors}, "
                f"seed={self.seed})")


def score_passkey_data(model, data: PasskeyData, depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                       num_samples: int = 50, batch_size: int = 50) -> dict:
    """A trained model's passkey score at its training length: the score function of a `gdn_lab.grid`
    run (module level, so spawned workers can take it; bind the arguments with functools.partial).

    `num_samples` held-out prompts (seeds from `data.test_seed`) per depth in `depths`, each
    `data.max_context_len` tokens (the longest prompt of training) on the data's haystack, scored
    under the training dtype (bf16 autocast on GPUs). Returns {"exact_match", "digit_accuracy",
    "distractor_rate" (means over the depth cells; `score_passkey`), "exact_match_by_depth": {depth:
    rate}, "test_samples"}.
    """
    device = module_device(model)
    dtype = pick_dtype(device)
    cells = passkey_accuracy(model, data.tokenizer, [data.max_context_len], depths, num_samples=num_samples,
                             seed=data.test_seed, haystack=data.haystack, batch_size=batch_size,
                             num_digits=data.num_digits, dtype=None if dtype == torch.float32 else dtype,
                             distractors=data.distractors)
    return {"exact_match": statistics.fmean(c["accuracy"] for c in cells),
            "digit_accuracy": statistics.fmean(c["digit_accuracy"] for c in cells),
            "distractor_rate": statistics.fmean(c["distractor_rate"] for c in cells),
            "exact_match_by_depth": {f"{c['depth']:g}": c["accuracy"] for c in cells},
            "test_samples": num_samples * len(cells)}


def learned(exact_match_rate: float | None, threshold: float = 0.9) -> bool:
    """Whether a run learned the task at its training length: exact match >= `threshold`."""
    return exact_match_rate is not None and exact_match_rate >= threshold



# ----------------------------------------------------------------------------------------------
# loss by position
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def loss_by_position(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 1, num_windows: int | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token loss (nats) at every position of `seq_len`-token windows of `tokens`.

    tokens [N] long: held-out text, cut into consecutive windows of seq_len + 1 tokens (at most
    `num_windows`, all that fit when None), `batch_size` windows per forward. Position t's loss
    is that of predicting token t + 1 from tokens 0..t. Returns [seq_len] float32 on the CPU.
    """
    tokens = torch.as_tensor(tokens).flatten()
    available = (len(tokens) - 1) // seq_len
    _require(available >= 1, f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1}; "
                             f"pass more held-out text or a shorter seq_len")
    num_windows = available if num_windows is None else min(num_windows, available)
    device = module_device(model)
    total = torch.zeros(seq_len, dtype=torch.float64)
    with evaluating(model):
        for start in range(0, num_windows, batch_size):
            windows = torch.stack([tokens[w * seq_len: w * seq_len + seq_len + 1]
                                   for w in range(start, min(start + batch_size, num_windows))]).to(device)
            with _autocast(device, dtype):
                logits = model(windows[:, :-1])
            losses = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")  # [B, T]
            total += losses.sum(0).double().cpu()
    return (total / num_windows).float()


def bucket_losses(losses: torch.Tensor, edges: Sequence[int] | None = None) -> list[dict]:
    """Per-position losses [T] averaged over position buckets [start, end).

    Default edges double: [0, 1), [1, 2), [2, 4), [4, 8), ... up to T, so the few early
    positions (little context) and the many late ones each get a readable point.
    Returns [{"start", "end", "loss"}].
    """
    T = len(losses)
    if edges is None:
        edges = [0] + [2 ** i for i in range(int(math.log2(T)) + 1) if 2 ** i < T] + [T]
    edges = sorted(set(int(e) for e in edges))
    _require(edges[0] >= 0 and edges[-1] <= T, f"bucket edges must lie in [0, {T}], got {edges}")
    return [{"start": a, "end": b, "loss": float(losses[a:b].mean())}
            for a, b in zip(edges[:-1], edges[1:], strict=True)]


# ----------------------------------------------------------------------------------------------
# cost vs sequence length
# ----------------------------------------------------------------------------------------------

def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _time_call(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median milliseconds per call, peak MiB allocated during the timed calls or None on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated(device) / 2 ** 20
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def _measure(model, vocab_size: int, seq_len: int, batch_size: int, device: torch.device, dtype: torch.dtype | None,
             backward: bool, warmup: int, repeats: int, seed: int) -> dict:
    """One model at one length: the measured fields of a `scan_lengths` record (raises on OOM)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, seq_len))
    ids = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def forward():
        with torch.no_grad(), _autocast(device, dtype):
            model(inputs, targets=targets)

    def train_step():
        with _autocast(device, dtype):
            loss = model(inputs, targets=targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    # what a first call allocates stays (the backward thread's cuBLAS workspace)
    (train_step if backward else forward)()
    measured = {"weights_mib": torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}
    measured["forward_ms"], measured["forward_peak_mib"] = _time_call(forward, device, warmup, repeats)
    if backward:
        measured["train_ms"], measured["train_peak_mib"] = _time_call(train_step, device, warmup, repeats)
    step_ms = measured["train_ms"] if backward else measured["forward_ms"]
    measured["tokens_per_s"] = batch_size * seq_len / (step_ms / 1e3)
    return measured


def scan_lengths(configs: dict[str, ModelConfig], lengths: Sequence[int], tokens_per_step: int | None = None,
                 device: str | torch.device = "auto", dtype: torch.dtype | None = None, backward: bool = True,
                 warmup: int = 2, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Forward and forward+backward time and peak memory of each model at each sequence length.

    Each config is built once (`gdn_lab.models.build_model`, weights from `seed`); the batch is
    1 sequence, or `tokens_per_step // seq_len` (at least 1) when `tokens_per_step` is set, so
    every length sees the same tokens per step. The forward runs under `torch.no_grad` and
    returns the loss only; forward+backward is a training step without the optimizer. On CUDA:
    median CUDA-event times and `torch.cuda.max_memory_allocated` (weights included); on the
    CPU: `time.perf_counter` and no memory. `dtype` (e.g. torch.bfloat16) runs both under
    autocast, as `gdn_lab.train` does.

    Returns one record per (model, length): {"model", "seq_len", "batch_size", "status"
    ('ok' | 'oom' | 'skipped': a shorter length already ran out of memory), "forward_ms",
    "forward_peak_mib", "train_ms", "train_peak_mib", "weights_mib", "tokens_per_s" (of the
    training step, or of the forward when backward=False)}; None where not measured.
    "weights_mib" is what stays allocated after one warm-up step: weights and library workspaces.
    """
    from .models import build_model

    device = pick_device(device) if isinstance(device, str) else device
    records = []
    for name, config in configs.items():
        torch.manual_seed(seed)
        model = build_model(config, device=device)
        out_of_memory = False
        for seq_len in lengths:
            batch_size = 1 if tokens_per_step is None else max(1, tokens_per_step // seq_len)
            record = {"model": name, "seq_len": int(seq_len), "batch_size": batch_size, "status": "ok",
                      "forward_ms": None, "forward_peak_mib": None, "train_ms": None, "train_peak_mib": None,
                      "weights_mib": None, "tokens_per_s": None}
            if out_of_memory:
                record["status"] = "skipped"
            else:
                try:
                    record.update(_measure(model, config.vocab_size, seq_len, batch_size, device, dtype, backward,
                                           warmup, repeats, seed))
                except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
                    if not _is_out_of_memory(err):
                        raise
                    record["status"], out_of_memory = "oom", True
                    model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            records.append(record)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def scan_ratios(records: Sequence[dict], numerator: str, denominator: str) -> list[dict]:
    """Per length, `numerator` over `denominator` for time and peak memory (None where either
    side did not run): {"seq_len", "forward_time", "train_time", "train_memory", "forward_memory"}."""
    by_key = {(r["model"], r["seq_len"]): r for r in records}
    ratios = []
    for seq_len in sorted({r["seq_len"] for r in records}):
        top, bottom = by_key.get((numerator, seq_len)), by_key.get((denominator, seq_len))
        if top is None or bottom is None:
            continue
        row = {"seq_len": seq_len}
        for ratio, field in (("forward_time", "forward_ms"), ("train_time", "train_ms"),
                             ("forward_memory", "forward_peak_mib"), ("train_memory", "train_peak_mib")):
            a, b = top[field], bottom[field]
            row[ratio] = a / b if a is not None and b else None
        ratios.append(row)
    return ratios


# ----------------------------------------------------------------------------------------------
# recurrent state along a long context
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateNorms:
    """||S_t||_F of every GDN layer and head at sampled steps.

    positions [P]: step t (0-based) after which the state was read; norms [L, H, P] for the
    model's GDN layers `layers` (indices into model.model.layers), batch row 0.
    """

    positions: torch.Tensor
    norms: torch.Tensor
    layers: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"positions": self.positions.tolist(), "layers": list(self.layers), "norms": self.norms.tolist()}


@torch.no_grad()
def state_norm_over_context(model, input_ids: torch.Tensor, num_points: int | None = 256) -> StateNorms:
    """Frobenius norm of the recurrent state S_t [K, V] of every GDN head along `input_ids`.

    input_ids [T] or [1, T]. `gdn_lab.probe.capture` recomputes every GDN layer in fp32 from the
    layer's own q, k, v, g, beta, checks the result against the layer's real output, and keeps
    ||S_t|| at every step (not the states); this keeps `num_points` evenly spaced steps (the
    first and last included; None keeps all T).
    """
    from .probe import capture

    input_ids = torch.as_tensor(input_ids)
    input_ids = (input_ids[None] if input_ids.dim() == 1 else input_ids[:1]).to(module_device(model))
    T = input_ids.shape[1]
    with evaluating(model):
        probe = capture(model, input_ids)
    if num_points is None or num_points >= T:
        steps = torch.arange(T)
    else:
        steps = torch.linspace(0, T - 1, max(2, num_points)).round().long().unique()
    layers = tuple(sorted(probe.layers))
    norms = torch.stack([probe[i].state_norm[0, steps].T for i in layers])  # [L, H, P]
    return StateNorms(positions=steps, norms=norms, layers=layers)

"""Text in, fixed-length token windows out: corpora, tokenizers, packing, a deterministic loader.

Corpora
    `embedded_corpus('pydoc')`      ~465k characters of English prose from `pydoc_data.topics`, the
                                    Python reference topics every CPython ships (PSF licence).
    `embedded_corpus('python-source')`  the .py files of the installed packages (site-packages),
                                    sorted by path: a real code corpus with no download.
    `hf_corpus(name, ...)`          any Hugging Face dataset through `datasets` (online users, Colab).

Tokenizers follow one protocol: `.encode(text) -> list[int]`, `.decode(ids) -> str`,
`.vocab_size`, `.name`. `load_tokenizer('byte')` (the offline default, 256 ids),
`load_tokenizer('bpe:4096')` (byte-level BPE trained with HF `tokenizers` on the embedded corpus,
cached on disk), or an HF tokenizer name such as `'gpt2'` (online).

`LMData` packs a 1-D token stream into windows of `seq_len + 1` tokens and serves batches as a
pure function of the step: `train_batch(step, batch_size, rank, world_size)` walks a seeded
permutation of the windows, epoch after epoch, so resuming at step n or sharding one global
batch over ranks needs no loader state.

    >>> data = lm_data("pydoc", "byte", seq_len=64)
    >>> batch = data.train_batch(step=0, batch_size=8)
    >>> batch.inputs.shape, batch.targets.shape, batch.mask.dtype
    (torch.Size([8, 64]), torch.Size([8, 64]), torch.bool)
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import sysconfig
from dataclasses import dataclass

import torch

from .config import ConfigError
from .results import atomic_path

EMBEDDED_CORPORA = ("pydoc", "python-source")
DEFAULT_MAX_CHARS = 20_000_000  # where 'python-source' and Hugging Face corpora are cut by default
DEFAULT_CACHE_DIR = pathlib.Path(os.environ.get("GDN_LAB_CACHE", pathlib.Path.home() / ".cache" / "gdn_lab"))


# ----------------------------------------------------------------------------- corpora


def embedded_corpus(name: str = "pydoc", max_chars: int | None = None) -> str:
    """Text that needs no download.

    'pydoc': the topic pages of the Python reference (`pydoc_data.topics`, shipped with every
    CPython; Python Software Foundation licence), joined in sorted topic order: ~465k chars.
    'python-source': the .py files under this interpreter's site-packages, concatenated in
    sorted order (folder by folder), each preceded by a `# file: <path>` line: deterministic for
    a given set of installed packages; ~250 MB where gdn_lab's dependencies are installed, so it
    is capped at `max_chars` (default DEFAULT_MAX_CHARS, 20M characters) and read only that far.
    """
    if name == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key].strip() for key in sorted(topics))
        return text[:max_chars] if max_chars else text
    if name == "python-source":
        return _python_source(max_chars or DEFAULT_MAX_CHARS)
    raise ConfigError(f"unknown embedded corpus {name!r}; use one of {EMBEDDED_CORPORA} or hf_corpus(...)")


def _python_source(max_chars: int) -> str:
    roots = sorted({pathlib.Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})
    pieces, total = [], 0
    for root in roots:
        for path in _sorted_py_files(root):
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            piece = f"# file: {path.relative_to(root)}\n{source}\n"
            pieces.append(piece[: max_chars - total])
            total += len(pieces[-1])
            if total >= max_chars:
                return "".join(pieces)
    return "".join(pieces)


def _sorted_py_files(root: pathlib.Path):
    """The .py files under `root`, each folder's files in name order before its sub-folders in name order."""
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        yield from (pathlib.Path(folder, name) for name in sorted(files) if name.endswith(".py"))


def hf_corpus(name: str, split: str = "train", text_field: str = "text", max_chars: int = DEFAULT_MAX_CHARS,
              streaming: bool = True, **load_kwargs) -> str:
    """The first `max_chars` characters of a Hugging Face dataset's `text_field`, records joined
    by blank lines.

    `name` is anything `datasets.load_dataset` takes (a hub name such as 'roneneldan/TinyStories'
    when online, or a builder such as 'text' with `data_files=...`), or a folder written by
    `Dataset.save_to_disk`. Streaming reads only what is needed.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("hf_corpus needs the `datasets` package: pip install datasets") from err
    if pathlib.Path(name).is_dir():
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming, **load_kwargs)
    pieces, total = [], 0
    for record in dataset:
        if text_field not in record:
            raise ConfigError(f"dataset {name!r} has no field {text_field!r}; pass text_field= one of {list(record)}")
        pieces.append(record[text_field])
        total += len(pieces[-1]) + 2
        if total >= max_chars:
            break
    return "\n\n".join(pieces)[:max_chars]


def load_corpus(corpus: str, max_chars: int | None = None) -> str:
    """An embedded corpus by name, otherwise a Hugging Face dataset name (online)."""
    if corpus in EMBEDDED_CORPORA:
        return embedded_corpus(corpus, max_chars)
    return hf_corpus(corpus, max_chars=max_chars or DEFAULT_MAX_CHARS)


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no training, no files, every text round-trips."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from HF `tokenizers` (see `train_bpe`), behind the tokenizer protocol."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


class PretrainedTokenizer:
    """A `transformers.AutoTokenizer` (e.g. 'gpt2') behind the tokenizer protocol; no special tokens added."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def train_bpe(texts: str | list[str], vocab_size: int, cache_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """Train a byte-level BPE (HF `tokenizers`) with `vocab_size` ids on `texts`, or load it from
    `cache_dir/bpe-<vocab>-<hash>.json` when this corpus and size were trained before.

    The 256 byte symbols are always in the vocabulary, so any text encodes; `vocab_size` must be
    at least 256. Default cache: $GDN_LAB_CACHE or ~/.cache/gdn_lab.
    """
    try:
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise ImportError("train_bpe needs the `tokenizers` package: pip install tokenizers") from err
    if vocab_size < 256:
        raise ConfigError(f"BPE vocab_size={vocab_size} is below the 256 byte symbols; use 'byte' or >= 256")
    texts = [texts] if isinstance(texts, str) else list(texts)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    digest.update(f"{vocab_size}/{tokenizers.__version__}".encode())
    path = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    name = f"bpe:{vocab_size}"
    if path.exists():
        return BPETokenizer(tokenizers.Tokenizer.from_file(str(path)), name)

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_chunks(texts), trainer)
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    return BPETokenizer(tokenizer, name)


def _chunks(texts: list[str], size: int = 1 << 16):
    for text in texts:
        for start in range(0, len(text), size):
            yield text[start:start + size]


def load_tokenizer(name: str = "byte", corpus: str = "pydoc", cache_dir: str | os.PathLike | None = None):
    """'byte' -> `ByteTokenizer`; 'bpe:<vocab>' -> a BPE trained on `corpus` (an embedded corpus,
    cached); anything else -> `transformers.AutoTokenizer.from_pretrained(name)` (needs the hub)."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("bpe:"):
        size = name.removeprefix("bpe:")
        if not size.isdigit():
            raise ConfigError(f"tokenizer {name!r}: write the vocabulary size as a number, e.g. 'bpe:4096'")
        return train_bpe(embedded_corpus(corpus), int(size), cache_dir)
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(f"tokenizer {name!r} needs `transformers`; use 'byte' or 'bpe:<vocab>' offline") from err
    return PretrainedTokenizer(AutoTokenizer.from_pretrained(name), name)


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One batch of next-token prediction: loss and accuracy count only where `mask`.

    inputs [B, T] long, targets [B, T] long (inputs shifted by one), mask [B, T] bool.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The three tensors on `device` (copied without blocking when it is a GPU)."""
        non_blocking = torch.device(device).type == "cuda"
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.inputs, self.targets, self.mask)))

    def split(self, rows: int) -> list[Batch]:
        """Consecutive micro-batches of `rows` sequences each (the last may be shorter)."""
        parts = zip(self.inputs.split(rows), self.targets.split(rows), self.mask.split(rows), strict=True)
        return [Batch(*part) for part in parts]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=generator)


class LMData:
    """A token stream packed into windows of `seq_len + 1` tokens, split into train and val windows.

    Window i covers tokens [i*seq_len, (i+1)*seq_len + 1): inputs are its first `seq_len`
    tokens, targets its last `seq_len`. Every position is scored (mask all True): packing leaves
    no padding. Every round(1/val_fraction)-th window is a validation window (every 20th at
    0.05), so validation samples the whole corpus rather than its last topic or file; train
    and val share at most the one token where neighbouring windows meet.

    Batches follow the batch-source protocol (`train_batch`, `val_batches`, `Batch`).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                 tokenizer=None):
        self.tokens = torch.as_tensor(tokens, dtype=torch.long)
        if self.tokens.ndim != 1:
            raise ConfigError(f"LMData wants a 1-D token stream, got shape {tuple(self.tokens.shape)}; flatten it")
        if not 0 <= val_fraction <= 0.5:
            raise ConfigError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be a positive integer, got {seq_len}")
        self.seq_len, self.seed, self.tokenizer = seq_len, seed, tokenizer
        windows = torch.arange((len(self.tokens) - 1) // seq_len)
        is_val = (windows % round(1 / val_fraction) == 0) if val_fraction > 0 else torch.zeros_like(windows).bool()
        self.train_windows, self.val_windows = windows[~is_val], windows[is_val]
        if len(self.train_windows) < 1 or (val_fraction > 0 and len(self.val_windows) < 1):
            raise ConfigError(f"{len(self.tokens)} tokens make {len(windows)} windows of seq_len + 1 = {seq_len + 1}, "
                              f"too few for a train and a val split; use a shorter seq_len or a bigger corpus")

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, else the largest token id + 1."""
        if self.tokenizer is not None:
            return self.tokenizer.vocab_size
        return int(self.tokens.max()) + 1

    def _windows(self, index: torch.Tensor) -> Batch:
        windows = self.tokens[index[:, None] * self.seq_len + torch.arange(self.seq_len + 1)]
        inputs, targets = windows[:, :-1], windows[:, 1:]
        return Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool))

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Rows [step*batch_size, (step+1)*batch_size) of the endless order of train windows
        (a fresh seeded shuffle each epoch); rank r of `world_size` takes the r-th contiguous
        block of batch_size/world_size rows, so the ranks' blocks stacked in rank order are the
        single-process batch. Tensors [batch_size/world_size, seq_len]."""
        if batch_size % world_size:
            raise ConfigError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        per_rank, num_windows = batch_size // world_size, len(self.train_windows)
        rows = step * batch_size + rank * per_rank + torch.arange(per_rank)
        order = torch.stack([_epoch_order(self.seed, int(row) // num_windows, num_windows)[int(row) % num_windows]
                             for row in rows])
        return self._windows(self.train_windows[order])

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """The first `batch_size * num_batches` validation windows in corpus order (fewer when the
        split is smaller), as batches of `batch_size`: the same sequences for every caller."""
        index = self.val_windows[:batch_size * num_batches]
        return self._windows(index).split(batch_size) if len(index) else []

    def describe(self) -> dict:
        """What a run directory's config.json records about the data."""
        return {"seq_len": self.seq_len, "seed": self.seed, "tokens": len(self.tokens),
                "train_windows": len(self.train_windows), "val_windows": len(self.val_windows),
                "tokenizer": getattr(self.tokenizer, "name", None), "vocab_size": self.vocab_size}


def lm_data(corpus: str = "pydoc", tokenizer: str = "byte", seq_len: int = 256, val_fraction: float = 0.05,
            seed: int = 0, max_chars: int | None = None) -> LMData:
    """Corpus -> tokenizer -> `LMData` in one call; the tokenizer rides along as `data.tokenizer`.

    `corpus`: 'pydoc', 'python-source' or a Hugging Face dataset name. `tokenizer`: see
    `load_tokenizer` ('bpe:<vocab>' trains on `corpus` when it is an embedded one, else on pydoc).
    """
    text = load_corpus(corpus, max_chars)
    tok = load_tokenizer(tokenizer, corpus=corpus if corpus in EMBEDDED_CORPORA else "pydoc")
    if isinstance(tok, ByteTokenizer):  # the same ids as tok.encode, without a Python int per byte
        tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    else:
        tokens = torch.tensor(tok.encode(text), dtype=torch.long)
    return LMData(tokens, seq_len, val_fraction, seed, tokenizer=tok)


class PrefetchedBatches:
    """`data.train_batch(step, batch_size, rank, world_size)` one step ahead, in a background thread:
    while the GPU runs step s, the host builds batch s+1. Batches are pure functions of the step, so
    the batches and their order are those of calling `train_batch` in the loop; only the time differs
    (notebook 02's MQAR batches take ~12 ms of one CPU core, a graphed step of its model a few ms).

        with PrefetchedBatches(data, 32, last_step=1000) as batches:
            for step in range(start, 1000):
                batch = batches.get(step)

    `get(step)` returns the batch of `step` (built here if it was not the one prefetched) and starts
    building `step + 1` unless that is `last_step`; an error in the thread is raised by the `get`
    that wanted its batch. `enabled=False` builds every batch in the caller's thread.
    """

    def __init__(self, data, batch_size: int, rank: int = 0, world_size: int = 1, last_step: int | None = None,
                 enabled: bool = True):
        import concurrent.futures

        self._build = functools.partial(_train_batch, data, batch_size, rank, world_size)
        self._last_step = last_step
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gdn_lab-batches")
                      if enabled else None)
        self._pending: tuple[int, concurrent.futures.Future] | None = None

    def get(self, step: int) -> Batch:
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == step else self._build(step)
        if self._pool is not None and (self._last_step is None or step + 1 < self._last_step):
            self._pending = (step + 1, self._pool.submit(self._build, step + 1))
        return batch

    def close(self) -> None:
        """Stop prefetching (a batch being built finishes in the background and is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending = None

    def __enter__(self) -> PrefetchedBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _train_batch(data, batch_size: int, rank: int, world_size: int, step: int) -> Batch:
    return data.train_batch(step, batch_size, rank, world_size)

"""gdn_lab.data: offline corpora, tokenizers, packing and the deterministic batch source."""
import pytest
import torch

from gdn_lab.config import ConfigError
from gdn_lab.data import (
    Batch,
    ByteTokenizer,
    LMData,
    embedded_corpus,
    hf_corpus,
    lm_data,
    load_tokenizer,
    train_bpe,
)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Gated DeltaNet: S_t = α_t (I − β_t k kᵀ) S_{t-1} ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and tok.name == "byte"
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_pydoc_corpus_is_embedded_prose():
    text = embedded_corpus("pydoc")
    assert 400_000 < len(text) < 600_000
    assert "assignment statement" in text.lower()
    assert embedded_corpus("pydoc", max_chars=1000) == text[:1000]


def test_python_source_corpus_is_capped_and_deterministic():
    first = embedded_corpus("python-source", max_chars=50_000)
    assert len(first) == 50_000
    assert first.startswith("# file: ") and "def " in first
    assert embedded_corpus("python-source", max_chars=50_000) == first


def test_unknown_corpus_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown embedded corpus") as err:
        embedded_corpus("wikipedia")
    assert "\n" not in str(err.value)


def test_bpe_trains_round_trips_and_is_cached(tmp_path):
    text = embedded_corpus("pydoc", max_chars=60_000)
    tok = train_bpe(text, 320, tmp_path)
    cached = list(tmp_path.glob("bpe-320-*.json"))
    assert tok.vocab_size == 320 and tok.name == "bpe:320" and len(cached) == 1
    sample = "The return statement leaves the function. ünïcode ✓"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(tok.encode(text[:5000])) < 0.8 * len(text[:5000].encode())  # merges compress
    mtime = cached[0].stat().st_mtime_ns
    again = train_bpe(text, 320, tmp_path)  # loaded, not retrained
    assert cached[0].stat().st_mtime_ns == mtime and again.encode(sample) == ids
    assert len(list(tmp_path.glob("bpe-320-*.json"))) == 1
    train_bpe(text[:-1], 320, tmp_path)  # another corpus is another cache entry
    assert len(list(tmp_path.glob("bpe-320-*.json"))) == 2


def test_load_tokenizer_names(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = load_tokenizer("bpe:300", cache_dir=tmp_path)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("lambda x: x")) == "lambda x: x"
    for bad in ("bpe:many", "bpe:100"):
        with pytest.raises(ConfigError) as err:
            load_tokenizer(bad, cache_dir=tmp_path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_corpus_reads_a_local_text_dataset(tmp_path, streaming):
    lines = [f"line {i}: the quick brown fox" for i in range(50)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    text = hf_corpus("text", data_files=str(path), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    assert text == "\n\n".join(lines)
    capped = hf_corpus("text", data_files=str(path), streaming=streaming, max_chars=100,
                       cache_dir=str(tmp_path / "cache"))
    assert capped == text[:100]


def test_hf_corpus_reads_a_saved_dataset_and_names_missing_fields(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "saved"))
    assert hf_corpus(str(tmp_path / "saved"), text_field="body") == "alpha\n\nbeta"
    with pytest.raises(ConfigError, match=r"no field 'text'.*\['body'\]"):
        hf_corpus(str(tmp_path / "saved"))


def _stream(n: int = 1000) -> torch.Tensor:
    return torch.arange(n) % 97


def test_windows_are_shifted_slices_of_the_stream():
    data = LMData(_stream(), seq_len=16, val_fraction=0.1)
    batch = data.train_batch(0, 4)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (4, 16)
    assert batch.mask.all() and batch.inputs.dtype == torch.long
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for row in range(4):
        start = int(batch.inputs[row, 0])
        assert torch.equal(batch.inputs[row], (torch.arange(16) + start) % 97)  # contiguous text


def test_train_batch_is_a_pure_function_and_walks_epochs():
    data = LMData(_stream(), seq_len=16, val_fraction=0.1, seed=3)
    assert torch.equal(data.train_batch(5, 4).inputs, data.train_batch(5, 4).inputs)
    assert not torch.equal(data.train_batch(5, 4).inputs, LMData(_stream(), 16, 0.1, seed=4).train_batch(5, 4).inputs)
    n = len(data.train_windows)
    assert n == 55 and len(data.val_windows) == 7  # 62 windows, every 10th (0, 10, .., 60) held out
    starts = torch.cat([data.train_batch(step, 5).inputs[:, 0] for step in range(n // 5)])
    train_starts = (data.train_windows * 16) % 97
    assert sorted(starts.tolist()) == sorted(train_starts.tolist())  # one epoch = every window once
    assert not torch.equal(data.train_batch(0, n).inputs, data.train_batch(1, n).inputs)  # reshuffled


def test_rank_blocks_stack_into_the_global_batch():
    data = LMData(_stream(), seq_len=16, val_fraction=0.1)
    for step in (0, 7, 30):  # 30 * 8 rows runs into the fifth epoch
        whole = data.train_batch(step, 8)
        parts = [data.train_batch(step, 8, rank, 4) for rank in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
    with pytest.raises(ConfigError, match="not divisible by world_size=3"):
        data.train_batch(0, 8, 0, 3)


def test_val_windows_are_fixed_and_disjoint_from_train():
    data = LMData(torch.arange(4000), seq_len=8, val_fraction=0.05)
    assert set(data.val_windows.tolist()).isdisjoint(data.train_windows.tolist())
    batches = data.val_batches(batch_size=5, num_batches=3)
    assert [len(b) for b in batches] == [5, 5, 5]
    assert torch.equal(batches[0].inputs[:, 0], data.val_windows[:5] * 8)
    assert len(data.val_batches(50, 100)) == 1 and len(data.val_batches(50, 100)[0]) == len(data.val_windows)


def test_lmdata_rejects_what_cannot_work():
    for kwargs, message in [({"tokens": torch.zeros(2, 50, dtype=torch.long), "seq_len": 8}, "1-D"),
                            ({"tokens": _stream(20), "seq_len": 16}, "too few"),
                            ({"tokens": _stream(), "seq_len": 8, "val_fraction": 0.9}, "val_fraction")]:
        with pytest.raises(ConfigError, match=message) as err:
            LMData(**kwargs)
        assert "\n" not in str(err.value)


def test_batch_split_and_to():
    batch = LMData(_stream(), seq_len=16, val_fraction=0.1).train_batch(0, 6)
    parts = batch.split(4)
    assert [len(p) for p in parts] == [4, 2]
    assert torch.equal(torch.cat([p.targets for p in parts]), batch.targets)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.inputs, batch.inputs)


def test_lm_data_helper_carries_its_tokenizer():
    data = lm_data("pydoc", "byte", seq_len=64, max_chars=20_000)
    assert data.vocab_size == 256 and data.tokenizer.name == "byte"
    corpus = embedded_corpus("pydoc", max_chars=20_000).encode("utf-8")
    assert bytes(data.train_batch(0, 2).inputs[0].tolist()) in corpus
    assert data.describe()["tokens"] == len(corpus)
    # the byte fast path gives the tokenizer's own ids, non-ASCII text included (pydoc has some)
    assert any(b >= 128 for b in corpus)
    assert torch.equal(data.tokens, torch.tensor(data.tokenizer.encode(corpus.decode("utf-8"))))


def test_prefetched_batches_are_the_loop_batches_in_order():
    from gdn_lab.data import PrefetchedBatches

    class Recording:
        def __init__(self):
            self.asked = []

        def train_batch(self, step, batch_size, rank=0, world_size=1):
            self.asked.append(step)
            if step == 7:
                raise ValueError("no batch 7")
            return (step, batch_size, rank, world_size)

    source = Recording()
    with PrefetchedBatches(source, 4, rank=1, world_size=2, last_step=6) as batches:
        assert [batches.get(s) for s in range(3, 6)] == [(s, 4, 1, 2) for s in range(3, 6)]
        assert batches._pending is None  # nothing built beyond last_step
    assert source.asked == [3, 4, 5]  # each once, in order
    with PrefetchedBatches(source, 4) as batches:
        assert batches.get(0) == (0, 4, 0, 1) and batches.get(6) == (6, 4, 0, 1)  # a jump builds here
        with pytest.raises(ValueError, match="no batch 7"):  # the thread's error, raised where it is wanted
            batches.get(7)
    off = PrefetchedBatches(Recording(), 2, enabled=False)
    assert off.get(1) == (1, 2, 0, 1) and off._pending is None

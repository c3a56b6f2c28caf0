"""GPU: the CUDA-graph decode step gives the plain path's greedy tokens; a short decode benchmark.

Run on a CUDA machine: `pytest -m gpu tests/test_gpu_decode.py -s` (prints the latency table).
"""
from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

from gdn_lab.config import get_preset
from gdn_lab.generate import CapturedDecoder, generate
from gdn_lab.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]



def prompts(lengths=(37, 5, 64, 100), vocab_size=1024, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def small_model(pattern, dtype: torch.dtype, backend: str = "auto"):
    """256d x 4 layers, GDN 4 heads x 64, attention 4 heads x 64, vocab 1024."""
    torch.manual_seed(0)
    config = get_preset("fla-tiny").model.replace(num_layers=4, vocab_size=1024, attn_layers=pattern,
                                                  attn_num_heads=4, backend=backend)
    return build_model(config).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("pattern, dtype, backend", [
    ("gdn", torch.bfloat16, "auto"), ("gdn", torch.float32, "auto"), ("gdn", torch.float32, "torch"),
    ((1, 3), torch.float32, "auto"), ("transformer", torch.float32, "auto"),
], ids=["gdn-bf16", "gdn-fp32", "gdn-torch-backend", "hybrid-fp32", "transformer-fp32"])
def test_captured_greedy_tokens_match_plain_on_cuda(pattern, dtype, backend):
    model = small_model(pattern, dtype, backend)
    batch = prompts()
    plain = generate(model, batch, max_new_tokens=32, temperature=0)
    decoder = CapturedDecoder(model, batch_size=len(batch), max_len=100 + 32)
    assert decoder.graph is not None
    captured = generate(model, batch, max_new_tokens=32, temperature=0, captured=decoder)
    assert captured == plain
    if dtype == torch.float32:  # bf16: padding changes the kernels' rounding (gates inside vs outside the kernel)
        alone = [generate(model, [p], max_new_tokens=32, temperature=0, captured=True)[0] for p in batch]
        assert alone == plain
    sampled = dict(max_new_tokens=32, temperature=0.9, top_p=0.95, seed=5)
    assert generate(model, batch, captured=decoder, **sampled) == generate(model, batch, **sampled)


def test_short_decode_benchmark(tmp_path, record_property):
    """The benchmark at 128 and 4k context, batch 1: captured beats plain and stays flat in context."""
    benchmark = load_benchmark("decode")
    results = benchmark.main(["--contexts", "128", "4096", "--batch-sizes", "1", "--steps", "32", "--warmup", "4",
                              "--max-batch-context", "0", "--out", str(tmp_path / "decode.json")])
    records = results["records"]
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    ms = {(r["model"], r["path"], r["context"]): r["ms_per_token"] for r in records}
    for key, value in ms.items():
        record_property("ms_per_token " + "/".join(map(str, key)), round(value, 3))
    for context in (128, 4096):
        assert ms["gdn", "captured", context] < ms["gdn", "plain", context]
        assert ms["transformer", "captured", context] < ms["transformer", "plain", context]
    assert ms["gdn", "captured", 4096] <= 1.3 * ms["gdn", "captured", 128]
    assert (tmp_path / "decode.json").exists()

"""gdn_lab's fla backend against its torch backend and against FLA itself.

The GPU tests (marked `gpu`, skipped without CUDA) run benchmarks/parity.py and hold every
judged quantity to FLA's tolerances, check decoding and left padding on the fla backend, and
compare logits with FLA's GatedDeltaNetForCausalLM. One CPU test runs the script's smoke mode.
"""
from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

from gdn_lab.config import ModelConfig
from gdn_lab.layers import GatedDeltaNet
from gdn_lab.models import build_model, to_fla
from gdn_lab.ops import FLA_OUTPUT_TOL, relative_rmse
from gdn_lab.results import load_json

MAX_SLOWDOWN = 1.15  # gdn_lab's fla backend vs FLA's own model, training-step time (CUDA-graphed, as train runs it)
MAX_EXTRA_KERNELS = 1.01  # kernels launched per training step, gdn_lab's fla backend vs FLA's model
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def parity_module():
    return load_benchmark("parity")


def failures(results: dict) -> list[str]:
    """One line per judged quantity over its tolerance."""
    lines = []
    for c in results["comparisons"]:
        for name, q in c["quantities"].items():
            if c["judged"] and not q["pass"]:
                lines.append(f"{c['implementation']} {c['dtype']} vs {c['vs']}: {name} rel RMSE "
                             f"{q['rel_rmse']:.2e} > {q['tolerance']:.0e}")
    return lines


def test_parity_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "parity.json"
    assert parity_module().main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    payload = load_json(out)
    results = payload["results"]
    assert payload["environment"]["device"] == "cpu" and payload["config"]["smoke"]
    recurrent = next(c for c in results["comparisons"] if c["implementation"] == "gdn_lab-torch-recurrent")
    assert recurrent["pass"] and recurrent["quantities"]["output"]["rel_rmse"] < 1e-5
    assert {"output", "grad:x", "grad:A_log", "grad:dt_bias", "grad:b_proj.weight",
            "grad:q_conv1d.weight", "grad:o_norm.weight"} <= set(recurrent["quantities"])
    assert {s["implementation"] for s in results["skipped"]} == {"gdn_lab-fla", "fla-layer"}
    assert not failures(results)


@gpu
@needs_cuda
def test_parity_script_meets_fla_tolerances(tmp_path):
    out = tmp_path / "parity.json"
    parity = parity_module()
    parity.main(["--out", str(out)])
    results = load_json(out)["results"]
    assert not results["skipped"], results["skipped"]
    problems = failures(results)
    assert not problems, "\n".join(problems)
    # Step time is held where gdn_lab.train runs the step on one GPU, from a CUDA graph. Eager, this
    # B2 x T2048 step is bound by the host's launch time (~130 ms for ~20 ms of kernels on the H100
    # machine), which the eager timings record but which measures the host, not the kernels.
    model_ms, profiles = results["model_train_step_ms"], results["model_step_profile"]
    assert model_ms["gdn_lab-fla autocast+graph"] <= MAX_SLOWDOWN * model_ms["fla-model autocast+graph"], model_ms
    for regime in parity.REGIMES:
        ours, theirs = f"gdn_lab-fla {regime}", f"fla-model {regime}"
        assert profiles[ours]["kernels"] <= MAX_EXTRA_KERNELS * profiles[theirs]["kernels"], {
            name: profile["kernels"] for name, profile in profiles.items()}


@gpu
@needs_cuda
@torch.no_grad()
def test_fla_backend_decoding_matches_torch_backend():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, hidden_size=128, num_layers=3, num_heads=2, head_dim=32, attn_layers=(1,),
                         backend="fla")
    model = build_model(config, device="cuda").eval()
    ids = torch.randint(0, 100, (2, 150), device="cuda")
    full = model(ids)
    cache = model.new_cache(2, max_len=160)
    pieces = [model(ids[:, :100], cache=cache), model(ids[:, 100:140], cache=cache)]
    pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(140, 150)]
    assert relative_rmse(torch.cat(pieces, 1), full) < FLA_OUTPUT_TOL
    model.set_backend("torch")
    assert relative_rmse(full, model(ids)) < FLA_OUTPUT_TOL


@gpu
@needs_cuda
@torch.no_grad()
def test_fla_backend_left_padding_is_exact():
    torch.manual_seed(0)
    layer = GatedDeltaNet(64, 2, 32, backend="fla").cuda()
    lengths = (80, 13, 1)
    x = torch.randn(3, 80, 64, device="cuda")
    mask = torch.arange(80, device="cuda")[None, :] >= 80 - torch.tensor(lengths, device="cuda")[:, None]
    state = layer.empty_state(3)
    y, _ = layer(x, state, mask)
    step = torch.randn(3, 1, 64, device="cuda")
    y_step, _ = layer(step, state)
    for i, n in enumerate(lengths):
        alone = layer.empty_state(1)
        expected, _ = layer(x[i:i + 1, 80 - n:], alone)
        assert relative_rmse(y[i, 80 - n:], expected[0]) < FLA_OUTPUT_TOL
        assert relative_rmse(y_step[i], layer(step[i:i + 1], alone)[0][0]) < FLA_OUTPUT_TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_loss_match_fla_model(dtype):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, head_dim=32, backend="fla")
    model = build_model(config, device="cuda").to(dtype)
    fla_model = to_fla(model)
    ids = torch.randint(0, 1000, (2, 257), device="cuda")
    with torch.no_grad():
        ours = model(ids[:, :-1])
        theirs = fla_model(input_ids=ids[:, :-1]).logits.float()
        assert relative_rmse(ours, theirs) < FLA_OUTPUT_TOL
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        fla_loss = fla_model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - fla_loss.item()) < 1e-2 * fla_loss.item()

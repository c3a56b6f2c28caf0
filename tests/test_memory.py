"""Activation memory by module (gdn_lab.memory): exact bytes on a net whose saves are known, and the
properties a breakdown of the real models must have."""
import doctest

import pytest
import torch
from torch import nn

from gdn_lab import memory
from gdn_lab.config import ModelConfig
from gdn_lab.memory import NO_MODULE, bytes_per_token, over_layers, saved_for_backward
from gdn_lab.models import build_model


def test_doctests():
    assert doctest.testmod(memory).failed == 0


def test_each_saved_storage_counts_once_for_the_module_that_saved_it_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 5, 8)
    saved = saved_for_backward(net, lambda: (net(x) ** 2).mean(), tokens=10)
    # Linear 0 keeps its input (10 x 8 fp32); ReLU its output (10 x 16), which Linear 2 keeps too (one
    # storage, counted once); the square, outside every module, keeps net(x) (10 x 4); weights are not counted
    assert saved.by_module == {"0": 10 * 8 * 4, "1": 10 * 16 * 4, NO_MODULE: 10 * 4 * 4}
    assert saved.total == 10 * (8 + 16 + 4) * 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # the hooks are gone


def test_the_measured_graph_is_freed():
    """What the pass saved is freed when it returns (handing autograd back the very tensors it saved kept each
    graph alive in a reference cycle gc cannot see), also when the pass saved nothing."""
    import gc
    import weakref

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    outputs = []  # ReLU saves its own output for the backward
    net[1].register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    saved = saved_for_backward(net, lambda: net(x).sum(), tokens=4)
    gc.collect()
    assert saved.by_module["1"] == 4 * 16 * 4 and outputs and outputs[0]() is None
    with torch.no_grad():
        assert saved_for_backward(net, lambda: net(x), tokens=4).total == 0


def test_the_hooks_go_when_the_pass_raises():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RuntimeError):
        saved_for_backward(net, lambda: net(torch.randn(2, 3)), tokens=2)  # 3 features into a 4-wide layer
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("layers", ["gdn", "transformer"])
def test_model_breakdown_grows_linearly_with_the_tokens_and_leaves_the_output_alone(layers):
    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, attn_num_heads=2,
                         attn_layers=layers, backend="torch")
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, 256, (2, 513))
    expected = model(ids[:, :256], targets=ids[:, 1:257])

    def measure(length: int):
        return saved_for_backward(model, lambda: model(ids[:, :length], targets=ids[:, 1:length + 1]),
                                  tokens=2 * length)

    # from two chunks of 64 up (one chunk takes another path through the chunked recurrence)
    small, middle, large = measure(128), measure(256), measure(512)
    assert bytes_per_token(small, middle) == bytes_per_token(middle, large)  # what grows, grows linearly
    per_token = bytes_per_token(small, large)
    assert per_token["model.layers.0.attn"] == per_token["model.layers.1.attn"] > 0  # two equal layers
    assert sum(per_token.values()) == (large.total - small.total) / (large.tokens - small.tokens)
    summed = over_layers(per_token)
    assert summed["model.layers.*.attn"] == 2 * per_token["model.layers.0.attn"]
    # the cross-entropy keeps the fp32 log-probabilities: 256 x 4 bytes per token, in the model's own forward
    assert per_token[""] >= 256 * 4
    assert torch.equal(model(ids[:, :256], targets=ids[:, 1:257]), expected)

"""Tests for ppo_rlhf.onednn: oneDNN float32 linear layers agree with torch's, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppo_rlhf import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN linear not available here")


@pytest.fixture(autouse=True)
def enabled():
    onednn.set_enabled(True)
    yield
    onednn.set_enabled(True)


@pytest.fixture
def calls(monkeypatch):
    """Counts products that went through oneDNN."""
    counter = {"n": 0}
    real = onednn._onednn_linear

    def counting(*args):
        counter["n"] += 1
        return real(*args)

    monkeypatch.setattr(onednn, "_onednn_linear", counting)
    return counter


def make_layer(kind: str, n_in: int, n_out: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(n_in, n_out, bias=bias)
    layer = Conv1D(n_out, n_in)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


# (kind, bias, in, out): wide and narrow layers of both kinds.
@pytest.mark.parametrize("kind, bias, n_in, n_out", [
    ("linear", True, 96, 160), ("linear", False, 96, 160), ("conv1d", True, 96, 160),
    ("linear", True, 320, 24), ("conv1d", True, 320, 24),
])
def test_forward_and_backward_match_torch(kind, bias, n_in, n_out, calls):
    reference = make_layer(kind, n_in, n_out, bias)
    layer = copy.deepcopy(reference)
    assert onednn.use_onednn(layer) == 1
    x = torch.randn(3, 100, n_in, requires_grad=True)  # >= 300 x 96 x 24 = 2.3M multiply-adds
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert calls["n"] == 3  # forward, grad of the input, grad of the weight
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)
    assert layer.weight.grad.shape == reference.weight.grad.shape
    assert layer.weight.grad.stride() == reference.weight.grad.stride()
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-4)


def test_frozen_weight_and_input_without_grad(calls):
    layer = make_layer("linear", 128, 128)
    onednn.use_onednn(layer)
    layer.requires_grad_(False)
    x = torch.randn(200, 128, requires_grad=True)
    layer(x).sum().backward()
    assert calls["n"] == 2  # forward and grad of the input only
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(200, -1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no autograd Function: the product is called directly
        x = torch.randn(200, 128)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
    assert calls["n"] == 3


def test_small_products_disabled_and_bf16_use_torch(calls):
    layer = make_layer("linear", 64, 64)
    onednn.use_onednn(layer)
    layer(torch.randn(8, 64))  # 32K multiply-adds: below MIN_MACS
    assert calls["n"] == 0
    big = torch.randn(1024, 64)  # 4.2M multiply-adds
    onednn.set_enabled(False)
    layer(big)
    assert calls["n"] == 0
    onednn.set_enabled(True)
    layer.to(torch.bfloat16)(big.bfloat16())
    assert calls["n"] == 0
    layer.float()(big)
    assert calls["n"] == 1


def test_swap_keeps_state_dict_and_isinstance():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Conv1D(4, 8))
    keys = list(model.state_dict())
    assert onednn.use_onednn(model) == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], Conv1D)
    assert list(model.state_dict()) == keys
    assert onednn.use_onednn(model) == 0  # already switched


def test_model_logits_and_grads_agree_with_torch_default():
    """A 2-layer d=256 GPT-2 with and without oneDNN: logits and every gradient."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_layer=2, n_embd=256, n_head=4, n_positions=64)
    reference = GPT2LMHeadModel(config).eval()  # no dropout
    model = copy.deepcopy(reference)
    assert onednn.use_onednn(model) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per block; lm_head
    ids = torch.randint(0, 300, (4, 48))
    out, out_ref = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_conv1d_under_bf16_autocast_casts_its_weight_once():
    """Under autocast the swapped Conv1D is Conv1D's own addmm on the stored weight, so autocast's
    weight-cast cache holds: one weight cast per region, not one (transposing) copy per call."""
    from torch.profiler import profile

    layer = make_layer("conv1d", 256, 512)
    reference = copy.deepcopy(layer)
    onednn.use_onednn(layer)
    x = torch.randn(32, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16), profile() as prof:
        outs = [layer(x) for _ in range(5)]
        expected = reference(x)
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    # 6 input casts, and one weight and one bias cast for each of the two layers.
    assert casts <= 6 + 2 + 2, casts
    for out in outs:
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expected)


@pytest.mark.parametrize("capability, vendor, expected", [
    ("AVX512", "AuthenticAMD", True),   # MKL's AVX2 path on AMD: oneDNN's AVX-512 gains ~2x
    ("AVX512", "GenuineIntel", False),  # MKL runs AVX-512 itself; oneDNN's grad products were 2x slower
    ("AVX2", "AuthenticAMD", False),    # no AVX-512: oneDNN measured slower
])
def test_path_only_where_it_measured_faster(capability, vendor, expected, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(onednn, "_cpu_vendor", lambda: vendor)
    assert onednn.pays_here() is expected

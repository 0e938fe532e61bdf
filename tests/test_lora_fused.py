"""LoRA on the q / k / v slices of a fused qkv runs as one pass (one dropout, one down and one up product) and
equals the separate branches: same weights -> same output and gradients, against W + B_p A_p written out."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from spt_core.modules.tuned import TunedLinear

D = 12


def qkv_with_lora(ranks: dict[str, int], *, dropout: float = 0.0, drop_path: float = 0.0, bits=None, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(D, 3 * D)
    layer = TunedLinear(base, {"q": D, "k": D, "v": D})
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    for part, rank in ranks.items():
        layer.add_lora(part, rank, dropout=dropout, drop_path=drop_path, bits=bits)
        with torch.no_grad():
            layer.lora[part].up.weight.normal_()  # zero at init: give the up products something to carry
    return layer


def reference(layer: TunedLinear, x: torch.Tensor) -> torch.Tensor:
    """The formula: x (W + [B_q A_q; B_k A_k; B_v A_v])^T + b, a zero block where a slice has no branch."""
    blocks = [layer.lora[p].up.weight @ layer.lora[p].down.weight if p in layer.lora else torch.zeros(rows, D)
              for p, rows in layer.parts.items()]
    return F.linear(x, layer.weight + torch.cat(blocks), layer.bias)


@pytest.mark.parametrize("ranks", [{"q": 3, "v": 3}, {"q": 2, "k": 4, "v": 1}, {"k": 2}])
def test_fused_branches_equal_the_separate_formula_output_and_gradients(ranks):
    layer = qkv_with_lora(ranks)
    layer.train()
    x = torch.randn(2, 5, D, requires_grad=True)
    upstream = torch.randn(2, 5, 3 * D)
    params = [p for p in layer.lora.parameters()]
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *params], upstream)
    x_ref = x.detach().clone().requires_grad_()
    out_ref = reference(layer, x_ref)
    grads_ref = torch.autograd.grad(out_ref, [x_ref, *params], upstream)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eval_mode_with_dropout_and_drop_path_equals_the_formula():
    layer = qkv_with_lora({"q": 4, "v": 4}, dropout=0.3, drop_path=0.2)
    layer.eval()
    x = torch.randn(3, 7, D)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_quantized_branches_equal_their_quantized_formula():
    layer = qkv_with_lora({"q": 2, "v": 2}, bits=1)
    x = torch.randn(4, D)
    blocks = [layer.lora[p].delta_weight() if p in layer.lora else torch.zeros(D, D) for p in layer.parts]
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight + torch.cat(blocks), layer.bias),
                               rtol=1e-5, atol=1e-5)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_dropout_one_drop_path_and_three_products_for_q_and_v():
    """Separate branches ran dropout on the input once per branch and two products each (5 matmuls with the
    frozen one for q + v); the fused pass runs one dropout, one drop-path and three matmuls in all."""
    layer = qkv_with_lora({"q": 4, "v": 4}, dropout=0.1, drop_path=0.1)
    layer.train()
    calls = {"dropout": 0, "drop_path": 0}
    for part in layer.lora:
        layer.lora[part].dropout.register_forward_hook(lambda *a: calls.__setitem__("dropout", calls["dropout"] + 1))
        layer.lora[part].drop_path.register_forward_hook(
            lambda *a: calls.__setitem__("drop_path", calls["drop_path"] + 1))
    counter = _CountMatmuls()
    with counter:
        out = layer(torch.randn(2, 5, D))
    assert out.shape == (2, 5, 3 * D)
    assert calls == {"dropout": 1, "drop_path": 1}
    assert counter.count == 3


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("fused", [False, True])  # True: the CUDA path (native_dropout), forced on the CPU
@pytest.mark.parametrize("amp", [False, True])
def test_branch_dropout_equals_dropout_then_product_and_keeps_a_one_byte_mask(amp, fused, monkeypatch):
    """DropoutLinear = F.linear(x * mask / (1 - p), W) with the mask it draws (re-drawn here from the same seed),
    in output and both gradients; it keeps the dropped input and a bool mask: 5 bytes an element in fp32
    where F.dropout (a float mask) and the product's saved input kept 8."""
    from spt_core.modules import lora

    DropoutLinear = lora.DropoutLinear
    monkeypatch.setattr(lora, "FUSED_DROPOUT", {"cpu"} if fused else set())
    p, w = 0.25, torch.randn(6, 64, requires_grad=True)
    x = torch.randn(8, 50, 64, requires_grad=True)
    drop = DropoutLinear(p).train()
    upstream = torch.randn(8, 50, 6)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    torch.manual_seed(5)
    with ctx:
        out = drop(x, w)
    got = torch.autograd.grad(out, (x, w), upstream.to(out.dtype))
    torch.manual_seed(5)
    mask = (torch.native_dropout(x, p, True)[1] if fused else
            torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p))
    assert 0.2 < 1 - mask.float().mean().item() < 0.3
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with ctx:
        ref = F.linear(x_ref * mask / (1 - p), w_ref)
    want = torch.autograd.grad(ref, (x_ref, w_ref), upstream.to(ref.dtype))
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-5, atol=1e-5)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, **tol)
    assert (got[0][~mask] == 0).all()
    if not amp:
        n = x.numel()
        assert _saved_bytes(lambda: drop(x, w)) == 5 * n + w.numel() * 4
        assert _saved_bytes(lambda: F.linear(F.dropout(x, p, True), w)) >= 8 * n
    assert torch.equal(DropoutLinear(p).eval()(x, w), F.linear(x, w))

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spt_core import TrainConfig, Trainer, allocate, apply_plan, uniform_lora
from spt_core.train import lr_at, param_groups
from tests.conftest import random_batches, tiny_vit
from tests.test_surgery import LAYOUT, SMAP


def run(epochs, *, resume_from=None, stop_after=None, seed=42):
    model = apply_plan(tiny_vit(drop_path_rate=0.1, seed=3), allocate(SMAP, 3000))
    cfg = TrainConfig(epochs=epochs, warmup_epochs=1, lr=5e-3, device="cpu", seed=seed)
    trainer = Trainer(model, cfg, progress=False)
    if resume_from is not None:
        trainer.load(resume_from)
    trainer.fit(random_batches(3), random_batches(2, seed=9),
                on_epoch=(lambda m: m["epoch"] >= stop_after) if stop_after else None)
    return trainer


def params_of(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_seeded_runs_are_identical_on_cpu():
    a, b = params_of(run(2)), params_of(run(2))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    c = params_of(run(2, seed=7))
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    full = run(3)
    first = run(3, stop_after=1)
    assert first.epoch == 1
    first.save(tmp_path)
    resumed = run(3, resume_from=tmp_path)
    assert resumed.epoch == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.history[-1]["val_acc"] == full.history[-1]["val_acc"]


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `int(t)`): each is a device sync on a GPU.
    Reads inside `optimizer.step` are not counted: AdamW's step counters live on the host on a GPU too."""

    def __init__(self, optimizer):
        super().__init__()
        self.count, self.paused = 0, False
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "paused", True))
        optimizer.register_step_post_hook(lambda *_: setattr(self, "paused", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default and not self.paused
        return func(*args, **(kwargs or {}))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device, batches", [("cpu", 2), ("cpu", 6), pytest.param("cuda", 3, marks=CUDA)])
def test_epoch_metrics_read_the_device_once(device, batches):
    """Loss and accuracy are summed on the device and read once per epoch (not once per step, which would
    stall a GPU every step), and still equal the per-batch sums a Python loop would form."""
    trainer = Trainer(apply_plan(tiny_vit(seed=3), allocate(SMAP, 3000)),
                      TrainConfig(epochs=1, warmup_epochs=0, device=device), progress=False)
    data = random_batches(batches)
    with _ScalarReads(trainer.optimizer) as reads:
        ev = trainer.evaluate(data)
    assert reads.count == 2
    data = [(x.to(device), y.to(device)) for x, y in data]
    with torch.no_grad():
        logits = [trainer.model(x).float() for x, _ in data]
        loss = sum(torch.nn.functional.cross_entropy(z, y, reduction="sum").item() for z, (_, y) in zip(logits, data))
    correct = sum((z.argmax(-1) == y).sum().item() for z, (_, y) in zip(logits, data))
    seen = sum(len(y) for _, y in data)
    assert ev["loss"] == pytest.approx(loss / seen, rel=1e-6) and ev["acc"] == correct / seen
    with _ScalarReads(trainer.optimizer) as reads:
        trainer.train_epoch(data)
    assert reads.count == 2


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(epochs=100, warmup_epochs=10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(cfg, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(cfg, 100) == pytest.approx(1e-5)


def test_no_weight_decay_on_vectors():
    model = apply_plan(tiny_vit(), uniform_lora(LAYOUT, rank=4))
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(no_decay["params"]) == 1  # the head bias


def test_bad_config_raises():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(lr=0)


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_run_loaders_pin_batches_only_for_a_gpu_run(device, pinned):
    """Pinned batches let the Trainer's non-blocking copies overlap the GPU's work; on a CPU they only cost."""
    from torch.utils.data import TensorDataset

    from spt_core.experiment import run_loaders

    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    train, evaluate = run_loaders(data, data, TrainConfig(batch_size=4, device=device), seed=0)
    assert train.pin_memory is pinned and evaluate.pin_memory is pinned
    assert (train.batch_size, evaluate.batch_size) == (4, 8)
    if not pinned or torch.cuda.is_available():  # pinning needs a GPU to iterate
        assert [int(y) for _, ys in evaluate for y in ys] == list(range(10))  # eval keeps file order


def test_make_optimizer_is_fused_adamw_with_the_reference_update():
    """The fused AdamW takes the same step as torch's per-tensor AdamW over the same param groups (weight decay
    on matrices only); where torch has no fused kernel it falls back to the default implementation."""
    from spt_core.train import make_optimizer

    models = [apply_plan(tiny_vit(seed=3), allocate(SMAP, 3000)) for _ in range(2)]
    fused = make_optimizer(models[0], 1e-2, 0.05)
    reference = torch.optim.AdamW(param_groups(models[1], 0.05), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    a, b = (dict(m.named_parameters()) for m in models)
    trained = [n for n, p in a.items() if p.requires_grad]
    before = {n: a[n].detach().clone() for n in trained}
    for x, y in random_batches(3):  # the same gradients into both optimizers: moments and bias correction too
        fused.zero_grad()
        torch.nn.functional.cross_entropy(models[0](x), y).backward()
        for n in trained:
            b[n].grad = a[n].grad.clone()
        fused.step()
        reference.step()
    assert trained and all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-8) for n in trained)
    assert all(not torch.equal(a[n], before[n]) for n in trained)


def test_make_optimizer_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    from spt_core.train import make_optimizer

    adamw = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = make_optimizer(tiny_vit(), 1e-3, 1e-4)
    assert isinstance(opt, adamw) and not opt.defaults["fused"]

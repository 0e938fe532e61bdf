import pytest
import torch

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

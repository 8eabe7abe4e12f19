"""Tests for der.training: seeding, atomic checkpoints, config-hash guard, logger, exact resume."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from der.training import (
    RunLogger,
    config_hash,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    write_json,
)


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1
    width: int = 8


def _setup(seed: int = 0):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(7))  # data fixed, init depends on seed
    seed_everything(seed)
    y = (x.sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, opt, sched, loader


def _loss(model, batch):
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return loss, {"acc": float((model(x).argmax(1) == y).float().mean())}


def test_seed_everything_reproduces_all_rngs():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    with pytest.raises(ValueError, match="non-negative int"):
        seed_everything(-1)


def test_config_hash_stable_and_sensitive():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(lr=0.2))
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_checkpoint_roundtrip_restores_rng_and_rejects_other_config(tmp_path):
    model, opt, sched, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, scheduler=sched, config=Cfg(), step=5, epoch=2)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic: no leftovers
    after = (random.random(), np.random.rand(), torch.rand(3))
    model2, opt2, sched2, _ = _setup(seed=1)
    info = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, config=Cfg())
    assert info["step"] == 5 and info["epoch"] == 2
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert after[0] == again[0] and after[1] == again[1] and torch.equal(after[2], again[2])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="config hash"):
        load_checkpoint(path, model=model2, config=Cfg(lr=0.5))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", model=model2, config=Cfg())


def test_logger_csv_appends_and_rejects_nan(tmp_path):
    with RunLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"loss": 0.5})
        with pytest.raises(ValueError, match="not finite"):
            log.log(2, {"loss": float("nan")})
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 0.25})
        assert log.read() == [(1, "loss", 0.5), (2, "loss", 0.25)]
    assert any((tmp_path / "tb").iterdir())
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"a": float("inf")})


def test_fit_exact_resume_after_interruption(tmp_path):
    model, opt, sched, loader = _setup()
    full = fit(model, opt, loader, _loss, epochs=3, out_dir=tmp_path / "full", config=Cfg(), scheduler=sched, progress=False,
               tensorboard=False)
    ref = [p.detach().clone() for p in model.parameters()]
    # interrupted run: 2 epochs, then a fresh process-like restart continuing to 3
    model, opt, sched, loader = _setup()
    fit(model, opt, loader, _loss, epochs=2, out_dir=tmp_path / "cut", config=Cfg(), scheduler=sched, progress=False,
        tensorboard=False)
    model, opt, sched, loader = _setup(seed=123)  # different init: everything must come from the checkpoint
    res = fit(model, opt, loader, _loss, epochs=3, out_dir=tmp_path / "cut", config=Cfg(), scheduler=sched,
              progress=False, tensorboard=False)
    assert res.resumed_from_epoch == 2 and res.step == full.step == 12
    for p, q in zip(ref, model.parameters(), strict=True):
        assert torch.equal(p, q)
    final = json.loads((tmp_path / "cut" / "final_metrics.json").read_text())
    assert final["epoch"] == 3.0 and final["config_hash"] == config_hash(Cfg())
    with pytest.raises(ValueError, match="config hash"):
        fit(model, opt, loader, _loss, epochs=3, out_dir=tmp_path / "cut", config=Cfg(width=9), progress=False,
            tensorboard=False)


def test_logger_keep_until_drops_later_rows_atomically(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": float(s)})
    with RunLogger(tmp_path, tensorboard=False, keep_until=3) as log:
        assert log.read() == [(1, "loss", 1.0), (2, "loss", 2.0), (3, "loss", 3.0)]
        log.log(4, {"loss": 0.5})
        assert log.read()[-1] == (4, "loss", 0.5) and len(log.read()) == 4
    assert not list(tmp_path.glob(".metrics.csv*.tmp"))


def test_resume_does_not_repeat_rows_of_the_interrupted_epoch(tmp_path):
    model, opt, sched, loader = _setup()
    fit(model, opt, loader, _loss, epochs=3, out_dir=tmp_path / "full", config=Cfg(), scheduler=sched, progress=False,
        tensorboard=False)
    with RunLogger(tmp_path / "full", tensorboard=False) as log:
        full_rows = [(s, k) for s, k, _ in log.read()]
    model, opt, sched, loader = _setup()
    fit(model, opt, loader, _loss, epochs=2, out_dir=tmp_path / "cut", config=Cfg(), scheduler=sched, progress=False,
        tensorboard=False)
    with RunLogger(tmp_path / "cut", tensorboard=False) as log:  # what a killed third epoch leaves behind
        log.log(9, {"loss": 1.0})
        log.log(10, {"loss": 1.0})
    model, opt, sched, loader = _setup(seed=123)
    fit(model, opt, loader, _loss, epochs=3, out_dir=tmp_path / "cut", config=Cfg(), scheduler=sched, progress=False,
        tensorboard=False)
    with RunLogger(tmp_path / "cut", tensorboard=False) as log:
        rows = [(s, k) for s, k, _ in log.read()]
    assert rows == full_rows and len(rows) == len(set(rows))

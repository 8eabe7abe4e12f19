"""Training utilities shared by the experiments and EntropyNet training.

* :func:`seed_everything` — python / numpy / torch RNGs (and CUDA when present).
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic (tmp file + ``os.replace``) checkpoints holding
  model, optimizer, scheduler, all RNG states, step/epoch and a hash of the run config; a resume with a
  different config raises ``ValueError``. Loading uses ``torch.load(weights_only=True)`` only, so every
  RNG state is stored as tensors / plain python objects.
* :class:`RunLogger` — CSV (long format ``step,key,value``, append-safe across resumes) + TensorBoard.
* :func:`write_json` — atomic JSON (one file of final metrics per run).
* :func:`fit` — a small epoch loop on HF ``accelerate`` (``accelerate launch script.py`` scales it to many
  GPUs / nodes unchanged), with tqdm progress bars, per-epoch checkpoints and exact resume: an interrupted
  run restarts after its last finished epoch and reaches bit-identical parameters on CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from der._io import atomic_write

__all__ = [
    "seed_everything",
    "config_hash",
    "save_checkpoint",
    "load_checkpoint",
    "RunLogger",
    "write_json",
    "fit",
    "FitResult",
]

CKPT_NAME = "checkpoint.pt"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``deterministic`` also asks torch for deterministic kernels."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _to_plain(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {k: _to_plain(v) for k, v in dataclasses.asdict(config).items()}
    if isinstance(config, Mapping):
        return {str(k): _to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_to_plain(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of a dataclass / mapping config serialized as sorted JSON."""
    blob = json.dumps(_to_plain(config), sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state: dict[str, Any] = {
        "python": (py[0], list(py[1]), py[2]),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # pragma: no cover
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    config: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    epoch: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint (tmp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "step": int(step),
        "epoch": int(epoch),
        "config_hash": config_hash(config),
        "config": json.dumps(_to_plain(config), sort_keys=True, default=repr),
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    config: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns ``{"step", "epoch", "extra"}``.

    Raises ``ValueError`` when the checkpoint was written by a run with another config (hash mismatch) and
    ``FileNotFoundError`` when ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    want = config_hash(config)
    if payload.get("config_hash") != want:
        raise ValueError(
            f"checkpoint {path} was written with config hash {payload.get('config_hash')} "
            f"({payload.get('config', '?')[:300]}), but this run's config hashes to {want}; "
            "use a fresh output folder or the original config"
        )
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return {"step": payload["step"], "epoch": payload["epoch"], "extra": payload["extra"]}


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN/inf rejected so no silent NaN reaches the docs)."""
    path = Path(path)
    text = json.dumps(_to_plain(obj), indent=2, sort_keys=True, allow_nan=False, default=repr)

    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(path, _w)
    return path


class RunLogger:
    """Scalar logger: ``metrics.csv`` (``step,key,value``, appended across resumes) + TensorBoard events.

    ``keep_until``: on open, drop the rows of ``metrics.csv`` logged after this step (a resumed run passes
    its checkpoint's step, so the rows of an interrupted epoch are not repeated); the file is rewritten
    atomically. ``None`` keeps every row.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, keep_until: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        if keep_until is not None and self.csv_path.exists():
            self._truncate(int(keep_until))
        new = not self.csv_path.exists()
        self._fh = open(self.csv_path, "a", newline="")
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(["step", "key", "value"])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def _truncate(self, keep_until: int) -> None:
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        kept = [r for r in body if len(r) == 3 and r[0].lstrip("-").isdigit() and int(r[0]) <= keep_until]
        if len(kept) == len(body):
            return

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([header, *kept])

        atomic_write(self.csv_path, write)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"metric {key!r} at step {step} is not finite ({v})")
            self._csv.writerow([int(step), key, repr(v)])
            if self._tb is not None:
                self._tb.add_scalar(key, v, int(step))
        self._fh.flush()

    def read(self) -> list[tuple[int, str, float]]:
        """All rows logged so far (step, key, value)."""
        self._fh.flush()
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        return [(int(s), k, float(v)) for s, k, v in rows]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: last epoch's metrics, the global step, and the epoch it resumed from."""

    metrics: dict[str, float]
    step: int
    resumed_from_epoch: int


LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]"]


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    loss_fn: LossFn,
    *,
    epochs: int,
    out_dir: str | os.PathLike,
    config: Any,
    scheduler: Any = None,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
    tensorboard: bool = True,
    cpu: bool | None = None,
    grad_clip: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs with ``accelerate``; checkpoint after every epoch; resume if possible.

    ``loss_fn(model, batch)`` returns the loss or ``(loss, {name: value})``. ``eval_fn(model)`` runs after
    every epoch (on the main process) and its metrics are logged and returned. ``on_step(global_step)``
    is called after each optimizer step (e.g. to advance a DER α/λ schedule). Writes
    ``out_dir/checkpoint.pt``, ``metrics.csv``, ``tb/`` and ``final_metrics.json``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(cpu=cpu if cpu is not None else not torch.cuda.is_available())
    ckpt = out / CKPT_NAME
    start_epoch, step = 0, 0
    if resume and ckpt.exists():
        info = load_checkpoint(ckpt, model=model, config=config, optimizer=optimizer, scheduler=scheduler)
        start_epoch, step = info["epoch"], info["step"]
    prepared = acc.prepare(model, optimizer, train_loader, *([scheduler] if scheduler is not None else []))
    pmodel, popt, ploader = prepared[:3]
    psched = prepared[3] if scheduler is not None else None
    logger = RunLogger(out, tensorboard=tensorboard, keep_until=step) if acc.is_main_process else None
    metrics: dict[str, float] = {}
    try:
        for epoch in range(start_epoch, epochs):
            pmodel.train()
            total, count = 0.0, 0
            bar = tqdm(ploader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and acc.is_main_process),
                       leave=False)
            for batch in bar:
                out_ = loss_fn(pmodel, batch)
                loss, extra = (out_, {}) if isinstance(out_, torch.Tensor) else out_
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step} (epoch {epoch})")
                popt.zero_grad(set_to_none=True)
                acc.backward(loss)
                if grad_clip is not None:
                    acc.clip_grad_norm_(pmodel.parameters(), grad_clip)
                popt.step()
                if psched is not None:
                    psched.step()
                step += 1
                if on_step is not None:
                    on_step(step)
                total += float(loss.detach())
                count += 1
                bar.set_postfix(loss=f"{total / count:.4f}")
                if logger is not None:
                    logger.log(step, {"train/loss": float(loss.detach()), **{f"train/{k}": v for k, v in extra.items()}})
            metrics = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
            if eval_fn is not None and acc.is_main_process:
                pmodel.eval()
                with torch.no_grad():
                    metrics.update({k: float(v) for k, v in eval_fn(acc.unwrap_model(pmodel)).items()})
            if logger is not None:
                logger.log(step, {f"epoch/{k}": v for k, v in metrics.items()})
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(ckpt, model=acc.unwrap_model(pmodel), optimizer=optimizer, scheduler=scheduler,
                                config=config, step=step, epoch=epoch + 1, extra={"metrics": metrics})
        if not metrics and start_epoch >= epochs:  # already finished: report the stored metrics
            payload = torch.load(ckpt, map_location="cpu", weights_only=True)
            metrics = dict(payload["extra"].get("metrics", {}))
        if acc.is_main_process:
            write_json(out / "final_metrics.json", {"config_hash": config_hash(config), "step": step, **metrics})
    finally:
        if logger is not None:
            logger.close()
    return FitResult(metrics=metrics, step=step, resumed_from_epoch=start_epoch)

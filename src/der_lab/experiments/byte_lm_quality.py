"""Byte-level LM at long context: perplexity of every layout rule at one block budget, with and without distillation.

``der exp byte-lm-quality [--quick] [--context 2048] [--seeds 0 1 2] [--sparsities 0.5 0.75]`` (issue 14's
byte-LM check): per seed, a small byte-level ``LlamaForCausalLM`` is trained on Python's stdlib sources (train/val
split by file) twice — dense, and with λ·H_diff on its keys (the paper's DER training). Then, at each sparsity, every
method converts a copy at the same block budget over the causal triangle:

* ``der/anchors``: the DER-trained model, static layouts from its anchors (the paper);
* ``static/anchors``, ``static/attention``, ``static/bigbird``: the dense model with the paper's anchor rule
  (anchors calibrated on training windows), its own calibrated attention mass, BigBird's global + window + random;
* ``dynamic/moba``, ``dynamic/anchors``: per-input layouts (mean-pooled blocks; the anchors).

Each is evaluated (validation perplexity on non-overlapping windows of held-out files, attention-mass recall of the
layouts it used, kept fraction of causal block pairs), then distilled through the sparse kernel against its dense
self (logits KL, ``der.attention.distill.fit``) for ``distill_steps`` and evaluated again. The dense model's oracle
recall (its own top blocks at the budget, per input and shared) against chance says whether the model has
structure a layout can exploit.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from der.data import ByteWindows, stdlib_corpus
from der_lab.experiments.byte_lm import evaluate
from der_lab.experiments.common import byte_llama, run_experiment, train_lm
from der_lab.experiments.minilm_distill import layout_recall, oracle_recalls

__all__ = ["METHODS", "ByteLMQualityConfig", "run", "main"]

METHODS = ("der/anchors", "static/anchors", "static/attention", "static/bigbird", "dynamic/moba", "dynamic/anchors")


@dataclasses.dataclass
class ByteLMQualityConfig:
    context: int = 2048
    block_size: int = 64
    sparsities: tuple[float, ...] = (0.5, 0.75)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 600
    batch_size: int = 4
    lr: float = 2e-3
    lam: float = 0.01
    distill_steps: int = 40
    distill_lr: float = 5e-4
    max_bytes: int = 4_000_000
    val_windows: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        self.sparsities, self.seeds, self.methods = tuple(self.sparsities), tuple(self.seeds), tuple(self.methods)
        if self.context < 4 * self.block_size:
            raise ValueError(f"context must be >= 4 blocks, got context={self.context}, block_size={self.block_size}")
        if not all(0 < s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must be in (0, 1), got {self.sparsities}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {METHODS}")

    @classmethod
    def quick(cls) -> ByteLMQualityConfig:
        return cls(context=512, block_size=64, sparsities=(0.75,), steps=20, distill_steps=2, max_bytes=400_000,
                   val_windows=4, seeds=(0,), methods=("der/anchors", "static/bigbird", "dynamic/moba"))


def _model(cfg: ByteLMQualityConfig, seed: int, lam: float):
    from der.attention import DERConfig, inject

    model = byte_llama(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, context=cfg.context)
    handle = inject(model, DERConfig(block_size=cfg.block_size, lam=lam, seq_len=cfg.context, seed=seed))
    return model, handle


def _convert(model, handle, method: str, sparsity: float, calib: list[dict], cfg: ByteLMQualityConfig):
    from der.attention import convert

    mode, rule = method.split("/")
    with torch.no_grad():
        if rule == "anchors":
            with handle.calibrate():
                for b in calib:
                    model(**b)
    return convert(model, sparsity, cfg.block_size, "dynamic" if mode == "dynamic" else "static", rule=rule,
                   min_seq_len=0, calib_inputs=calib if rule == "attention" else None)


def _batches(ds: ByteWindows, n: int, batch: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ds), (n * batch,), generator=g).tolist()
    out = []
    for i in range(n):
        x = torch.stack([ds[j][0] for j in idx[i * batch:(i + 1) * batch]])
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return out


def _summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("val_ppl", "ppl_increase_pct", "recall", "kept_causal_pairs"):
        vals = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "values": vals}
    return out


def _evaluate(model, handle, val, recall_batches, cfg, dense_ppl: float) -> dict:
    ev = evaluate(model, val, cfg.val_windows)
    recall, density = layout_recall(model, handle, recall_batches)
    return {**ev, "ppl_increase_pct": 100 * (ev["val_ppl"] / dense_ppl - 1), "recall": recall,
            "kept_causal_pairs": density}


def _seed(cfg: ByteLMQualityConfig, seed: int, corpus, run_dir: Path, res: dict, on_row) -> None:
    from der.attention import distill

    train = ByteWindows(corpus.train, cfg.context, stride=cfg.context // 4)
    val = ByteWindows(corpus.val, cfg.context)
    states = {}
    for name, lam in (("dense", 0.0), ("der", cfg.lam)):
        if name == "der" and not any(m.startswith("der/") for m in cfg.methods):
            continue
        model, handle = _model(cfg, seed, lam)
        handle.regularize = lam > 0
        train_lm(model, train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                 out=run_dir / f"{name}_seed{seed}", config=cfg, handle=handle)
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        res["dense_models"].setdefault(name, []).append({"seed": seed, **evaluate(model, val, cfg.val_windows)})
        if name == "dense":
            recall_batches = [{"input_ids": val[i][0][None], "attention_mask": torch.ones(1, cfg.context,
                                                                                           dtype=torch.long)}
                              for i in range(min(4, len(val)))]
            res["oracle"].setdefault(str(seed), oracle_recalls(model, recall_batches, cfg.sparsities,
                                                               cfg.block_size, causal=True))
        handle.remove()
    dense_ppl = res["dense_models"]["dense"][-1]["val_ppl"]
    calib = _batches(train, 8, 1, seed + 1000)
    tune = _batches(train, min(cfg.distill_steps, 20), cfg.batch_size, seed + 2000)
    for s in cfg.sparsities:
        for method in cfg.methods:
            t0 = time.perf_counter()
            model, handle = _model(cfg, seed, 0.0)
            model.load_state_dict(states["der" if method.startswith("der/") else "dense"])
            handle.regularize = False
            method_rule = "static/anchors" if method == "der/anchors" else method
            _convert(model, handle, method_rule, s, calib, cfg)
            rows = {"none": _evaluate(model, handle, val, recall_batches, cfg, dense_ppl)}
            if cfg.distill_steps:
                torch.manual_seed(seed)
                hist = distill.fit(model, tune, cfg.distill_steps, lr=cfg.distill_lr)
                rows["distill"] = _evaluate(model, handle, val, recall_batches, cfg, dense_ppl)
                rows["distill"]["train_kl_first_last"] = [hist["output"][0], hist["output"][-1]]
            for tune_name, row in rows.items():
                key = f"{method}@{s}/{tune_name}"
                res["rows"].setdefault(key, []).append({"seed": seed, **row})
                res["summary"][key] = _summary(res["rows"][key])
                print(f"seed={seed} {key}: ppl={row['val_ppl']:.3f} ({row['ppl_increase_pct']:+.2f}%) "
                      f"recall={row['recall']:.3f} kept={row['kept_causal_pairs']:.3f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            handle.remove()
            if on_row is not None:
                on_row(res)


def run(cfg: ByteLMQualityConfig, run_dir: Path, on_row=None) -> dict:
    corpus = stdlib_corpus(max_bytes=cfg.max_bytes)
    res: dict = {"corpus": {"train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
                            "train_files": len(corpus.train_files), "val_files": len(corpus.val_files)},
                 "dense_models": {}, "oracle": {}, "rows": {}, "summary": {}}
    for seed in cfg.seeds:
        _seed(cfg, seed, corpus, run_dir, res, on_row)
    dense = [r["val_ppl"] for r in res["dense_models"]["dense"]]
    res["dense"] = {"val_ppl": {"mean": statistics.fmean(dense),
                                "sd": statistics.stdev(dense) if len(dense) > 1 else 0.0, "values": dense}}
    return res


def main(argv: list[str] | None = None) -> int:
    from der_lab.harness import write_json

    def partial(cfg: ByteLMQualityConfig, run_dir: Path) -> dict:  # rows so far survive an interrupted run
        run_dir.mkdir(parents=True, exist_ok=True)
        return run(cfg, run_dir, on_row=lambda r: write_json(run_dir / "partial.json", r))

    res, path = run_experiment("byte_lm_quality", ByteLMQualityConfig, partial, argv, __doc__)
    print(f"dense ppl {res['dense']['val_ppl']['mean']:.3f} ± {res['dense']['val_ppl']['sd']:.3f}")
    print(f"{'method':<34} {'ppl +%':>14} {'recall':>7} {'kept':>6}")
    for key, s in res["summary"].items():
        print(f"{key:<34} {s['ppl_increase_pct']['mean']:>+7.2f}±{s['ppl_increase_pct']['sd']:.2f} "
              f"{s['recall']['mean']:>7.3f} {s['kept_causal_pairs']['mean']:>6.3f}")
    print(f"wrote {path}")
    return 0

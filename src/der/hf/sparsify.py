"""``der sparsify MODEL_DIR --sparsity 0.75 --out OUT_DIR``: a saved HF text model → a saved, measured,
block-sparse one, offline.

Steps (:func:`sparsify_folder`):

1. load the folder with ``HF_HUB_OFFLINE=1`` (the class named in ``config.architectures``, else
   ``AutoModel``; ``AutoTokenizer``) and keep a dense copy;
2. texts: ``--calib FILE`` (one text per line) or the built-in sample
   :func:`der.data.calibration_text`; the last ``--holdout`` fraction is held out for the report;
3. :func:`der.attention.inject` (anchors seeded from the first calibration batch) and
   :func:`der.attention.convert` (``--rule``, ``--mode``, ``--block-size``) on the calibration texts,
   padded / cut to ``--seq-len`` tokens;
4. optionally ``--distill-steps N`` of :func:`der.attention.distill.fit` against the dense model;
5. :func:`der.hf.save_pretrained` into ``--out`` (+ the tokenizer), and a report
   (``report.json`` + ``report.md``): per-layer block sparsity and attention-mass recall
   (:func:`der.attention.metrics.attention_mass_recall` of the static layouts on the dense model's
   attention over the held-out texts), quality vs dense (cosine of mean-pooled last hidden states per
   held-out text: mean and min), and end-to-end forward time vs dense (both models in this process,
   calls interleaved, median).

Vision models are not handled by this command (no image calibration sample); use the Python API.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from der._io import atomic_write
from der.attention.config import MODES, RULES, DERConfig, check_block_args, infer_seq_len

__all__ = ["sparsify_folder", "main", "REPORT_JSON", "REPORT_MD"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _progress(it: Iterable, desc: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """A tqdm bar over ``it`` when tqdm is installed (the ``exp`` extra) and ``enabled``, else ``it``."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, total=total, leave=False)


def _read_texts(calib: str | os.PathLike | None) -> list[str]:
    if calib is None:
        from der.data import calibration_text

        return calibration_text()
    path = Path(calib)
    if not path.is_file():
        raise ValueError(f"--calib {path}: not a file (one text per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--calib {path}: not UTF-8 text ({e})") from None
    return [s.strip() for s in lines if s.strip()]


def _load(model_dir: Path) -> tuple[Any, nn.Module]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    cfg = AutoConfig.from_pretrained(model_dir)
    names = list(getattr(cfg, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    model = (cls or AutoModel).from_pretrained(model_dir).eval()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{model_dir}: no tokenizer ({type(e).__name__}: {e}); der sparsify handles text models "
                         "(vision models: use der.attention.convert + der.hf.save_pretrained)") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok, model


def _batches(tok: Any, texts: Sequence[str], seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), padding="max_length", truncation=True, max_length=seq_len,
                  return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def _hidden(model: nn.Module, batch: dict, **kw: Any) -> Any:
    out = model(**batch, output_hidden_states=True, **kw)
    last = getattr(out, "last_hidden_state", None)
    return (last if last is not None else out.hidden_states[-1]), out


def _pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(h.dtype)[..., None]
    return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1).clamp_min(1), dim=-1)


def _interleaved_ms(fns: dict[str, Any], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median / min ms of each callable, calls alternating (one process, same inputs), after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in _progress(range(repeats), "timing", repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "repeats": len(v)} for k, v in times.items()}


def _attention_probs(dense: nn.Module, batches: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """The dense model's attention probabilities per held-out batch (eager attention, then back)."""
    prev = dense.config._attn_implementation or "sdpa"
    dense.set_attn_implementation("eager")
    try:
        return [dense(**b, output_attentions=True).attentions for b in batches]
    finally:
        dense.set_attn_implementation(prev)


def _call_layouts(handle: Any, batch: dict) -> dict[str, Any]:
    """The layout each converted layer computed in the last forward (recorded by the swapped attention;
    layers that ran dense have none)."""
    out = {}
    for s in handle.sites:
        last = s.extra.pop("last_layout", None)
        if last is not None:
            out[s.name] = last[0]
    return out


def _recall_sums(handle: Any, probs: tuple[torch.Tensor, ...], layouts: dict[str, Any], batch: dict,
                 acc: dict[str, list[float]]) -> None:
    """Add this batch's attention-mass recall and block sparsity of each layer's layout to ``acc``
    (``name → [kept mass, valid queries · heads... as weights, sparsity sum, batches]``)."""
    from der.attention.metrics import attention_mass_recall

    qm = batch["attention_mask"].bool()
    w = float(qm.sum())
    for i, s in enumerate(handle.sites):
        lay = layouts.get(s.name)
        if lay is None:
            continue
        p = probs[s.layer if s.layer is not None else i]
        n = p.shape[-1]
        if lay.kv_len != n:
            lay = lay.resize(n)
        sp = lay.sparsity()
        if p.shape[1] != lay.heads:
            lay = lay.repeat_heads(p.shape[1] // lay.heads)
        r = attention_mass_recall(p, lay, qm)
        a = acc.setdefault(s.name, [0.0, 0.0, 0.0, 0.0])
        a[0] += float(r.overall) * w
        a[1] += w
        a[2] += sp
        a[3] += 1


def sparsify_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, sparsity: float = 0.75,
                    rule: str = "auto", mode: str = "static", block_size: int = 16, seq_len: int = 128,
                    calib: str | os.PathLike | None = None, holdout: float = 0.25, distill_steps: int = 0,
                    distill_lr: float = 1e-5, batch_size: int = 8, repeats: int = 10, overwrite: bool = False,
                    min_seq_len: int | str = "auto", progress: bool = True) -> dict[str, Any]:
    """Load, convert, (distill), save and measure; returns the report (also written to ``out_dir``).

    See the module docstring; every argument is a ``der sparsify`` option of the same name.
    """
    from der.attention import convert, distill, inject, summary
    from der.hf.pretrained import save_pretrained

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_block_args(block_size, sparsity, mode)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    for name, v, lo in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("repeats", repeats, 1),
                        ("distill_steps", distill_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise ValueError(f"--out {out_dir} exists and is not an empty folder (pass --overwrite to write into it)")
    if not model_dir.is_dir():
        raise ValueError(f"MODEL_DIR {model_dir} is not a folder")
    texts = _read_texts(calib)
    if len(texts) < 2:
        raise ValueError(f"need at least 2 texts (calibration + held-out), got {len(texts)}")
    n_eval = max(1, math.ceil(holdout * len(texts)))
    calib_texts, eval_texts = texts[:-n_eval], texts[-n_eval:]

    t_start = time.perf_counter()
    tok, model = _load(model_dir)
    max_len = infer_seq_len(model)
    if seq_len > max_len:
        warnings.warn(f"seq_len={seq_len} is longer than the model's {max_len} positions; using {max_len}",
                      stacklevel=2)
        seq_len = max_len
    dense = copy.deepcopy(model).eval()
    calib_b = _batches(tok, calib_texts, seq_len, batch_size)
    eval_b = _batches(tok, eval_texts, seq_len, batch_size)

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        handle = inject(model, DERConfig(seq_len=seq_len, block_size=block_size, sparsity=sparsity, mode=mode))
        convert(model, sparsity, block_size, mode, rule=rule, min_seq_len=min_seq_len,
                calib_inputs=list(_progress(calib_b, "calibrating", len(calib_b), progress)))
    caught += [str(x.message) for x in w if "der" in str(x.message).lower() or "sparsity" in str(x.message)]
    for msg in caught:
        warnings.warn(msg, stacklevel=2)
    hist = None
    if distill_steps:
        bar = _progress(range(distill_steps), "distilling", distill_steps, progress)
        it = iter(bar)
        hist = distill.fit(model, calib_b, distill_steps, lr=distill_lr, on_step=lambda *_: next(it, None))
        close = getattr(bar, "close", None)
        if close:
            close()
    model.eval()

    with torch.no_grad():
        cos: list[float] = []
        acc: dict[str, list[float]] = {}
        probs = _attention_probs(dense, eval_b)
        for b, pr in zip(_progress(eval_b, "evaluating", len(eval_b), progress), probs, strict=True):
            hd, _ = _hidden(dense, b)
            hs, _ = _hidden(model, b)
            cos += (_pooled(hd, b["attention_mask"]) * _pooled(hs, b["attention_mask"])).sum(-1).tolist()
            _recall_sums(handle, pr, _call_layouts(handle, b), b, acc)
        del probs
        tb = eval_b[0]
        timing = _interleaved_ms({"dense": lambda: dense(**tb), "sparse": lambda: model(**tb)}, repeats)
    recall = {k: a[0] / a[1] if a[1] else None for k, a in acc.items()}
    call_sp = {k: a[2] / a[3] for k, a in acc.items() if a[3]}

    summ = summary(handle)
    lay_sp = summ.get("layout_sparsity") or call_sp  # dynamic: mean over the held-out calls
    layers = [{"name": s.name, "sparsity": lay_sp.get(s.name), "mass_recall": recall.get(s.name)}
              for s in handle.sites]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out_dir)
    tok.save_pretrained(str(out_dir))
    report = {
        "model_dir": str(model_dir), "out_dir": str(out_dir), "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "settings": {"sparsity": sparsity, "rule": handle.converted.rule, "mode": mode, "block_size": block_size, "seq_len": seq_len,
                     "batch_size": batch_size, "min_seq_len": min_seq_len, "distill_steps": distill_steps, "distill_lr": distill_lr,
                     "calib": str(calib) if calib is not None else "builtin:der.data.calibration_text",
                     "calib_texts": len(calib_texts), "heldout_texts": len(eval_texts)},
        "layers": layers,
        "sparsity_of": "the static layouts" if summ.get("layout_sparsity") else "the per-input layouts, mean over the held-out calls (padding blocks count as skipped)",
        "mean_sparsity": (sum(v for v in lay_sp.values()) / len(lay_sp)) if lay_sp else None,
        "mean_mass_recall": (statistics.fmean(v for v in recall.values() if v is not None)
                             if any(v is not None for v in recall.values()) else None),
        "quality": {"metric": "cosine of mean-pooled last hidden states, sparse vs dense, per held-out text",
                    "mean": statistics.fmean(cos), "min": min(cos), "n": len(cos)},
        "timing": {"what": f"one forward of {tb['input_ids'].shape[0]}x{seq_len} tokens, no grad, interleaved",
                   **{k: v for k, v in timing.items()},
                   "sparse_over_dense": timing["sparse"]["median_ms"] / timing["dense"]["median_ms"]},
        "dense_fallbacks": summ.get("dense_fallbacks", {}),
        "warnings": caught,
        "distill": None if hist is None else {"first_loss": hist["loss"][0] if hist["loss"] else None,
                                              "last_loss": hist["loss"][-1] if hist["loss"] else None,
                                              "seconds": hist["seconds"]},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "device": "cpu"},
        "seconds": time.perf_counter() - t_start,
    }
    _write(out_dir, report)
    return report


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """The short Markdown report written beside ``report.json`` (generated from it)."""
    s, q, t = report["settings"], report["quality"], report["timing"]
    lines = [
        f"# der sparsify: {report['model_class']} ({report['model_type']})",
        "",
        f"`{report['model_dir']}` → `{report['out_dir']}`; target sparsity {s['sparsity']:g}, rule `{s['rule']}`, "
        f"mode `{s['mode']}`, blocks of {s['block_size']}, {s['seq_len']} tokens; calibration {s['calib_texts']} "
        f"texts ({s['calib']}), {s['heldout_texts']} held out; distillation steps {s['distill_steps']}.",
        "",
        f"- quality vs dense ({q['metric']}): mean {q['mean']:.4f}, min {q['min']:.4f} over {q['n']} texts",
        f"- end-to-end forward ({t['what']}): dense {t['dense']['median_ms']:.1f} ms, sparse "
        f"{t['sparse']['median_ms']:.1f} ms (median of {t['dense']['repeats']}), sparse/dense "
        f"{t['sparse_over_dense']:.2f}×",
        f"- mean block sparsity {_fmt(report['mean_sparsity'])} ({report['sparsity_of']}), mean attention-mass recall "
        f"{_fmt(report['mean_mass_recall'])}; dense fallbacks {report['dense_fallbacks'] or 'none'}",
        "",
        "| layer | block sparsity | attention-mass recall |",
        "| --- | --- | --- |",
        *(f"| `{r['name']}` | {_fmt(r['sparsity'])} | {_fmt(r['mass_recall'])} |" for r in report["layers"]),
    ]
    if report["warnings"]:
        lines += ["", "Warnings:", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    def text_writer(text: str):
        return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(out_dir / REPORT_JSON, text_writer(json.dumps(report, indent=1) + "\n"))
    atomic_write(out_dir / REPORT_MD, text_writer(markdown(report)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="der sparsify", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the converted model and the report")
    p.add_argument("--sparsity", type=float, default=0.75, help="target block sparsity (default 0.75)")
    p.add_argument("--rule", choices=RULES, default="auto",
                   help="where layouts come from (default auto: the calibrated attention, or MoBA when dynamic; "
                        "the best measured, docs/quality.md)")
    p.add_argument("--mode", choices=MODES, default="static", help="frozen (static) or per-input (dynamic) layouts")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text, padded / cut (default 128)")
    p.add_argument("--calib", metavar="FILE", help="calibration text, one text per line (default: built-in sample)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of the texts held out for the report")
    p.add_argument("--distill-steps", type=int, default=0, help="steps of der.attention.distill.fit (default 0)")
    p.add_argument("--distill-lr", type=float, default=1e-5, help="learning rate of the distillation (default 1e-5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-seq-len", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="inputs shorter than this run dense (default auto: where block-sparse cannot win; 0: never)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per model (default 10)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        rep = sparsify_folder(a.model_dir, a.out, sparsity=a.sparsity, rule=a.rule, mode=a.mode,
                              block_size=a.block_size, seq_len=a.seq_len, calib=a.calib, holdout=a.holdout,
                              distill_steps=a.distill_steps, distill_lr=a.distill_lr, batch_size=a.batch_size,
                              repeats=a.repeats, overwrite=a.overwrite, min_seq_len=a.min_seq_len,
                              progress=not a.quiet)
    except ValueError as e:
        raise SystemExit(f"der sparsify: {e}") from None
    if not a.quiet:
        print(markdown(rep), end="")
    return 0

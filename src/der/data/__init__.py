"""Offline data loaders (nothing here downloads; every loader reads files you already have).

* :func:`digits_dataset` — scikit-learn's bundled 8×8 digits, upsampled so a ViT sees ≥256 patches,
  with per-patch foreground masks (for the mask–IoU experiment).
* :func:`stdlib_corpus` / :class:`ByteWindows` — byte-level text from Python's own stdlib sources,
  train/val split by file.
* :func:`cifar_dataset` (CIFAR-10/100 python pickles), :func:`imagenet_folder` (``root/<split>/<class>/*``),
  :func:`wikitext_dataset` (raw ``wiki.{train,valid,test}.raw``), :func:`glue_dataset` (GLUE TSVs),
  :func:`cnndm_dataset` (CNN/DailyMail CSV or JSONL) for the full-scale configs.
* :func:`calibration_text` — 64 short English passages shipped with the library (package data), the
  built-in calibration sample of ``der sparsify``.
"""

from der._lazy import lazy_getattr

_TABLE = {
    "digits_dataset": ".vision",
    "DigitsData": ".vision",
    "cifar_dataset": ".vision",
    "imagenet_folder": ".vision",
    "ImageFolder": ".vision",
    "stdlib_corpus": ".text",
    "ByteWindows": ".text",
    "wikitext_dataset": ".text",
    "TokenBlocks": ".text",
    "glue_dataset": ".nlp",
    "GLUE_TASKS": ".nlp",
    "cnndm_dataset": ".nlp",
    "TextPairs": ".nlp",
    "calibration_text": "._builtin",
}
__all__ = sorted(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)

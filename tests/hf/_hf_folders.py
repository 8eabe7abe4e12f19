"""Tiny HF model folders (model + a small word-piece tokenizer) saved to a temp folder, for der sparsify."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a of and to in is that it for on with as was by at be this are from or an which not have has "
         "model block sparse attention layer key query value token text data time light water city river sea "
         "people work study music bread cells energy heat stone law trade map").split()


def tokenizer(folder: Path, vocab_size: int = 100):
    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab = (special + WORDS + letters + [".", ",", "-", "'"])[:vocab_size]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    (folder / "vocab.txt").unlink()
    return tok


def save_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer(folder).save_pretrained(folder)
    return folder

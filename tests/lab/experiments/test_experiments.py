"""Experiment CLI/config plumbing, full-scale configs on tiny generated files, and tiny end-to-end runs.

The end-to-end runs use sizes far below ``--quick`` (1–2 steps) so they test the code path, not the claims;
the ones that take more than ~20 s on a loaded 2-core machine are marked slow.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from der.cli import available
from der.cli import main as der_main
from der_lab.experiments.configs import (
    FULL_CONFIGS,
    BertGLUE,
    LlamaCNNDMLoRA,
    Phi2WikiText103,
    ViTBaseImageNet,
    ViTSmallCIFAR100,
)
from der_lab.experiments.vit_digits import ViTDigitsConfig
from der_lab.harness import parse_config


def test_cli_lists_experiments_and_rejects_unknown():
    names = available("exp")
    for n in ("vit-digits", "byte-lm", "lora-llama", "robustness", "mask-iou", "breakeven", "configs"):
        assert n in names
    with pytest.raises(SystemExit, match="unknown name"):
        der_main(["exp", "no-such-experiment"])


def test_parse_config_quick_overrides_and_errors():
    cfg, ns = parse_config(ViTDigitsConfig, ["--quick", "--epochs", "2", "--sparsities", "0.5,0.8"], "x")
    assert ns.quick and cfg.epochs == 2 and cfg.sparsities == (0.5, 0.8) and cfg.batch_size == 16
    cfg, _ = parse_config(ViTDigitsConfig, ["--train-limit", "none"], "x")
    assert cfg.train_limit is None
    with pytest.raises(SystemExit):
        parse_config(ViTDigitsConfig, ["--sparsities", "1.5"], "x")  # invalid config → exit 2 with message
    with pytest.raises(SystemExit):
        parse_config(ViTDigitsConfig, ["--no-such-flag", "1"], "x")


def test_full_configs_load_tiny_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "c100").mkdir()
    with open(tmp_path / "c100" / "test", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"fine_labels": [3, 4]}, f)
    assert len(ViTSmallCIFAR100(data_root=str(tmp_path / "c100")).load("test")) == 2
    from PIL import Image

    (tmp_path / "in" / "val" / "n0").mkdir(parents=True)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "in" / "val" / "n0" / "x.JPEG")
    assert ViTBaseImageNet(data_root=str(tmp_path / "in"), image_size=16).load("test")[0][0].shape == (3, 16, 16)
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
    assert BertGLUE(data_root=str(tmp_path / "glue"), task="RTE").load("test")[0] == ("A.", "B.", 0)
    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "test.jsonl").write_text(json.dumps({"article": "x y", "highlights": "x"}) + "\n")
    assert LlamaCNNDMLoRA(data_root=str(tmp_path / "cnn")).load("test")[0][2] == "x"
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "wiki.valid.raw").write_text("abc " * 300)
    assert len(Phi2WikiText103(data_root=str(tmp_path / "wt"), context=64).load("val")) > 3
    with pytest.raises(ValueError, match="data_root is empty"):
        BertGLUE().load("train")
    assert der_main(["exp", "configs"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(FULL_CONFIGS)


def test_lora_4bit_without_gpu_is_a_clear_error():
    from der_lab.experiments.lora_llama import LoraLlamaConfig

    with pytest.raises(ValueError, match="CUDA"):
        LoraLlamaConfig(quantize_4bit=True)


def _run(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert der_main(["exp", name, "--quick", *args, "--out", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_byte_lm_tiny_end_to_end(tmp_path):
    r = _run(tmp_path, "byte-lm", "--context", "128", "--block-size", "16", "--hidden", "32", "--layers", "1",
             "--steps", "2", "--finetune-steps", "1", "--max-bytes", "60000", "--val-windows", "2", "--batch-size", "2")
    m = r["methods"]
    assert {"dense", "der", "bigbird", "longformer"} <= set(m)
    assert abs(m["der"]["block_sparsity"] - 0.75) < 0.05 and m["dense"]["val_ppl"] > 1
    assert r["meta"]["quick"] is True


def test_byte_lm_quality_tiny(tmp_path):  # not slow: CI runs it (~10 s)
    r = _run(tmp_path, "byte-lm-quality", "--context", "256", "--block-size", "32", "--hidden", "32", "--layers", "1",
             "--steps", "2", "--distill-steps", "1", "--max-bytes", "60000", "--val-windows", "2",
             "--batch-size", "2", "--sparsities", "0.5,0.75", "--methods", "der/anchors,static/attention,dynamic/moba")
    assert set(r["summary"]) == {f"{m}@{s}/{t}" for m in ("der/anchors", "static/attention", "dynamic/moba")
                                 for s in (0.5, 0.75) for t in ("none", "distill")}
    for key, s in r["summary"].items():  # every method at the same budget over the causal triangle
        sp = float(key.split("@")[1].split("/")[0])
        assert s["kept_causal_pairs"]["mean"] == pytest.approx(1 - sp, abs=0.08), key
        assert 0 < s["recall"]["mean"] <= 1 and s["val_ppl"]["mean"] > 1
    orc = r["oracle"]["0"]["0.75"]
    assert orc["chance"] == pytest.approx(0.25) and orc["dynamic"] >= orc["static"] - 1e-9
    assert (tmp_path / "run" / "partial.json").exists()


@pytest.mark.slow
def test_vit_digits_tiny_end_to_end(tmp_path):
    r = _run(tmp_path, "vit-digits", "--epochs", "1", "--finetune-epochs", "0", "--train-limit", "32",
             "--test-limit", "16", "--hidden", "16", "--layers", "1")
    assert {"dense", "der@0.75", "magnitude_topb@0.75", "l1@0.75", "bigbird@0.75"} <= set(r["methods"])
    assert abs(r["methods"]["der@0.75"]["block_sparsity"] - 0.75) < 0.05
    assert all(0 < v["attention_mass_recall"] <= 1 for k, v in r["methods"].items() if "@" in k)
    orc = r["oracle_recall"]["0.75"]
    assert orc["chance"] == pytest.approx(0.25) and orc["static"] <= orc["dynamic"] + 1e-9 <= 1 + 1e-9


@pytest.mark.slow
def test_robustness_tiny_end_to_end(tmp_path):
    r = _run(tmp_path, "robustness", "--epochs", "1", "--train-limit", "16", "--test-limit", "8", "--hidden", "16",
             "--layers", "1", "--corruptions", "gaussian_noise,fog")
    assert r["methods"]["plain"]["mCE"] == pytest.approx(100.0) or r["methods"]["plain"]["mCE"] is None
    assert set(r["methods"]) == {"plain", "label_smoothing", "confidence_penalty", "vib", "fgsm", "der"}


@pytest.mark.slow
def test_mask_iou_and_lora_tiny_end_to_end(tmp_path):
    r = _run(tmp_path, "mask-iou", "--epochs", "1", "--train-limit", "16", "--test-limit", "8", "--hidden", "16",
             "--layers", "1")
    assert 0 <= r["methods"]["der"]["iou_mean"] <= 1 and 0 < r["chance_iou"] < 1
    r = _run(tmp_path, "lora-llama", "--context", "64", "--block-size", "16", "--pretrain-steps", "1",
             "--lora-steps", "1", "--max-bytes", "60000", "--val-windows", "2", "--batch-size", "2")
    assert r["methods"]["dense_lora"]["trainable_params"] > 0 and "der_lora" in r["methods"]

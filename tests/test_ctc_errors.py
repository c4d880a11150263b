"""Bad input gets a ValueError / TypeError that names the argument."""
import pytest
import torch

import narvl

V = 7


def ok():
    return dict(logits=torch.randn(2, 5, V), targets=torch.tensor([[1, 2], [3, 0]]),
                target_lengths=torch.tensor([2, 1]))


def call(**over):
    a = ok()
    a.update(over)
    kw = {k: a.pop(k) for k in list(a) if k not in ("logits", "targets", "target_lengths")}
    kw.setdefault("blank", 6)
    return narvl.qctc_loss(a["logits"], a["targets"], a["target_lengths"], **kw)


@pytest.mark.parametrize("over, exc, word", [
    (dict(logits=torch.randn(5, V)), ValueError, "logits"),
    (dict(logits=torch.randint(0, 3, (2, 5, V))), TypeError, "logits"),
    (dict(logits=[1.0]), TypeError, "logits"),
    (dict(logits=torch.randn(0, 5, V), targets=torch.zeros(0, 2, dtype=torch.long),
          target_lengths=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
    (dict(targets=torch.tensor([[1, 2]])), ValueError, "targets"),
    (dict(targets=torch.tensor([[1.0, 2.0], [3.0, 0.0]])), TypeError, "targets"),
    (dict(targets=torch.tensor([[1, 7], [3, 0]])), ValueError, "targets"),
    (dict(targets=torch.tensor([[1, -1], [3, 0]])), ValueError, "targets"),
    (dict(targets=torch.tensor([[1, 6], [3, 0]])), ValueError, "blank"),
    (dict(target_lengths=torch.tensor([3, 1])), ValueError, "target_lengths"),
    (dict(target_lengths=torch.tensor([-1, 1])), ValueError, "target_lengths"),
    (dict(target_lengths=torch.tensor([2.0, 1.0])), TypeError, "target_lengths"),
    (dict(target_lengths=torch.tensor([2])), ValueError, "target_lengths"),
    (dict(query_lengths=torch.tensor([6, 5])), ValueError, "query_lengths"),
    (dict(query_lengths=torch.tensor([-1, 5])), ValueError, "query_lengths"),
    (dict(blank=7), ValueError, "blank"),
    (dict(blank=-1), ValueError, "blank"),
    (dict(blank=1.0), TypeError, "blank"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(weights=torch.ones(3)), ValueError, "weights"),
])
def test_qctc_bad_input(backend, over, exc, word):
    with pytest.raises(exc, match=word):
        call(**over)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qctc_nan_logits_raise_in_strict_mode(backend, bad, monkeypatch):
    x = torch.randn(2, 5, V)
    x[1, 3, 4] = bad
    assert torch.isnan(call(logits=x))  # by default they flow, as in F.ctc_loss
    monkeypatch.setenv("NARVL_CHECK", "strict")
    with pytest.raises(ValueError, match=r"logits\[1, 3, 4\]"):
        call(logits=x)


def ctc_call(**over):
    a = dict(log_probs=torch.randn(8, 2, V).log_softmax(-1), targets=torch.tensor([[1, 2], [3, 0]]),
             input_lengths=torch.tensor([8, 6]), target_lengths=torch.tensor([2, 1]))
    a.update(over)
    return narvl.ctc_loss(a["log_probs"], a["targets"], a["input_lengths"], a["target_lengths"],
                          blank=a.get("blank", 0))


@pytest.mark.parametrize("over, exc, word", [
    (dict(log_probs=torch.randn(8, 2, 3, V)), ValueError, "log_probs"),
    (dict(input_lengths=torch.tensor([9, 6])), ValueError, "input_lengths"),
    (dict(input_lengths=torch.tensor([-1, 6])), ValueError, "input_lengths"),
    (dict(input_lengths=torch.tensor([8, 6, 1])), ValueError, "input_lengths"),
    (dict(target_lengths=(2, 3)), ValueError, "target_lengths"),
    (dict(targets=torch.tensor([[1, 0], [3, 0]])), ValueError, "blank"),
    (dict(targets=torch.tensor([1, 2, 3]), target_lengths=(2, 2)), ValueError, "targets"),
    (dict(log_probs=torch.randn(0, 2, V)), ValueError, "log_probs"),
    (dict(blank=V), ValueError, "blank"),
])
def test_ctc_bad_input(backend, over, exc, word):
    with pytest.raises(exc, match=word):
        ctc_call(**over)


def test_ctc_nan_raises_in_strict_mode(backend, monkeypatch):
    lp = torch.randn(8, 2, V).log_softmax(-1)
    lp[2, 0, 0] = float("nan")  # blank column of sample 0: used by every alignment
    assert torch.isnan(ctc_call(log_probs=lp))
    monkeypatch.setenv("NARVL_CHECK", "strict")
    with pytest.raises(ValueError, match="log_probs"):
        ctc_call(log_probs=lp)


def test_backend_env_errors(monkeypatch):
    monkeypatch.setenv("NARVL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="NARVL_BACKEND"):
        call()
    monkeypatch.setenv("NARVL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call()


def test_module_config_errors():
    with pytest.raises(ValueError, match="reduction"):
        narvl.nn.QCTCLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        narvl.nn.QCTCLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="blank"):
        narvl.nn.CTCLoss(blank=-3)

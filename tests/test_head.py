"""The multi-sample dropout head: what it computes in training and evaluation, its loss and gradient, R-Drop on it,
and the networks it ends."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from conftest import B, C, D, make_msd
from nn import build_model, rdrop_consistency


@pytest.mark.parametrize("dropout_num", [0, 1, 8])
def test_shapes(dropout_num, batch):
    features, target = batch
    logits, loss = make_msd(dropout_num)(features, target, tnn.CrossEntropyLoss())
    assert logits.shape == (B, C) and loss.shape == ()
    logits = make_msd(dropout_num)(features)  # no target: the logits alone, a tensor (nn.Sequential-ready)
    assert isinstance(logits, torch.Tensor) and logits.shape == (B, C)


@pytest.mark.parametrize("dropout_num", [0, 1, 2, 8])
def test_eval_is_one_pass_of_the_head_without_dropout(dropout_num, batch):
    features, target = batch
    msd = make_msd(dropout_num, train=False)
    logits, loss = msd(features, target, tnn.CrossEntropyLoss())
    expected = msd.head.head(features)
    assert torch.equal(logits, expected)
    assert torch.equal(loss, F.cross_entropy(expected, target))
    assert msd.head.calls == 1


@pytest.mark.parametrize("dropout_num", [0, 1, 8])
def test_without_dropout_probability_the_loss_is_the_plain_loss(dropout_num, batch):
    features, target = batch
    msd = make_msd(dropout_num, p=0.0)
    _, loss = msd(features, target, tnn.CrossEntropyLoss())
    plain = F.cross_entropy(msd.head.head(features), target)
    assert torch.allclose(loss, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dropout_num", [1, 8])
def test_loss_is_the_mean_of_the_per_sample_losses(dropout_num, batch):
    features, target = batch
    msd = make_msd(dropout_num)
    logits, loss = msd(features, target, tnn.CrossEntropyLoss())
    samples = msd.head.output.view(dropout_num, B, C)  # what the head gave for each dropout sample
    per_sample = torch.stack([F.cross_entropy(s, target) for s in samples])
    assert torch.allclose(loss, per_sample.mean(), rtol=1e-6)
    assert torch.allclose(logits, samples.mean(0), rtol=1e-6)
    if dropout_num > 1:  # not the loss of the averaged logits (that one is smaller, by Jensen)
        assert loss - F.cross_entropy(logits, target) > 1e-3


def test_every_sample_gets_its_own_mask():
    m, p = 8, 0.5
    msd = make_msd(m, p, head=tnn.Identity())
    msd(torch.ones(B, 1000))
    kept = (msd.head.input != 0).view(m, B, 1000).float()
    assert torch.allclose(kept.mean((1, 2)), torch.full((m,), 1 - p), atol=0.02)
    for i, j in itertools.combinations(range(m), 2):
        agreement = (kept[i] == kept[j]).float().mean()
        # independent masks agree on p^2 + (1-p)^2 = 0.5 of the units; a shared mask on all of them
        assert abs(agreement - 0.5) < 0.02, (i, j, agreement)


@pytest.mark.parametrize("dropout_num,train", [(0, True), (1, True), (8, True), (8, False)])
def test_head_is_called_once_per_forward(dropout_num, train, batch):
    features, target = batch
    msd = make_msd(dropout_num, train=train)
    msd(features, target, tnn.CrossEntropyLoss())
    assert msd.head.calls == 1


def test_gradient_is_that_of_the_mean_of_the_sample_losses(batch):
    features, target = batch
    msd = make_msd(8)
    msd(features, target, tnn.CrossEntropyLoss())[1].backward()
    linear = msd.head.head
    dropped = msd.head.input.detach().view(8, B, D)  # the 8 masked copies the head saw
    by_hand = torch.stack([F.cross_entropy(linear(x), target) for x in dropped]).mean()
    expected = torch.autograd.grad(by_hand, linear.weight)[0]
    assert torch.allclose(linear.weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_rdrop_alpha_zero_is_exactly_the_multi_sample_loss(batch):
    features, target = batch
    plain = make_msd(8)(features, target, tnn.CrossEntropyLoss())[1]
    assert torch.equal(make_msd(8, rdrop_alpha=0.0)(features, target, tnn.CrossEntropyLoss())[1], plain)


def symmetric_kl_by_hand(logits):
    """Mean over pairs i < j of (KL(p_i||p_j) + KL(p_j||p_i)) / 2, each KL summed over classes, averaged over rows."""
    log_p = F.log_softmax(logits.double(), -1)
    pairs = [(F.kl_div(log_p[j], log_p[i], log_target=True, reduction="batchmean")
              + F.kl_div(log_p[i], log_p[j], log_target=True, reduction="batchmean")) / 2
             for i, j in itertools.combinations(range(len(logits)), 2)]
    return torch.stack(pairs).mean()


@pytest.mark.parametrize("m", [2, 3, 8])
def test_rdrop_term_equals_a_hand_computation(m):
    logits = torch.randn(m, 5, C, generator=torch.Generator().manual_seed(m))
    assert torch.allclose(rdrop_consistency(logits).double(), symmetric_kl_by_hand(logits), rtol=1e-5)
    # two samples by hand, from the definition of KL
    p, q = F.softmax(logits[0], -1), F.softmax(logits[1], -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1).mean()
    assert torch.allclose(rdrop_consistency(logits[:2]), (kl(p, q) + kl(q, p)) / 2, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_rdrop_loss_is_the_multi_sample_loss_plus_half_alpha_times_the_term(alpha, batch):
    features, target = batch
    msd = make_msd(4, rdrop_alpha=alpha)
    _, loss = msd(features, target, tnn.CrossEntropyLoss())
    samples = msd.head.output.view(4, B, C)
    task = torch.stack([F.cross_entropy(s, target) for s in samples]).mean()
    term = symmetric_kl_by_hand(samples)
    assert term > 1e-3  # p = 0.5: the samples disagree
    assert torch.allclose(loss.double(), task.double() + alpha / 2 * term, rtol=1e-5)


def test_rdrop_term_vanishes_without_dropout_probability(batch):
    features, target = batch
    msd = make_msd(4, p=0.0, rdrop_alpha=1.0)
    _, loss = msd(features, target, tnn.CrossEntropyLoss())
    assert rdrop_consistency(msd.head.output.view(4, B, C)) == 0
    assert torch.allclose(loss, F.cross_entropy(msd.head.head(features), target), rtol=1e-6)


def test_rdrop_gradient_reaches_the_head(batch):
    features, target = batch
    grads = []
    for alpha in (0.0, 1.0):
        msd = make_msd(4, rdrop_alpha=alpha)
        msd(features, target, tnn.CrossEntropyLoss())[1].backward()
        grads.append(msd.head.head.weight.grad)
    # same masks (same seed), so the difference is the gradient of the R-Drop term alone
    assert (grads[1] - grads[0]).abs().max() > 1e-4


def test_parameter_counts():
    count = lambda name: sum(p.numel() for p in build_model(name, 10, 8, 0.5).parameters())
    assert count("miniresnet") == 848_810
    assert count("resnet18") == 11_173_962


@pytest.mark.parametrize("dropout_num", [0, 8])
def test_model_contract(dropout_num):
    model = build_model("miniresnet", 10, dropout_num, 0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, loss = model(x, y, tnn.CrossEntropyLoss())
    assert logits.shape == (4, 10) and loss.shape == () and torch.isfinite(loss)
    assert model.eval()(x).shape == (4, 10)


def test_evaluation_is_the_same_network_for_every_dropout_num():
    x = torch.randn(4, 3, 32, 32)
    reference = build_model("miniresnet", 10, 0, 0.5).eval()
    for dropout_num in (1, 8):
        model = build_model("miniresnet", 10, dropout_num, 0.5).eval()
        model.load_state_dict(reference.state_dict())
        assert torch.equal(model(x), reference(x))


def test_rdrop_without_two_samples_is_refused():
    with pytest.raises(ValueError, match="needs 2 or more dropout samples"):
        make_msd(1, rdrop_alpha=1.0)

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from nn import MultiSampleDropout, build_model

B, D, C = 64, 16, 10


class RecordingHead(tnn.Module):
    """A linear head that counts its calls and keeps its last input and output."""

    def __init__(self, head=None):
        super().__init__()
        self.head = head or tnn.Linear(D, C)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.input, self.output = x, self.head(x)
        return self.output


def make(dropout_num, p=0.5, head=None, train=True):
    torch.manual_seed(0)
    msd = MultiSampleDropout(RecordingHead(head), dropout_num, p)
    return msd.train(train)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("dropout_num", [0, 1, 8])
def test_shapes(dropout_num, batch):
    features, target = batch
    logits, loss = make(dropout_num)(features, target, tnn.CrossEntropyLoss())
    assert logits.shape == (B, C) and loss.shape == ()
    logits, loss = make(dropout_num)(features)
    assert logits.shape == (B, C) and loss is None


@pytest.mark.parametrize("dropout_num", [0, 1, 2, 8])
def test_eval_is_one_pass_of_the_head_without_dropout(dropout_num, batch):
    features, target = batch
    msd = make(dropout_num, train=False)
    logits, loss = msd(features, target, tnn.CrossEntropyLoss())
    expected = msd.head.head(features)
    assert torch.equal(logits, expected)
    assert torch.equal(loss, F.cross_entropy(expected, target))
    assert msd.head.calls == 1


@pytest.mark.parametrize("dropout_num", [0, 1, 8])
def test_without_dropout_probability_the_loss_is_the_plain_loss(dropout_num, batch):
    features, target = batch
    msd = make(dropout_num, p=0.0)
    _, loss = msd(features, target, tnn.CrossEntropyLoss())
    plain = F.cross_entropy(msd.head.head(features), target)
    assert torch.allclose(loss, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dropout_num", [1, 8])
def test_loss_is_the_mean_of_the_per_sample_losses(dropout_num, batch):
    features, target = batch
    msd = make(dropout_num)
    logits, loss = msd(features, target, tnn.CrossEntropyLoss())
    samples = msd.head.output.view(dropout_num, B, C)  # what the head gave for each dropout sample
    per_sample = torch.stack([F.cross_entropy(s, target) for s in samples])
    assert torch.allclose(loss, per_sample.mean(), rtol=1e-6)
    assert torch.allclose(logits, samples.mean(0), rtol=1e-6)
    if dropout_num > 1:  # not the loss of the averaged logits (that one is smaller, by Jensen)
        assert loss - F.cross_entropy(logits, target) > 1e-3


def test_every_sample_gets_its_own_mask():
    m, p = 8, 0.5
    msd = make(m, p, head=tnn.Identity())
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
    msd = make(dropout_num, train=train)
    msd(features, target, tnn.CrossEntropyLoss())
    assert msd.head.calls == 1


def test_gradient_is_that_of_the_mean_of_the_sample_losses(batch):
    features, target = batch
    msd = make(8)
    msd(features, target, tnn.CrossEntropyLoss())[1].backward()
    linear = msd.head.head
    dropped = msd.head.input.detach().view(8, B, D)  # the 8 masked copies the head saw
    by_hand = torch.stack([F.cross_entropy(linear(x), target) for x in dropped]).mean()
    expected = torch.autograd.grad(by_hand, linear.weight)[0]
    assert torch.allclose(linear.weight.grad, expected, rtol=1e-5, atol=1e-7)


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
    assert model.eval()(x)[1] is None


def test_evaluation_is_the_same_network_for_every_dropout_num():
    x = torch.randn(4, 3, 32, 32)
    reference = build_model("miniresnet", 10, 0, 0.5).eval()
    for dropout_num in (1, 8):
        model = build_model("miniresnet", 10, dropout_num, 0.5).eval()
        model.load_state_dict(reference.state_dict())
        assert torch.equal(model(x)[0], reference(x)[0])

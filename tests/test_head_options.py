"""The ResNet head's options (hidden layer, pooling, diversity) and the variants of the head (mean of logits,
separate heads): what each computes, and what is refused."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from bookkeeping import experiment
from conftest import B, C, D, RecordingHead, cli, make_msd, run_dirs
from nn import MultiSampleDropout, build_model, model_problem, pooling, rdrop_consistency

# --- head options: head_hidden, pool, diversity ---------------------------------------------

HEAD_OPTIONS = [dict(head_hidden=512), dict(pool="avg2"), dict(pool="avg2", diversity="flip"),
                dict(pool="avg2", diversity="pad"), dict(pool="avg2", diversity="flip+pad"),
                dict(head_hidden=512, pool="avg2", diversity="flip+pad")]
DEFAULTS = dict(head_hidden=0, pool="avg4", diversity="none")
IMAGES, LABELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3])


def option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def build(options, dropout_num=4, p=0.5, rdrop_alpha=0.0, seed=0):
    torch.manual_seed(seed)
    return build_model("miniresnet", 10, dropout_num, p, rdrop_alpha, **options)


@pytest.mark.parametrize("rdrop_alpha", [0.0, 1.0])
@pytest.mark.parametrize("options", HEAD_OPTIONS, ids=option_id)
def test_every_head_option_trains_a_step(options, rdrop_alpha):
    model = build(options, rdrop_alpha=rdrop_alpha)
    head = model.classifier.head = RecordingHead(model.classifier.head)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    logits, loss = model(IMAGES, LABELS, tnn.CrossEntropyLoss())
    assert logits.shape == (4, 10) and loss.shape == () and torch.isfinite(loss)
    assert head.calls == 1 and head.output.shape == (4 * 4, 10)  # one head call on the M*B rows
    loss.backward()
    assert model.stem[0].weight.grad.abs().sum() > 0  # the backbone
    assert all(p.grad.abs().sum() > 0 for p in head.parameters())  # every layer of the head
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if rdrop_alpha:  # same seeds, same masks: the difference is (alpha / 2) x the R-Drop term, > 0 at p = 0.5
        plain_model = build(options)
        torch.manual_seed(1)
        plain = plain_model(IMAGES, LABELS, tnn.CrossEntropyLoss())[1]
        term = rdrop_consistency(head.output.detach().view(4, 4, 10))
        assert term > 1e-6
        assert torch.allclose(loss, plain + rdrop_alpha / 2 * term, rtol=1e-5)
        plain.backward()  # and the term has a gradient: the head's gradients differ from the plain loss's
        last = lambda net: [p for p in net.parameters() if p.dim() == 2][-1]  # the head's last Linear
        assert (last(head).grad - last(plain_model.classifier.head).grad).abs().max() > 1e-6


def test_head_shapes_and_parameter_counts():
    widths = (32, 64, 64, 128)  # miniresnet
    backbone = 848_810 - (widths[-1] * 10 + 10)  # today's total minus its Linear(128, 10) head
    linear = lambda i, o: i * o + o
    expected = {
        (0, "avg4"): linear(128, 10),  # today's head
        (512, "avg4"): linear(128, 512) + linear(512, 10),
        (0, "avg2"): linear(128 * 4, 10),  # the 2x2 grid, flattened: 4 values per channel
        (512, "avg2"): linear(128 * 4, 512) + linear(512, 10),
    }
    for (hidden, pool), head_params in expected.items():
        model = build_model("miniresnet", 10, 8, 0.5, head_hidden=hidden, pool=pool)
        assert sum(p.numel() for p in model.parameters()) == backbone + head_params, (hidden, pool)
    assert sum(p.numel() for p in build_model("miniresnet", 10, 8, 0.5, head_hidden=512).parameters()) == 918_698
    assert sum(p.numel() for p in build_model("miniresnet", 10, 8, 0.5, pool="avg2").parameters()) == 852_650
    hidden = build_model("miniresnet", 10, 8, 0.5, head_hidden=512).classifier.head
    assert [type(layer) for layer in hidden] == [tnn.Linear, tnn.ReLU, tnn.Linear]
    assert (hidden[0].in_features, hidden[0].out_features, hidden[2].out_features) == (128, 512, 10)


@pytest.mark.parametrize("dropout_num", [0, 1, 8])
def test_defaults_are_todays_network(dropout_num):
    model = build_model("miniresnet", 10, dropout_num, 0.5)
    keys = [k for k in model.state_dict() if not k.startswith(("stem.", "blocks."))]
    assert keys == ["classifier.head.weight", "classifier.head.bias"]
    assert type(model.classifier.head) is tnn.Linear
    linear, x = model.classifier.head, IMAGES[:2]
    # evaluation: the global 4x4 average of the final map, then the Linear
    model.eval()
    fmap = model.feature_map(x)
    assert fmap.shape == (2, 128, 4, 4)
    features = F.avg_pool2d(fmap, 4).flatten(1)
    assert torch.equal(model.features(x), features)
    assert torch.equal(model(x), linear(features))
    # training: pool once, then M copies of the pooled features, one dropout over them, the Linear
    model.train()
    torch.manual_seed(3)
    logits, loss = model(x, LABELS[:2], tnn.CrossEntropyLoss())
    torch.manual_seed(3)
    features = F.avg_pool2d(model.feature_map(x), 4).flatten(1)
    m = max(dropout_num, 1)
    copies = features if dropout_num == 0 else F.dropout(features.repeat(m, 1), 0.5, training=True)
    outputs = linear(copies)
    assert torch.equal(logits, outputs.view(m, 2, 10).mean(0))
    assert torch.equal(loss, F.cross_entropy(outputs, LABELS[:2].repeat(m)))


def column_map(batch=2):
    """A 1-channel 4x4 map whose columns are 1, 2, 3, 4 (a known left-right asymmetry), one per row of the batch."""
    return torch.arange(1.0, 5.0).expand(batch, 1, 4, 4).clone()


# what 2x2/stride-2 pooling gives for the 1,2,3,4 columns, as the flattened 2x2 grid (both grid rows equal)
PLAIN = [1.5, 3.5, 1.5, 3.5]  # columns {1,2},{3,4}; also the right-padded map [1,2,3,4,0]
FLIPPED = [3.5, 1.5, 3.5, 1.5]  # [4,3,2,1]; also flipped then right-padded [4,3,2,1,0]
PADDED_LEFT = [0.5, 2.5, 0.5, 2.5]  # [0,1,2,3,4]: windows {0,1},{2,3}, the 4 dropped
FLIPPED_PADDED_LEFT = [2.0, 2.5, 2.0, 2.5]  # [0,4,3,2,1]: windows {0,4},{3,2}, the 1 dropped


@pytest.mark.parametrize("diversity,m,expected", [
    ("none", 4, [PLAIN] * 4),
    ("flip", 4, [PLAIN, PLAIN, FLIPPED, FLIPPED]),
    ("flip", 3, [PLAIN, PLAIN, FLIPPED]),  # the second half: M//2 = 1 sample, the last one
    ("flip", 2, [PLAIN, FLIPPED]),
    ("pad", 4, [PLAIN, PADDED_LEFT, PLAIN, PADDED_LEFT]),  # even: right (as unpadded), odd: left
    ("pad", 3, [PLAIN, PADDED_LEFT, PLAIN]),
    ("flip+pad", 4, [PLAIN, PADDED_LEFT, FLIPPED, FLIPPED_PADDED_LEFT]),  # all four combinations
    ("flip+pad", 5, [PLAIN, PADDED_LEFT, PLAIN, FLIPPED_PADDED_LEFT, FLIPPED]),  # flips: 3, 4; left pads: 1, 3
])
def test_each_sample_pools_its_flipped_or_padded_map(diversity, m, expected):
    # through build_model's head (p = 0), with the Linear replaced by a recorder of what it is given
    model = build_model("miniresnet", 10, m, 0.0, pool="avg2", diversity=diversity)
    msd = model.classifier
    msd.head = RecordingHead(tnn.Identity())
    msd(column_map())
    assert msd.head.calls == 1
    seen = msd.head.input.view(m, 2, 4)  # (sample, batch row, flattened 2x2 grid)
    assert torch.equal(seen, torch.tensor(expected)[:, None].expand(m, 2, 4))
    # evaluation: one plain pass, no flip, no padding, the head once on the B rows
    msd.eval()
    msd.head.calls = 0
    logits = msd(column_map())
    assert msd.head.calls == 1 and torch.equal(logits, torch.tensor([PLAIN, PLAIN]))


def test_pad_counts_the_zero_and_flip_mirrors_every_channel_and_row():
    msd = MultiSampleDropout(RecordingHead(tnn.Identity()), 2, 0.0, pool=pooling("avg2"), diversity="flip+pad")
    fmap = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    msd(fmap)
    seen = msd.head.input.view(2, 3, 5, 2, 2)
    assert torch.equal(seen[0], F.avg_pool2d(F.pad(fmap, (0, 1)), 2))  # sample 0: right zero column, dropped
    assert torch.allclose(seen[1], F.avg_pool2d(F.pad(fmap.flip(-1), (1, 0)), 2))  # sample 1: flipped, left zero
    by_hand = (fmap.flip(-1)[..., 0:2, 0:1].sum((-2, -1)) + 0) / 4  # window {zero, first column} of grid cell (0, 0)
    assert torch.allclose(seen[1][..., 0, 0], by_hand)


@pytest.mark.parametrize("options,dropout_num", [(o, m) for o in [DEFAULTS] + HEAD_OPTIONS for m in (0, 4)
                                                  if m or "diversity" not in o],  # diversity needs M >= 2
                         ids=lambda v: option_id(v) if isinstance(v, dict) else f"M={v}")
def test_evaluation_is_one_plain_pass_for_every_option(options, dropout_num):
    model = build(options, dropout_num=dropout_num).eval()
    head = model.classifier.head = RecordingHead(model.classifier.head)
    logits, loss = model(IMAGES, LABELS, tnn.CrossEntropyLoss())
    kernel = 2 if options.get("pool") == "avg2" else 4
    expected = head.head(F.avg_pool2d(model.feature_map(IMAGES), kernel).flatten(1))
    assert torch.equal(logits, expected) and torch.equal(loss, F.cross_entropy(expected, LABELS))
    assert head.calls == 1 and head.input.shape[0] == 4  # once, on the B rows


def test_training_with_diversity_differs_from_without():
    # p = 0: no dropout, so the samples differ only by their flip/padding; the loss is their mean
    losses = {}
    for diversity in ("none", "flip", "pad", "flip+pad"):
        model = build(dict(pool="avg2", diversity=diversity), dropout_num=4, p=0.0).eval()
        model.classifier.train()  # batch norm fixed, so the backbone's map is the same for every option
        losses[diversity] = model(IMAGES, LABELS, tnn.CrossEntropyLoss())[1]
    assert torch.allclose(losses["none"], F.cross_entropy(build(dict(pool="avg2")).eval()(IMAGES), LABELS))
    assert len({round(loss.item(), 6) for loss in losses.values()}) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(diversity="flip"), "needs --pool avg2"),  # the default pool is avg4
    (dict(pool="avg4", diversity="pad"), "needs --pool avg2"),
    (dict(pool="avg4", diversity="flip+pad"), "needs --pool avg2"),
    (dict(pool="avg2", diversity="flip", dropout_num=1), "needs 2 or more dropout samples"),
    (dict(pool="avg2", diversity="pad", dropout_num=0), "needs 2 or more dropout samples"),
    (dict(pool="max"), "pooling \\(--pool\\) must be one of"),
    (dict(pool="avg2", diversity="rotate"), "diversity must be one of"),
    (dict(diversity="rotate"), "diversity must be one of"),
    (dict(head_hidden=-1), "hidden width \\(--head_hidden\\) must be 0"),
])
def test_refused_head_options(kwargs, message):
    dropout_num = kwargs.pop("dropout_num", 4)
    with pytest.raises(ValueError, match=message) as refused:
        build_model("miniresnet", 10, dropout_num, 0.5, **kwargs)
    assert model_problem("miniresnet", dropout_num, 0.5, **kwargs) == str(refused.value)  # run.py's line: the same


# --- the head's contract for any model, and its variants ----------------------------------------

def test_the_head_sits_in_a_sequential_and_replaces_a_linear(batch):
    features, target = batch
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Linear(D, D), tnn.ReLU(), MultiSampleDropout(tnn.Linear(D, C), 8, 0.5))
    for train in (True, False):
        assert model.train(train)(features).shape == (B, C)
    logits, loss = model[2](model[1](model[0](features)), target, tnn.CrossEntropyLoss())
    assert logits.shape == (B, C) and loss.shape == ()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("heads", ["shared", "separate"])
def test_the_loss_is_the_mean_of_the_m_losses_whatever_the_reduction(reduction, heads):
    torch.manual_seed(3)
    x, y = torch.randn(3, 4), torch.tensor([0, 2, 1])  # tiny: B = 3, F = 4, C = 3
    msd = MultiSampleDropout(RecordingHead(tnn.Linear(4, 3)), 2, 0.5, heads=heads) if heads == "shared" else \
        MultiSampleDropout(tnn.Linear(4, 3), 2, 0.5, heads=heads)
    torch.manual_seed(4)
    _, loss = msd(x, y, tnn.CrossEntropyLoss(reduction=reduction))
    torch.manual_seed(4)  # the same masks again, by hand
    dropped = F.dropout(x.expand(2, 3, 4).flatten(0, 1), 0.5, training=True).view(2, 3, 4)
    heads_ = [msd.head.head] * 2 if heads == "shared" else list(msd.head)
    by_hand = [F.cross_entropy(h(d), y, reduction=reduction) for h, d in zip(heads_, dropped)]
    assert torch.allclose(loss, (by_hand[0] + by_hand[1]) / 2, rtol=1e-6)


def test_a_plain_loss_function_works_too(batch):
    features, target = batch
    logits, loss = make_msd(8)(features, target, F.cross_entropy)  # no .reduction attribute: the M losses one by one
    assert torch.allclose(loss, make_msd(8)(features, target, tnn.CrossEntropyLoss())[1], rtol=1e-6)


def test_mean_of_logits_is_the_linear_head_of_the_mean_masked_features_and_one_loss(batch):
    features, target = batch
    torch.manual_seed(0)
    msd = MultiSampleDropout(RecordingHead(), 8, 0.5, reduce="logits")
    logits, loss = msd(features, target, tnn.CrossEntropyLoss())
    mean_features = msd.head.input.view(8, B, D).mean(0)  # the 8 masked copies the head saw, averaged
    assert torch.allclose(logits, msd.head.head(mean_features), rtol=1e-5, atol=1e-6)
    assert torch.equal(loss, F.cross_entropy(logits, target))
    paper = make_msd(8)(features, target, tnn.CrossEntropyLoss())[1]
    assert paper - loss > 1e-3  # the mean of losses is larger (Jensen): another objective


def test_separate_heads_hold_m_heads_initialised_apart_and_evaluate_their_mean(batch):
    features, target = batch
    torch.manual_seed(0)
    shared = MultiSampleDropout(tnn.Linear(D, C), 8, 0.5)
    separate = MultiSampleDropout(tnn.Linear(D, C), 8, 0.5, heads="separate")
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(separate) == 8 * count(shared) == 8 * (D * C + C)
    weights = [head.weight for head in separate.head]
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(weights, 2))
    separate.eval()
    expected = torch.stack([head(features) for head in separate.head]).mean(0)
    assert torch.allclose(separate(features), expected, rtol=1e-6)
    separate.train()
    torch.manual_seed(5)
    separate(features, target, tnn.CrossEntropyLoss())[1].backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in separate.head)  # each head learns from its sample


def old_head(msd, x, target, loss_fn):
    """The head as every run so far computed it: one head call on the M*B rows, a mean-reduced loss over them."""
    m, batch = msd.num_samples, x.shape[0]
    outputs = msd.head(F.dropout(msd.pool(x).unsqueeze(0).expand(m, *msd.pool(x).shape).flatten(0, 1), msd.p, training=True))
    return outputs.view(m, batch, -1).mean(0), loss_fn(outputs, target.repeat(m))


@pytest.mark.parametrize("dropout_num", [1, 8])
def test_the_default_head_computes_the_same_bits_as_before(dropout_num):
    model = build(DEFAULTS, dropout_num=dropout_num).train()
    fmap = model.feature_map(IMAGES).detach()
    torch.manual_seed(6)
    logits, loss = model.classifier(fmap, LABELS, tnn.CrossEntropyLoss())
    torch.manual_seed(6)
    old_logits, old_loss = old_head(model.classifier, fmap, LABELS, tnn.CrossEntropyLoss())
    assert torch.equal(logits, old_logits) and torch.equal(loss, old_loss)


@pytest.mark.parametrize("kwargs", [dict(reduce="logits"), dict(heads="separate")])
def test_a_variant_needs_two_samples_and_a_known_name(kwargs):
    with pytest.raises(ValueError, match="needs 2 or more dropout samples"):
        MultiSampleDropout(tnn.Linear(D, C), 1, 0.5, **kwargs)
    with pytest.raises(ValueError, match="reduce must be one of"):
        MultiSampleDropout(tnn.Linear(D, C), 8, 0.5, **{k: "other" for k in kwargs})


@pytest.mark.parametrize("alpha", [-1.0, float("inf"), float("nan")])
def test_a_negative_or_non_finite_rdrop_weight_is_refused_by_the_head_itself(alpha):
    with pytest.raises(ValueError, match=r"R-Drop's weight \(--rdrop_alpha\) must be 0 \(off\) or a positive number"):
        MultiSampleDropout(tnn.Linear(D, C), 8, 0.5, rdrop_alpha=alpha)


def test_a_target_without_a_loss_function_is_refused_not_ignored(batch):
    features, target = batch
    with pytest.raises(ValueError, match="give both target and loss_fn"):
        make_msd(8)(features, target)


# --- the head options from the command line --------------------------------------------------

def test_default_head_keeps_the_names_of_earlier_runs_and_other_heads_say_theirs():
    before = {"model": "miniresnet", "dataset": "cifar10", "dropout_num": 8, "dropout_p": 0.5, "seed": 42,
              "data_source": "archive-x", "batch_size": 128, "lr": 0.01, "lr_milestone": 10, "augment": False,
              "data_seed": 0, "train_size": None, "test_size": None, "precision": "fp32"}
    now = {**before, "head_hidden": 0, "pool": "avg4", "diversity": "none", "rdrop_alpha": 0.0, "valid_split": 0}
    assert experiment.run_identity(now) == experiment.run_identity(before)
    name, setup = experiment.run_identity({**now, "head_hidden": 512, "pool": "avg2", "diversity": "flip+pad"})
    assert name.startswith("miniresnet_cifar10_m8_p0.5_h512_avg2_flip+pad_s42-") and setup != experiment.run_identity(now)[1]


@pytest.mark.parametrize("flags, message", [
    (["--diversity", "flip", "--dropout_num", "8"], "diversity 'flip' needs --pool avg2"),
    (["--pool", "avg2", "--diversity", "pad", "--dropout_num", "1"], "needs 2 or more dropout samples (--dropout_num), got 1"),
    (["--head_hidden", "-1"], "(--head_hidden) must be 0 (a single linear layer) or more, got -1"),
    (["--pool", "avg3"], "invalid choice"),
])
def test_refused_head_options_are_one_line_and_exit_2(small_cifar, tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *flags)
    assert rc == 2 and message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, part", [("--msd_reduce", "logits", "_logits_s42-"), ("--msd_heads", "separate", "_separate_s42-")])
def test_each_variant_trains_from_the_command_line_and_names_its_run(small_cifar, tmp_path, capsys, flag, value, part):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                     "--dropout_num", 8, flag, value)
    (run_dir,) = run_dirs(tmp_path, 8)
    assert rc == 0, err
    assert run_dir.name.startswith("miniresnet_cifar10_m8_p0.5" + part)
    default = experiment.run_identity({**json.loads((run_dir / "config.json").read_text()), flag[2:]: {
        "--msd_reduce": "loss", "--msd_heads": "shared"}[flag]})[0]
    assert default.startswith("miniresnet_cifar10_m8_p0.5_s42-") and default[-8:] != run_dir.name[-8:]  # name and hash


@pytest.mark.slow
def test_every_head_option_trains_from_the_command_line(small_cifar, tmp_path, capsys):
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                       "--dropout_num", 4, "--head_hidden", 64, "--pool", "avg2", "--diversity", "flip+pad",
                       "--rdrop_alpha", 1)
    (run_dir,) = run_dirs(tmp_path, 4)
    config = json.loads((run_dir / "config.json").read_text())
    assert rc == 0 and (config["head_hidden"], config["pool"], config["diversity"]) == (64, "avg2", "flip+pad")
    assert "_r1.0_h64_avg2_flip+pad_s42-" in run_dir.name

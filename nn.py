"""The multi-sample dropout head, and the network it ends: a CIFAR ResNet.

Multi-sample dropout (Inoue 2019, arXiv 1905.09788): draw M dropout masks over the
same features, run every masked copy through the same (shared-weight) head, and
average the M losses. The convolutions before the dropout run once, so the extra
cost is M small head passes, which we batch into one call.

R-Drop (Liang et al. 2021) adds a consistency term between the dropout samples; here it is
R-Drop on the multi-sample head: one backbone pass, the samples differ only in the head.
"""
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn


class MultiSampleDropout(nn.Module):
    """M dropout samples of the features through the layers after the dropout (`head`).

        msd = MultiSampleDropout(nn.Linear(768, 10), num_samples=8, p=0.5)
        logits = msd(features)                          # a tensor, in training and in evaluation
        logits, loss = msd(features, target, loss_fn)   # loss: the mean over the M samples of loss_fn

    In training, logits is the mean of the M samples' logits. In evaluation dropout is off and the
    head runs once: one plain pass (no flip, no padding), the same network for every num_samples.
    num_samples=0: no dropout, the head once. num_samples=1: ordinary dropout.

    The variants that public code calls multi-sample dropout:
      reduce="loss" (the paper): the mean of the M losses, loss_fn(sample_i, target), whatever
              loss_fn's reduction (with reduction="sum", the mean of the M sums).
      reduce="logits" (the common Kaggle head): one loss of the mean of the M logits.
      heads="shared" (the paper): every sample goes through the same head.
      heads="separate": M independently initialised copies of the head, one per sample; evaluation
              uses the mean of the M heads' logits.

    `pool` (default: identity) turns the input (the ResNet's (B, C, 4, 4) map, a pooled feature of
    any model) into the head's (B, F) input. rdrop_alpha > 0 adds R-Drop's term, (alpha / 2) x
    rdrop_consistency, between the samples.

    diversity (the paper's and its patent's diversity between samples; needs a pool that keeps a
    spatial grid): M copies of the map, each flipped and/or padded by its index i, then pooled, then
    dropped out; flip first, then pad.
      "flip": the second half of the samples (i = M - M//2 .. M-1, i.e. M//2 of them) see the
              map flipped horizontally (along its width).
      "pad":  one column of zeros, on the right of the map for even i and on the left for odd i,
              before the pooling, whose average counts the zero. With 2x2/stride-2 pooling in floor
              mode the window that does not fit is dropped, so right-padded samples pool columns
              {0,1},{2,3} (as without padding) and left-padded ones {zero,0},{1,2}: the windows
              are offset by one column and the grid stays 2x2, the size the head sees in eval.
      "flip+pad": both rules (flip by half, pad by parity); with M >= 4 all four combinations occur.
    """

    def __init__(self, head, num_samples, p, rdrop_alpha=0.0, pool=None, diversity="none", reduce="loss",
                 heads="shared"):
        super().__init__()
        problem = head_problem(num_samples, p, rdrop_alpha, diversity, reduce, heads)
        if problem:
            raise ValueError(problem)
        self.num_samples, self.p, self.rdrop_alpha, self.reduce = num_samples, p, rdrop_alpha, reduce
        self.pool, self.diversity = pool or nn.Identity(), diversity
        self.head = head if heads == "shared" else nn.ModuleList([head] + [_fresh_copy(head) for _ in range(num_samples - 1)])

    def forward(self, x, target=None, loss_fn=None):
        if (target is None) != (loss_fn is None):  # one of them alone would silently give no loss
            raise ValueError("give both target and loss_fn for (logits, loss), or neither for the logits")
        logits, loss = self.logits_and_loss(x, target, loss_fn)
        return logits if target is None else (logits, loss)

    def logits_and_loss(self, x, target, loss_fn):
        if not self.training or self.num_samples == 0:
            logits = self._heads_mean(self.pool(x))
            return logits, _loss(loss_fn, logits, target)
        m, batch = self.num_samples, x.shape[0]
        # M copies stacked along the batch dim: F.dropout draws an independent mask per
        # element, so each copy gets its own mask, and a shared head runs once on M*B rows.
        if self.diversity == "none":  # the copies are equal until dropout: pool once, then copy
            features = _copies(self.pool(x), m).flatten(0, 1)
        else:  # the copies differ before pooling: copy the map, flip/pad each copy, then pool
            features = self.pool(self._diversify(_copies(x, m)).flatten(0, 1))
        dropped = F.dropout(features, self.p, training=True)
        if isinstance(self.head, nn.ModuleList):  # sample i through head i
            outputs = torch.cat([head(rows) for head, rows in zip(self.head, dropped.chunk(m))])
        else:
            outputs = self.head(dropped)
        samples = outputs.view(m, batch, *outputs.shape[1:])
        logits = samples.mean(0)
        if target is None or loss_fn is None:
            return logits, None
        if self.reduce == "logits":
            loss = loss_fn(logits, target)
        elif getattr(loss_fn, "reduction", None) == "mean":
            # Every sample has the same B targets, so one mean over the M*B rows is the mean of the
            # M per-sample means (as far as rounding goes), in one call.
            loss = loss_fn(outputs, target.repeat(m, *[1] * (target.dim() - 1)))
        else:  # any other reduction, or a plain function: the M losses one by one, then their mean
            loss = torch.stack([loss_fn(sample, target) for sample in samples]).mean(0)
        if self.rdrop_alpha:
            loss = loss + self.rdrop_alpha / 2 * rdrop_consistency(samples.flatten(2))
        return logits, loss

    def _heads_mean(self, features):
        """The head on the features; separate heads: the mean of their logits."""
        if isinstance(self.head, nn.ModuleList):
            return torch.stack([head(features) for head in self.head]).mean(0)
        return self.head(features)

    def _diversify(self, copies):
        """(M, B, C, H, W) copies of the map -> what each sample's pooling sees (see the class docstring)."""
        m = copies.shape[0]
        if "flip" in self.diversity:
            copies = torch.cat([copies[:m - m // 2], copies[m - m // 2:].flip(-1)])
        if "pad" in self.diversity:
            padded = F.pad(copies, (1, 1))  # columns [zero, x_0 .. x_{W-1}, zero]
            # even samples drop the left zero (padded on the right), odd ones the right zero
            copies = torch.stack([padded[i, ..., 1:] if i % 2 == 0 else padded[i, ..., :-1] for i in range(m)])
        return copies


def head_problem(num_samples, p, rdrop_alpha=0.0, diversity="none", reduce="loss", heads="shared"):
    """What is wrong with these head options, in one line, or None. The one place each rule lives: the class
    raises it as a ValueError, run.py (through model_problem) as its one-line error."""
    if num_samples < 0:
        return f"the number of dropout samples (--dropout_num) must be 0 or more, got {num_samples}"
    if not 0 <= p < 1:
        return f"the dropout probability (--dropout_p) must be in [0, 1), got {p}"
    if diversity not in DIVERSITIES:
        return f"diversity must be one of {', '.join(DIVERSITIES)}, got {diversity!r}"
    if not 0 <= rdrop_alpha < float("inf"):  # NaN fails too
        return f"R-Drop's weight (--rdrop_alpha) must be 0 (off) or a positive number, got {rdrop_alpha}"
    if reduce not in REDUCES or heads not in HEADS:
        return f"reduce must be one of {', '.join(REDUCES)} and heads one of {', '.join(HEADS)}, got {reduce!r}, {heads!r}"
    for option, active in (("R-Drop (--rdrop_alpha)", rdrop_alpha), ("diversity (--diversity)", diversity != "none"),
                           ("the mean of logits (--msd_reduce logits)", reduce == "logits"),
                           ("separate heads (--msd_heads separate)", heads == "separate")):
        if active and num_samples < 2:
            return f"{option} needs 2 or more dropout samples (--dropout_num), got {num_samples}"
    return None


DIVERSITIES = ("none", "flip", "pad", "flip+pad")
REDUCES = ("loss", "logits")
HEADS = ("shared", "separate")


def _fresh_copy(head):
    """A copy of head with its own initial weights: every layer that can re-initialise itself does."""
    copy = deepcopy(head)
    for layer in copy.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return copy


def _copies(x, m):
    """(B, ...) -> (M, B, ...): M equal copies (a view; flatten(0, 1) materialises them)."""
    return x.unsqueeze(0).expand(m, *x.shape)


def rdrop_consistency(logits):
    """R-Drop's term for M samples of logits (M, B, C): the mean over pairs i < j of
    (KL(p_i || p_j) + KL(p_j || p_i)) / 2, summed over classes and averaged over the batch.

    KL(p_i || p_j) + KL(p_j || p_i) = sum_c (p_i - p_j)(log p_i - log p_j); summing it over all
    ordered pairs (i, j) counts every pair i < j twice, and the diagonal is zero.
    """
    m = logits.shape[0]
    log_p = F.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    ordered_pairs = ((p[:, None] - p[None, :]) * (log_p[:, None] - log_p[None, :])).sum((0, 1, 3))  # (B,)
    # halve for the pairs i < j, divide by their number m(m-1)/2, halve for the symmetric mean
    return ordered_pairs.mean() / (2 * m * (m - 1))


def _loss(loss_fn, logits, target):
    return None if target is None or loss_fn is None else loss_fn(logits, target)


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of two BasicBlocks (strides 1,2,2,2), then the head.

    The head (see MultiSampleDropout) pools the final 4x4 map (`pool`), drops out and classifies
    with one Linear (head_hidden=0) or Linear(features, H) -> ReLU -> Linear(H, classes).
    """

    def __init__(self, widths, num_classes, dropout_num, dropout_p, rdrop_alpha=0.0,
                 head_hidden=0, pool="avg4", diversity="none", reduce="loss", heads="shared"):
        super().__init__()
        problem = resnet_head_problem(head_hidden, pool, diversity)  # MultiSampleDropout checks the rest
        if problem:
            raise ValueError(problem)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2, 2)):
            blocks += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        head = classifier_head(cin * (4 // POOLS[pool]) ** 2, head_hidden, num_classes)
        self.classifier = MultiSampleDropout(head, dropout_num, dropout_p, rdrop_alpha, pooling(pool), diversity,
                                             reduce, heads)

    def feature_map(self, x):
        return self.blocks(self.stem(x))  # (B, widths[-1], 4, 4) for 32x32 inputs

    def features(self, x):
        return self.classifier.pool(self.feature_map(x))  # the head's input at evaluation

    def forward(self, x, target=None, loss_fn=None):
        return self.classifier(self.feature_map(x), target, loss_fn)


POOLS = {"avg4": 4, "avg2": 2}  # kernel (= stride) of the average pooling over the final 4x4 map


def pooling(name):
    """avg4: the global average over the 4x4 map, (B, C); avg2: 2x2 averages with stride 2, the 2x2 grid
    kept and flattened, (B, 4C), so the head sees where a feature was."""
    return nn.Sequential(nn.AvgPool2d(POOLS[name]), nn.Flatten())  # no parameters: no state_dict keys


def classifier_head(inputs, hidden, classes):
    if hidden == 0:  # the original head: state_dict keys classifier.head.weight/bias
        return nn.Linear(inputs, classes)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


MODEL_WIDTHS = {
    "miniresnet": (32, 64, 64, 128),  # the blog code's network: 848,810 parameters for 10 classes
    "resnet18": (64, 128, 256, 512),  # the standard CIFAR ResNet-18: 11,173,962 parameters
}


def build_model(name, num_outputs, dropout_num, dropout_p, rdrop_alpha=0.0,
                head_hidden=0, pool="avg4", diversity="none", reduce="loss", heads="shared"):
    return ResNet(MODEL_WIDTHS[name], num_outputs, dropout_num, dropout_p, rdrop_alpha, head_hidden, pool, diversity,
                  reduce, heads)


# The rules on the options, each in one place: the constructors raise them as ValueErrors, run.py (model_problem)
# as its one-line errors.

def model_problem(name, dropout_num, dropout_p, rdrop_alpha=0.0, head_hidden=0, pool="avg4", diversity="none",
                  reduce="loss", heads="shared"):
    """What build_model would refuse, in one line, or None."""
    return (resnet_head_problem(head_hidden, pool, diversity)
            or head_problem(dropout_num, dropout_p, rdrop_alpha, diversity, reduce, heads))


def fit_problem(name, num_outputs, dropout_num, head_hidden=0, pool="avg4", heads="shared", batch_size=1, memory=None):
    """A run whose training step cannot fit in `memory` bytes, in one line, or None: checked before anything is
    allocated, by a lower bound on what the head alone needs. Its fp32 weights with their gradients and Adam's two
    moments, 16 bytes a weight (M sets with separate heads); and the M dropped copies of a batch_size batch's
    features, 3 bytes an element at least (2 in bf16, and a 1-byte mask), with the hidden units', 2 bytes each.
    batch_size 0: to evaluate, the weights alone, 4 bytes each."""
    inputs, hidden = MODEL_WIDTHS[name][-1] * (4 // POOLS[pool]) ** 2, head_hidden
    weights = (inputs * num_outputs if not hidden else (inputs + num_outputs) * hidden) * (dropout_num if heads == "separate" else 1)
    need = (16 if batch_size else 4) * weights + max(dropout_num, 1) * batch_size * (3 * inputs + 2 * hidden)
    if memory is None or need <= memory:
        return None
    lower = "--dropout_num, --head_hidden or --batch_size" if hidden else "--dropout_num or --batch_size"
    return (f"the head alone needs at least {need / 2**30:,.0f} GiB to train ({max(dropout_num, 1)} dropout "
            f"sample(s) of a batch of {batch_size}{f', a hidden layer of {hidden}' if hidden else ''}), more than "
            f"the device's {memory / 2**30:,.0f} GiB: lower {lower}")


def resnet_head_problem(head_hidden, pool, diversity):
    if head_hidden < 0:
        return f"the head's hidden width (--head_hidden) must be 0 (a single linear layer) or more, got {head_hidden}"
    if pool not in POOLS:
        return f"the pooling (--pool) must be one of {', '.join(POOLS)}, got {pool!r}"
    if diversity in DIVERSITIES[1:] and pool == "avg4":  # a global average forgets where a feature was
        return f"diversity {diversity!r} needs --pool avg2: after the global average of --pool avg4 a flip changes nothing"
    return None

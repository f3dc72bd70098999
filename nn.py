"""The networks: a CIFAR ResNet and seed 001's regression MLP, each ending in a multi-sample dropout head.

Multi-sample dropout (Inoue 2019, arXiv 1905.09788): draw M dropout masks over the
same features, run every masked copy through the same (shared-weight) head, and
average the M losses. The convolutions before the dropout run once, so the extra
cost is M small head passes, which we batch into one call.

R-Drop (Liang et al. 2021) adds a consistency term between the dropout samples; here it is
R-Drop on the multi-sample head: one backbone pass, the samples differ only in the head.
"""
import torch.nn.functional as F
from torch import nn


class MultiSampleDropout(nn.Module):
    """M dropout samples of `features` through one shared `head`; loss = mean of the M losses.

    num_samples=0: no dropout, the head once. num_samples=1: ordinary dropout.
    In eval mode dropout is off, so every num_samples gives exactly head(features).
    rdrop_alpha > 0 (needs num_samples >= 2) adds R-Drop's term: (alpha / 2) x rdrop_consistency.
    """

    def __init__(self, head, num_samples, p, rdrop_alpha=0.0):
        super().__init__()
        if rdrop_alpha and num_samples < 2:
            raise ValueError(f"R-Drop compares dropout samples: it needs num_samples >= 2, got {num_samples}")
        self.head, self.num_samples, self.p, self.rdrop_alpha = head, num_samples, p, rdrop_alpha

    def forward(self, features, target=None, loss_fn=None):
        if not self.training or self.num_samples == 0:
            logits = self.head(features)
            return logits, _loss(loss_fn, logits, target)
        m, batch = self.num_samples, features.shape[0]
        # M copies stacked along the batch dim: F.dropout draws an independent mask per
        # element, so each copy gets its own mask, and the head runs once on M*B rows.
        copies = features.unsqueeze(0).expand(m, *features.shape).reshape(m * batch, *features.shape[1:])
        outputs = self.head(F.dropout(copies, self.p, training=True))
        logits = outputs.view(m, batch, *outputs.shape[1:]).mean(0)
        # Every copy has the same B targets, so a mean-reduced loss over the M*B rows is
        # exactly the mean of the M per-sample losses (not the loss of the mean logits).
        targets = None if target is None else target.repeat(m, *[1] * (target.dim() - 1))  # (M*B, ...)
        loss = _loss(loss_fn, outputs, targets)
        if loss is not None and self.rdrop_alpha:
            loss = loss + self.rdrop_alpha / 2 * rdrop_consistency(outputs.view(m, batch, -1))
        return logits, loss


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
    """CIFAR ResNet: 3x3 stem, four stages of two BasicBlocks (strides 1,2,2,2), 4x4 avg pool, dropout head."""

    def __init__(self, widths, num_classes, dropout_num, dropout_p, rdrop_alpha=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2, 2)):
            blocks += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = MultiSampleDropout(nn.Linear(cin, num_classes), dropout_num, dropout_p, rdrop_alpha)

    def features(self, x):
        return F.avg_pool2d(self.blocks(self.stem(x)), 4).flatten(1)  # (B, widths[-1])

    def forward(self, x, target=None, loss_fn=None):
        return self.classifier(self.features(x), target, loss_fn)


class DropoutMLP(nn.Module):
    """Seed 001's regression network, 1-3-5-10-5-1 with sigmoids and a final ReLU.

    Dropout A sits after the 5-unit layer, dropout B after the 10-unit layer. dropout_num=0: neither;
    1: both, as in the post; M >= 2: A as in the post, and B becomes multi-sample dropout whose head is
    every layer after it.
    """

    def __init__(self, dropout_num, dropout_p):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 3), nn.Sigmoid(), nn.Linear(3, 5), nn.Sigmoid(),
                                  nn.Dropout(dropout_p) if dropout_num else nn.Identity(), nn.Linear(5, 10), nn.Sigmoid())
        head = nn.Sequential(nn.Linear(10, 5), nn.Sigmoid(), nn.Linear(5, 1), nn.ReLU())
        self.head = MultiSampleDropout(head, dropout_num, dropout_p)

    def forward(self, x, target=None, loss_fn=None):
        return self.head(self.body(x), target, loss_fn)


MODEL_WIDTHS = {
    "miniresnet": (32, 64, 64, 128),  # the seed repo's network: 848,810 parameters for 10 classes
    "resnet18": (64, 128, 256, 512),  # the standard CIFAR ResNet-18: 11,173,962 parameters
}


def build_model(name, num_outputs, dropout_num, dropout_p, rdrop_alpha=0.0):
    if name == "mlp":  # the regression demo: one input, one output, squared errors (R-Drop's KL needs classes)
        if rdrop_alpha:
            raise ValueError("R-Drop's term compares class distributions: the regression mlp has none")
        return DropoutMLP(dropout_num, dropout_p)
    return ResNet(MODEL_WIDTHS[name], num_outputs, dropout_num, dropout_p, rdrop_alpha)

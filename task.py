"""Classifying images, or fitting the regression of the post on torch.nn.Dropout: what differs between the two
(the loss, the metric, how often a row is saved, the precision, the prediction figure), in one place. The training
loop and the figures ask `task_of(dataset)`; they never test a data set's name.

No torch at import: run.py and the figures read a task without paying for it.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    classify: bool  # accuracy beside the loss: in the table, the metrics, the curves and the comparisons
    loss: str  # torch.nn's loss class: the mean over a batch in training, the sum over a set in evaluation
    loss_label: str  # the loss axis of the curves
    rows_every: int  # epochs per table row, metrics row, checkpoint and lr change
    auto_precision: str | None  # what --precision auto means: None lets the hardware decide
    predicts_grid: bool  # each row saves the eval-mode prediction on the grid (prediction.json/png)

    def loss_fn(self, reduction="mean"):
        import torch  # here, not at import (see above)
        return getattr(torch.nn, self.loss)(reduction=reduction)


CLASSIFICATION = Task(classify=True, loss="CrossEntropyLoss", loss_label="cross-entropy loss", rows_every=1,
                      auto_precision=None, predicts_grid=False)
# Ten points, a row per 100 epochs of 10 steps; the targets reach 100, too coarse for bf16's 8 bits of mantissa.
REGRESSION = Task(classify=False, loss="MSELoss", loss_label="mean squared error", rows_every=100,
                  auto_precision="fp32", predicts_grid=True)


def task_of(dataset):
    return REGRESSION if dataset == "quadratic" else CLASSIFICATION

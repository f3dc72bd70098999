"""A thin layer over tqdm: a live bar per epoch on a terminal, one fixed-width line per epoch always."""
import sys

from tqdm import tqdm

# (name, width, format) of the per-epoch table's columns
COLUMNS = [("epoch", 5, "d"), ("lr", 8, ".1e"), ("train_loss", 10, ".4f"), ("train_acc", 9, ".4f"),
           ("valid_loss", 10, ".4f"), ("valid_acc", 9, ".4f"), ("seconds", 7, ".1f")]


class EpochBar:
    """Bar over one epoch's steps with loss, accuracy and ETA; silent without a TTY (CI, nohup)."""

    def __init__(self, steps, epoch, epochs, show=True):
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step",
                        dynamic_ncols=True, disable=not (show and sys.stderr.isatty()))

    @property
    def enabled(self):
        return not self.bar.disable

    def update(self, step, loss, acc):
        """Move to `step` (counted from 1) showing the running loss and accuracy."""
        self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self):
        self.bar.close()


def print_header():
    tqdm.write("  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))


def print_row(row):
    tqdm.write("  ".join(f"{row[name]:>{width}{fmt}}" for name, width, fmt in COLUMNS))

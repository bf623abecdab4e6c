"""Callbacks of a training run: resumable history, best weights, curves, NaN stop."""

import csv
import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

HISTORY_CSV = "history.csv"
BEST_WEIGHTS = "best.weights.h5"
BEST_JSON = "best.json"
CURVES_PNG = "curves.png"


class LossDivergedError(RuntimeError):
    """Raised when the training loss becomes NaN or Inf."""


def _atomic_write_text(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_history(out):
    """Returns the rows of ``out/history.csv`` as dicts of floats (``epoch`` is 1-based)."""
    path = Path(out) / HISTORY_CSV
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot_curves(rows, path, title=""):
    """Writes train (dashed) and validation (solid) error per epoch, like Figure 3(b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, [100 * (1 - r["accuracy"]) for r in rows], "--", color="C0",
            label="train error")
    if rows and "val_accuracy" in rows[0]:
        ax.plot(epochs, [100 * (1 - r["val_accuracy"]) for r in rows], "-", color="C0",
                label="validation error")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".tmp.{Path(path).name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


class RunLogger(keras.callbacks.Callback):
    """Writes the run's history CSV, best weights and curves, consistently across resumes.

    Each epoch appends a row (1-based ``epoch``, the fit logs, ``lr``, ``seconds``) to
    ``history.csv`` (rewritten atomically), saves ``best.weights.h5`` and ``best.json``
    when ``monitor`` improves, and redraws ``curves.png``. When ``fit`` starts at a
    later epoch (``BackupAndRestore`` resumed it), rows from that epoch on are dropped
    first: they belong to an epoch whose backup never completed and is run again.
    Place it before ``BackupAndRestore`` in the callback list.

    Args:
        out: output folder.
        monitor: metric to maximise for the best weights.
        title: title of the curves plot.
    """

    def __init__(self, out, monitor="val_accuracy", title=""):
        super().__init__()
        self.out = Path(out)
        self.monitor = monitor
        self.title = title
        self.rows = None

    def on_train_begin(self, logs=None):
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = None
        best_path = self.out / BEST_JSON
        self.best = json.loads(best_path.read_text()) if best_path.exists() else None

    def on_epoch_begin(self, epoch, logs=None):
        if self.rows is None:  # first epoch of this fit: keep what came before it
            self.rows = [r for r in read_history(self.out) if r["epoch"] <= epoch]
        self._lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row.update(lr=self._lr, seconds=round(seconds, 3))
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [",".join(fields)]
        lines += [",".join(_fmt(r.get(k, "")) for k in fields) for r in self.rows]
        _atomic_write_text(self.out / HISTORY_CSV, "\n".join(lines) + "\n")

        value = row.get(self.monitor)
        if value is not None and (self.best is None or value > self.best["value"]):
            tmp = self.out / f".tmp.{BEST_WEIGHTS}"
            self.model.save_weights(tmp, overwrite=True)
            os.replace(tmp, self.out / BEST_WEIGHTS)
            self.best = {"monitor": self.monitor, "value": value, "epoch": epoch + 1}
            _atomic_write_text(self.out / BEST_JSON, json.dumps(self.best, indent=1))
        plot_curves(self.rows, self.out / CURVES_PNG, self.title)


def _fmt(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` that raises ``LossDivergedError`` naming the epoch and batch.

    It raises instead of stopping gracefully, so ``BackupAndRestore`` keeps the last
    good epoch's backup.
    """

    def __init__(self, hint=""):
        super().__init__(raise_error=True)
        self.hint = hint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise LossDivergedError(
                f"The training loss became {float(loss)} at epoch {self._epoch + 1}, batch "
                f"{batch + 1}; training stopped. {self.hint}"
            )

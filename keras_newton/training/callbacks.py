"""Callbacks of a training run: resumable history, best weights, curves, NaN stop, time
budget."""

import csv
import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

from keras_newton.files import atomic_write_text
from keras_newton.training.schedules import epoch_lr

HISTORY_CSV = "history.csv"
BEST_WEIGHTS = "best.weights.h5"
BEST_JSON = "best.json"
CURVES_PNG = "curves.png"
BUDGET_JSON = "budget.json"


class LossDivergedError(RuntimeError):
    """Raised when the training loss becomes NaN or Inf."""


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
        atomic_write_text(self.out / HISTORY_CSV, "\n".join(lines) + "\n")

        value = row.get(self.monitor)
        if value is not None and (self.best is None or value > self.best["value"]):
            tmp = self.out / f".tmp.{BEST_WEIGHTS}"
            self.model.save_weights(tmp, overwrite=True)
            os.replace(tmp, self.out / BEST_WEIGHTS)
            self.best = {"monitor": self.monitor, "value": value, "epoch": epoch + 1}
            atomic_write_text(self.out / BEST_JSON, json.dumps(self.best, indent=1))
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


def milestone_lr(recipe, epoch, epochs):
    """The recipe's schedule per epoch (``epoch`` 0-based of ``epochs``): ``lr`` times
    ``lr_factor`` per milestone passed (milestones are fractions of ``epochs``), after the
    ``warmup_epochs`` first epochs (`schedules.epoch_lr`)."""
    return epoch_lr(recipe, epoch, epochs)


class TimeBudget(keras.callbacks.Callback):
    """Fits the recipe's step schedule into ``seconds`` of wall time.

    After ``probe_epochs`` epochs (the first one also compiles), the epochs that still fit
    (at the median duration of the epochs after the first, plus 5%) fix the run's length,
    at most the recipe's ``epochs``; the learning-rate milestones are fractions of that
    length. Until the first milestone is reached, the length is planned again after every
    epoch, so that a slow start (a busy machine, a warming-up accelerator) does not leave
    the budget unused; no epoch that has run changes its lr. The plan is kept in
    ``out/budget.json``, and a resumed run keeps it as it is. Training also stops whenever
    the next epoch would end past the budget; it always runs the probe epochs. The model
    must be compiled with a constant learning rate, which this callback sets at each epoch.

    Args:
        recipe: the run's recipe (``epochs``, ``lr``, ``lr_factor``, ``lr_milestones``).
        seconds: the budget, counted from ``start``.
        out: the run's output folder.
        start: ``time.monotonic()`` at which the budget began (default: at ``fit``).
        probe_epochs: epochs timed before the length is fixed.
    """

    def __init__(self, recipe, seconds, out, start=None, probe_epochs=2):
        super().__init__()
        self.recipe, self.seconds, self.path = recipe, float(seconds), Path(out) / BUDGET_JSON
        self.start, self.probe_epochs = start, probe_epochs
        self.epochs = None
        self._resumed = False
        self._durations = []

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.monotonic()
        if self.path.exists():
            self.epochs = json.loads(self.path.read_text())["epochs"]
            self._resumed = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        self.model.optimizer.learning_rate = milestone_lr(
            self.recipe, epoch, self.epochs or self.recipe["epochs"])

    def _plan(self, epoch, left, per_epoch):
        """The run's length after ``epoch``: what fits, but never so short that an epoch
        already run would fall past the first milestone."""
        epochs = min(self.recipe["epochs"], epoch + 1 + max(0, int(left // per_epoch)))
        planned = self.epochs or self.recipe["epochs"]
        while epochs < self.recipe["epochs"] and milestone_lr(
                self.recipe, epoch, epochs) != milestone_lr(self.recipe, epoch, planned):
            epochs += 1
        return epochs

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        if epoch > 0 or self.probe_epochs == 1:  # the first epoch's time includes compiling
            self._durations.append(now - self._epoch_start)
        if epoch + 1 < self.probe_epochs:
            return
        last = (now - self._epoch_start) * 1.05
        left = self.seconds - (now - self.start)
        first_milestone = min(self.recipe["lr_milestones"], default=1.0)
        if not self._resumed and (self.epochs is None
                                  or epoch + 1e-9 < first_milestone * self.epochs):
            per_epoch = float(np.median(self._durations or [last / 1.05]))
            epochs = self._plan(epoch, left, per_epoch * 1.05)
            if epochs != self.epochs:
                self.epochs = epochs
                atomic_write_text(self.path, json.dumps(
                    {"seconds": self.seconds, "epochs": self.epochs, "decided_after_epoch":
                     epoch + 1, "epoch_seconds": round(per_epoch, 3)}, indent=1))
                print(f"Time budget: {self.epochs} epochs fit in {self.seconds:g} s "
                      f"({per_epoch:.1f} s per epoch).")
        if epoch + 1 >= self.epochs or left < last:
            self.model.stop_training = True


class StopAfter(keras.callbacks.Callback):
    """Pauses the run at the end of the last epoch that fits in ``seconds`` of this call.

    Unlike `TimeBudget`, it leaves the run's length and schedule alone: the run is paused
    (``paused``), and the same command continues it at the next epoch. The next epoch is
    expected to take as long as the longest epoch of this call after its first (which
    also compiles), plus 5%; after the first epoch, that epoch's time.

    Args:
        seconds: wall time of this call, counted from ``start``.
        start: ``time.monotonic()`` at which the call began (default: at ``fit``).
    """

    def __init__(self, seconds, start=None):
        super().__init__()
        self.seconds, self.start = float(seconds), start
        self.paused = False
        self._durations = []

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.monotonic()
        self.paused = False
        self._durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self._durations.append(now - self._epoch_start)
        if getattr(self.model, "stop_training", False) or epoch + 1 >= self.params.get(
                "epochs", math.inf):
            return  # the run ends here anyway
        expected = max(self._durations[1:] or self._durations) * 1.05
        if now - self.start + expected > self.seconds:
            self.model.stop_training = True
            self.paused = True
            print(f"Paused after epoch {epoch + 1}: another epoch (~{expected:.0f} s) would "
                  f"end past {self.seconds:g} s; rerun the command to continue.")


class Backup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that keeps its backup when the run is paused (`StopAfter`).

    Args:
        backup_dir: the backup folder.
        stop_after: the run's `StopAfter` callback, or None.
        **kwargs: ``BackupAndRestore`` arguments.
    """

    def __init__(self, backup_dir, stop_after=None, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.stop_after = stop_after

    def on_train_end(self, logs=None):
        if self.stop_after is None or not self.stop_after.paused:
            super().on_train_end(logs)

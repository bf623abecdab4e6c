"""Stochastic weight averaging (Izmailov et al., 2018), the recipe's ``swa_epochs``.

A run with ``swa_epochs=N`` averages its trainable weights after each of its last N
epochs (`WeightAverage`, kept in float32 in ``swa.npz`` beside the light state, so that
the average survives a pause and a move to another machine) and, when the last epoch is
done, makes the average its result (`finish`): the BatchNormalization statistics are
recomputed for the averaged weights over one pass of the training batches
(`recompute_batch_norm`), the model is evaluated on the validation split, and
``best.weights.h5`` / ``best.json`` hold it (``best.json`` with ``swa_epochs``). Pair it
with a learning rate that keeps the weights moving, e.g. ``schedule="constant"``.
"""

import json
import os
from pathlib import Path

import keras
import numpy as np

from keras_newton.files import atomic_write_text
from keras_newton.training.light_state import BEST_JSON, BEST_WEIGHTS, SWA_NPZ


def _load(path):
    with np.load(path, allow_pickle=False) as f:
        return {"epoch": int(f["epoch"]), "count": int(f["count"]),
                "average": [f[f"w{i}"].astype("float32") for i in range(int(f["arrays"]))]}


def _save(path, epoch, count, average):
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, epoch=epoch, count=count, arrays=len(average),
             **{f"w{i}": a for i, a in enumerate(average)})
    os.replace(tmp, path)


def _check_fits(state, model, path):
    shapes = [tuple(v.shape) for v in model.trainable_weights]
    if [a.shape for a in state["average"]] != shapes:
        raise ValueError(f"{path} averages other weights than the model's "
                         f"({len(state['average'])} arrays, the model's {len(shapes)} "
                         f"trainable ones). Received: out={str(path.parent)!r}")


class WeightAverage(keras.callbacks.Callback):
    """Averages the trainable weights after each of the last ``swa_epochs`` of ``epochs``
    epochs into ``out/swa.npz`` (a running mean; the file names the last epoch added).

    Args:
        out: the run folder.
        epochs: the run's epochs.
        swa_epochs: how many of the last epochs are averaged.
        epochs_done: epochs finished before this call (a resumed run's).

    Raises (at the start of training) ValueError when ``swa.npz`` does not belong to the
    run's position: missing though averaged epochs are done, or from another epoch.
    """

    def __init__(self, out, epochs, swa_epochs, epochs_done=0):
        super().__init__()
        self.path = Path(out) / SWA_NPZ
        self.first = epochs - swa_epochs + 1  # 1-based first averaged epoch
        self.epochs_done = int(epochs_done)

    def on_train_begin(self, logs=None):
        state = _load(self.path) if self.path.exists() else None
        done, averaged = self.epochs_done, max(0, self.epochs_done - self.first + 1)
        self.epoch, self.count, self.average = self.first - 1, 0, None
        if state is not None:
            _check_fits(state, self.model, self.path)
            self.epoch, self.count, self.average = (state["epoch"], state["count"],
                                                    state["average"])
        if averaged and (self.epoch, self.count) == (done - 1, averaged - 1):
            # Stopped after the epoch's light state but before its average: the model
            # holds that epoch's weights; add them now.
            self._add(done)
        elif not (self.epoch == done and self.count == averaged) and (state or averaged):
            found = (f"is at epoch {self.epoch} with {self.count} epochs averaged"
                     if state else "is missing")
            raise ValueError(
                f"The weight average {self.path} {found}; the run resumes after epoch "
                f"{done}, when {averaged} are averaged: restore the run folder's swa.npz "
                f"with its light state. Received: out={str(self.path.parent)!r}")

    def _add(self, epoch):
        weights = [keras.ops.convert_to_numpy(v).astype("float32")
                   for v in self.model.trainable_weights]
        self.count += 1
        if self.average is None:
            self.average = weights
        else:
            self.average = [a + (w - a) / self.count
                            for a, w in zip(self.average, weights, strict=True)]
        self.epoch = epoch
        _save(self.path, epoch, self.count, self.average)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.first:
            self._add(epoch + 1)


def batch_norm_layers(model):
    """Every ``BatchNormalization`` in ``model``, nested layers (a CG Block's) included."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def _each_batch(batches):
    if isinstance(batches, keras.utils.PyDataset):
        for i in range(len(batches)):
            yield batches[i]
    else:
        yield from batches


def recompute_batch_norm(model, batches):
    """Sets every BatchNormalization's moving mean and variance to the average of its
    batch statistics over ``batches`` (``(x, y)`` pairs; ``model(x, training=True)``
    runs on each, eagerly), as ``torch.optim.swa_utils.update_bn`` does. Returns the
    number of batches."""
    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    n = 0
    try:
        for n, (x, _) in enumerate(_each_batch(batches), 1):
            for layer in layers:  # moving = (1 - 1/n) moving + (1/n) batch: a plain mean
                layer.momentum = 1.0 - 1.0 / n
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return n


def finish(model, out, train_batches, val_batches):
    """Makes the average of ``out/swa.npz`` the run's result: loads it into ``model``,
    recomputes the BatchNormalization statistics over ``train_batches``, evaluates on
    ``val_batches`` and writes ``best.weights.h5`` and ``best.json``. Returns best.json
    (None, changing nothing, when no epoch was averaged)."""
    out = Path(out)
    if not (out / SWA_NPZ).exists():  # stopped before the window (a callback's early stop)
        print(f"No weight average in {out}: no epoch of the averaging window ran; the "
              "result is the best epoch.")
        return None
    state = _load(out / SWA_NPZ)
    _check_fits(state, model, out / SWA_NPZ)
    for variable, value in zip(model.trainable_weights, state["average"], strict=True):
        variable.assign(value.astype(variable.dtype))
    batches = recompute_batch_norm(model, train_batches)
    value = float(model.evaluate(val_batches, verbose=0, return_dict=True)["accuracy"])
    tmp = out / f".tmp.{BEST_WEIGHTS}"
    model.save_weights(tmp, overwrite=True)
    os.replace(tmp, out / BEST_WEIGHTS)
    first = state["epoch"] - state["count"] + 1
    best = {"monitor": "val_accuracy", "value": value, "epoch": state["epoch"],
            "swa_epochs": state["count"], "swa_first_epoch": first,
            "batch_norm_batches": batches}
    atomic_write_text(out / BEST_JSON, json.dumps(best, indent=1))
    print(f"Weight average of epochs {first}-{state['epoch']} (SWA; BatchNormalization "
          f"statistics from {batches} training batches): validation accuracy {value:.4f}.")
    return best

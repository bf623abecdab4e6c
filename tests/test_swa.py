"""Weight averaging (``swa_epochs``) and the constant schedule, against NumPy by hand."""

import json
import shutil

import keras
import numpy as np
import pytest
from test_data import make_image_tree

from keras_newton.models import NewtonCGNet10
from keras_newton.training import compile_for_recipe, get_recipe, light_state, train
from keras_newton.training.cli import command_from_config
from keras_newton.training.schedules import epoch_lr, recipe_lr
from keras_newton.training.swa import WeightAverage, recompute_batch_norm


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """3 classes x 12 training images, 32x32; a private cache."""
    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))
    make_image_tree(tmp_path / "images", per_class={"train": 12})
    return tmp_path / "images"


@pytest.mark.backend_agnostic
def test_constant_schedule_by_hand():
    # 3 epochs of 10 steps, 1 linear warm-up epoch to lr 0.05, then 0.05 to the end.
    recipe = get_recipe("cifar10", True, epochs=3, lr=0.05, warmup_epochs=1, warmup="linear",
                        schedule="constant")
    steps = (0, 4, 9, 10, 29)
    expected = [0.005, 0.025, 0.05, 0.05, 0.05]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    compile_for_recipe(model, recipe, steps_per_epoch=10)
    compiled = []
    for step in steps:
        model.optimizer.iterations.assign(step)
        compiled.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    np.testing.assert_allclose(compiled, expected, rtol=1e-6)
    np.testing.assert_allclose([recipe_lr(recipe, s, 10) for s in steps], expected, rtol=1e-12)
    np.testing.assert_allclose([epoch_lr(recipe, e, 3) for e in range(3)], [0.05] * 3)


def test_swa_options_are_checked(tmp_path):
    for value, message in [(-1, "Received: swa_epochs=-1"), (5, r"\[0, 4\].*swa_epochs=5"),
                           (True, "Received: swa_epochs=True"), (1.5, "swa_epochs=1.5")]:
        with pytest.raises(ValueError, match=message):
            get_recipe("cifar10", True, epochs=4, swa_epochs=value)
    with pytest.raises(ValueError, match=r"constant schedule.*Received: warmup_epochs=2"):
        get_recipe("cifar10", epochs=2, warmup_epochs=2, schedule="constant")
    with pytest.raises(ValueError, match=r"time_budget=60.*swa_epochs=2"):
        train(model="newton_cgnet10", dataset="cifar10", data=tmp_path, epochs=4,
              swa_epochs=2, time_budget=60, out=tmp_path / "run")
    from keras_newton.training.text import train_text

    with pytest.raises(ValueError, match="Received: swa_epochs=2"):
        train_text(model="newton_cgnet_text", dataset="ag_news", data=tmp_path, epochs=4,
                   swa_epochs=2, out=tmp_path / "text")


def dense_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.BatchNormalization()])
    model.compile(optimizer="sgd", loss="mse")
    return model


def end_epoch(callback, model, epoch, weights):
    model.set_weights(weights)
    callback.on_epoch_end(epoch)


def stored_average(folder):
    with np.load(folder / "swa.npz") as f:
        return int(f["epoch"]), int(f["count"]), [f[f"w{i}"] for i in range(int(f["arrays"]))]


@pytest.mark.backend_agnostic
def test_weight_average_of_the_last_epochs_by_hand(tmp_path, rng):
    """5 epochs, the last 3 averaged: the running mean equals NumPy's mean of epochs 3-5,
    across a resume, after a stop between the light state and the average, and it refuses
    an average from another epoch."""
    model = dense_model()
    shapes = [w.shape for w in model.get_weights()]
    epochs = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(5)]
    trainable = len(model.trainable_weights)  # kernel, bias, gamma, beta (not the BN stats)

    def expected(first, last):
        return [np.mean([epochs[e][i] for e in range(first - 1, last)], axis=0)
                for i in range(trainable)]

    def resume_after_4_and_check_epoch_5():
        resumed = WeightAverage(tmp_path, epochs=5, swa_epochs=3, epochs_done=4)
        resumed.set_model(model)
        resumed.on_train_begin()
        end_epoch(resumed, model, 4, epochs[4])
        epoch, count, got = stored_average(tmp_path)
        assert (epoch, count) == (5, 3)
        for g, e in zip(got, expected(3, 5), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)

    average = WeightAverage(tmp_path, epochs=5, swa_epochs=3)
    average.set_model(model)
    average.on_train_begin()
    for epoch in range(3):  # epochs 1-3: only epoch 3 is averaged
        end_epoch(average, model, epoch, epochs[epoch])
    saved_after_3 = (tmp_path / "swa.npz").read_bytes()
    end_epoch(average, model, 3, epochs[3])
    epoch, count, got = stored_average(tmp_path)
    assert (epoch, count) == (4, 2)
    for g, e in zip(got, expected(3, 4), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)

    # Resumed after epoch 4 (a new process): epoch 5 joins the stored average.
    resume_after_4_and_check_epoch_5()

    # Stopped after epoch 4's light state, before its average: the model holds epoch 4's
    # weights when the run resumes after epoch 4, and they are added first.
    (tmp_path / "swa.npz").write_bytes(saved_after_3)
    model.set_weights(epochs[3])
    resume_after_4_and_check_epoch_5()

    # An average of epoch 3 cannot continue a run resumed after epoch 5; none at all
    # cannot continue one resumed inside the window.
    (tmp_path / "swa.npz").write_bytes(saved_after_3)
    for done in (5, 2):
        stale = WeightAverage(tmp_path, epochs=5, swa_epochs=3, epochs_done=done)
        stale.set_model(model)
        if done == 2:  # before the window, an average cannot exist yet
            with pytest.raises(ValueError, match=r"at epoch 3 .*after epoch 2"):
                stale.on_train_begin()
        else:
            with pytest.raises(ValueError, match=r"at epoch 3 with 1 .*after epoch 5, when 3"):
                stale.on_train_begin()
    (tmp_path / "swa.npz").unlink()
    missing = WeightAverage(tmp_path, epochs=5, swa_epochs=3, epochs_done=4)
    missing.set_model(model)
    with pytest.raises(ValueError, match=r"is missing; .*after epoch 4, when 2 are averaged"):
        missing.on_train_begin()
    # Another model's average is refused.
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    wrong = WeightAverage(tmp_path, epochs=5, swa_epochs=3, epochs_done=4)
    wrong.set_model(other)
    (tmp_path / "swa.npz").write_bytes(saved_after_3)
    with pytest.raises(ValueError, match="averages other weights"):
        wrong.on_train_begin()


class Wrapper(keras.layers.Layer):
    """A layer holding a BatchNormalization, as a CG Block does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization(momentum=0.99)

    def call(self, x, training=None):
        return self.bn(x * 2.0, training=training)


@pytest.mark.backend_agnostic
def test_batch_norm_statistics_are_the_mean_of_the_batches(rng):
    inputs = keras.Input((4,))
    outer = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Model(inputs, outer(Wrapper()(inputs)))
    batches = [(rng.normal(loc=m, scale=s, size=(16, 4)).astype("float32"), None)
               for m, s in ((0.0, 1.0), (3.0, 2.0), (-1.0, 0.5))]
    assert recompute_batch_norm(model, batches) == 3
    inner = model.layers[1].bn
    xs = [2.0 * x for x, _ in batches]  # the wrapper doubles its input
    np.testing.assert_allclose(keras.ops.convert_to_numpy(inner.moving_mean),
                               np.mean([x.mean(0) for x in xs], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(inner.moving_variance),
                               np.mean([x.var(0) for x in xs], 0), rtol=1e-4)
    # The outer one sees the inner one's output in training mode: per batch, mean 0 and
    # variance var / (var + eps) with beta 0, gamma 1.
    eps = inner.epsilon
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outer.moving_variance),
                               np.mean([x.var(0) / (x.var(0) + eps) for x in xs], 0), rtol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outer.moving_mean), 0, atol=1e-5)
    assert (inner.momentum, outer.momentum) == (0.99, 0.9)  # restored


class EpochWeights(keras.callbacks.Callback):
    """Records the trainable weights after each epoch."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def on_epoch_end(self, epoch, logs=None):
        self.record[epoch + 1] = [keras.ops.convert_to_numpy(v).copy()
                                  for v in self.model.trainable_weights]


@pytest.mark.slow  # three calls of `train`
@pytest.mark.backend_agnostic
@pytest.mark.jax_heavy
def test_swa_run_pauses_moves_and_ends_with_the_average(tiny, tmp_path, capsys):
    """3 epochs at a constant lr, the last 2 averaged: paused after epochs 1 and 2, moved
    (snapshot), finished; the result's trainable weights are the mean of epochs 2 and 3."""
    out = tmp_path / "run"
    settings = dict(model="newton_cgnet10", dataset="folder", data=tiny, out=out, epochs=3,
                    batch_size=8, val_size=6, verbose=0, distribute="none", augment=True,
                    schedule="constant", lr=0.02, swa_epochs=2)
    record = {}
    for epochs_done in (1, 2):
        paused = train(**settings, stop_after=1e-3, callbacks=[EpochWeights(record)])
        assert paused["status"] == "paused" and paused["epochs"] == epochs_done
    assert (out / "swa.npz").exists()
    snap = tmp_path / "in_progress"
    assert "swa.npz" in light_state.snapshot(out, snap)
    moved = tmp_path / "elsewhere"
    shutil.copytree(snap, moved)
    summary = train(**{**settings, "out": moved}, callbacks=[EpochWeights(record)])
    assert "Weight average of epochs 2-3" in capsys.readouterr().out
    best = json.loads((moved / "best.json").read_text())
    assert (best["epoch"], best["swa_epochs"], best["swa_first_epoch"]) == (3, 2, 2)
    assert best["batch_norm_batches"] == 3  # 30 training images, batches of 8
    assert summary["best_val_accuracy"] == best["value"] and summary["best_epoch"] == 3

    result = NewtonCGNet10(classes=3)
    result.load_weights(moved / "best.weights.h5")
    last = NewtonCGNet10(classes=3)
    last.load_weights(moved / "last.weights.h5")
    for got, a, b in zip(result.trainable_weights, record[2], record[3], strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), (a + b) / 2, rtol=1e-5,
                                   atol=1e-7)
    moving = [v for v in result.non_trainable_weights if "moving_mean" in v.path]
    last_moving = [v for v in last.non_trainable_weights if "moving_mean" in v.path]
    assert moving and not all(
        np.allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(moving, last_moving, strict=True))  # recomputed
    # The finished run's snapshot keeps the average as its best weights.
    assert "best.weights.h5" in light_state.snapshot(moved, tmp_path / "done")
    config = json.loads((moved / "config.json").read_text())
    assert (config["swa_epochs"], config["schedule"]) == (2, "constant")
    command = command_from_config(config, "train.tar.xz")
    assert "--swa-epochs 2" in command and "--schedule constant" in command


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX backend's path")
@pytest.mark.slow
@pytest.mark.backend_agnostic
@pytest.mark.jax_heavy
def test_swa_on_device_averages_the_device_weights(tiny, tmp_path):
    """``on_device`` (data on the accelerator): the average is of the weights the device
    trained, and the BatchNormalization pass runs on host batches."""
    record = {}
    train(model="newton_cgnet10", dataset="folder", data=tiny, out=tmp_path / "run",
          epochs=2, batch_size=8, val_size=6, verbose=0, distribute="none", augment=True,
          schedule="constant", lr=0.02, swa_epochs=2, on_device=True,
          callbacks=[EpochWeights(record)])
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert (best["swa_epochs"], best["batch_norm_batches"]) == (2, 3)
    result = NewtonCGNet10(classes=3)
    result.load_weights(tmp_path / "run" / "best.weights.h5")
    assert not np.allclose(record[1][0], record[2][0])
    for got, a, b in zip(result.trainable_weights, record[1], record[2], strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), (a + b) / 2, rtol=1e-5,
                                   atol=1e-7)

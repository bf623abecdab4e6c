"""Training: recipes, the `train` command end to end, resume after a kill, NaN, bad input."""

import hashlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from test_data import make_image_tree

from keras_newton import cli as main_cli
from keras_newton.data import CIFAR10_CLASSES, channel_stats, holdout_split, load_dataset, pipeline
from keras_newton.models import NewtonCGNet10
from keras_newton.training import (
    RECIPES,
    LossDivergedError,
    compile_for_recipe,
    get_recipe,
    light_state,
    read_history,
    train,
)
from keras_newton.training import callbacks as callbacks_module
from keras_newton.training import cli as train_cli
from keras_newton.training import trainer as trainer_module
from keras_newton.training.callbacks import StopAfter, TimeBudget, milestone_lr
from keras_newton.training.losses import SparseCategoricalCrossentropyWithSmoothing
from keras_newton.training.recipes import recorded_recipe
from keras_newton.training.schedules import RecipeSchedule, epoch_lr, recipe_lr

REPO = Path(__file__).resolve().parents[1]
jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX backend's path")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """3 classes x 12 training + 2 test images, 32x32; a private cache."""
    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))
    make_image_tree(tmp_path / "images", per_class={"train": 12, "test": 2})
    return tmp_path / "images"


def tiny_run(data, out, **kwargs):
    """30 training images in 3 steps of 8, 6 validation images; one device."""
    settings = dict(model="newton_cgnet10", dataset="folder", data=data, out=out, epochs=2,
                    batch_size=8, val_size=6, verbose=0, distribute="none")
    return {**settings, **kwargs}


def test_recipes_are_the_papers():
    for name in ("C10", "C10+", "C100", "C100+", "SVHN"):  # Section 4.1.2
        recipe = RECIPES[name]
        assert recipe["optimizer"] == "sgd" and recipe["momentum"] == 0.9 and recipe["nesterov"]
        assert recipe["batch_size"] == 128 and recipe["lr"] == 0.1
        assert recipe["lr_milestones"] == [0.5, 0.75] and recipe["lr_factor"] == 0.1
    for name in ("C10", "C10+", "C100", "C100+"):
        assert RECIPES[name]["epochs"] == 300 and RECIPES[name]["weight_decay"] == 5e-4
        assert RECIPES[name]["val_size"] == 5000
    assert [RECIPES[n]["dropout"] for n in ("C10+", "C100+", "SVHN", "C10", "C100")] == [
        0.2, 0.2, 0.3, 0.4, 0.4]
    assert RECIPES["SVHN"]["epochs"] == 40 and RECIPES["SVHN"]["weight_decay"] == 1e-4
    assert not RECIPES["SVHN"]["augment"] and RECIPES["C10+"]["augment"]
    imagenet = get_recipe("imagenet")  # Section 4.1.5
    assert (imagenet["lr"], imagenet["batch_size"], imagenet["dropout"], imagenet["epochs"]) == (
        0.1, 256, 0.2, 100)
    assert [round(m * 100) for m in imagenet["lr_milestones"]] == [30, 60, 90]
    assert imagenet["lr_factor"] == 0.1 and imagenet["augment"] and imagenet["nesterov"]


def test_get_recipe_picks_and_overrides():
    assert get_recipe("cifar10", augment=True)["recipe"] == "C10+"
    assert get_recipe("cifar100")["dropout"] == 0.4
    assert get_recipe("svhn")["recipe"] == "SVHN"
    recipe = get_recipe("cifar10", True, lr=0.05, epochs=5, dropout=None)
    assert recipe["lr"] == 0.05 and recipe["epochs"] == 5 and recipe["dropout"] == 0.2
    with pytest.raises(ValueError, match="Received: learning_rate=0.1"):
        get_recipe("cifar10", learning_rate=0.1)
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        get_recipe("cifar10", batch_size=0)
    with pytest.raises(ValueError, match="Received: dropout=1.0"):
        get_recipe("cifar10", dropout=1.0)


def test_lr_is_divided_by_10_at_50_and_75_percent():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    compile_for_recipe(model, get_recipe("cifar10", epochs=4), steps_per_epoch=10)
    optimizer = model.optimizer
    lrs = {}
    for step in (0, 19, 20, 29, 30, 39):
        optimizer.iterations.assign(step)
        lrs[step] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    np.testing.assert_allclose(list(lrs.values()), [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
                               rtol=1e-6)
    assert optimizer.nesterov and optimizer.momentum == 0.9


def test_warmup_epochs_start_at_lr_times_factor():
    """He et al.'s ResNet-110 start: lr * lr_factor for the warmup epochs, then the
    recipe's schedule, per step (compiled) and per epoch (TimeBudget's `milestone_lr`)."""
    recipe = get_recipe("cifar10", epochs=8, warmup_epochs=2, lr=0.2)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    compile_for_recipe(model, recipe, steps_per_epoch=10)
    lrs = []
    for step in (0, 19, 20, 39, 40, 59, 60, 79):
        model.optimizer.iterations.assign(step)
        lrs.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    np.testing.assert_allclose(lrs, [0.02, 0.02, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002],
                               rtol=1e-6)
    np.testing.assert_allclose([milestone_lr(recipe, e, 8) for e in range(8)],
                               [0.02, 0.02, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-6)
    assert get_recipe("cifar10")["warmup_epochs"] == 0  # the paper has none
    with pytest.raises(ValueError, match=r"warmup_epochs.*Received: warmup_epochs=-1"):
        get_recipe("cifar10", warmup_epochs=-1)
    with pytest.raises(ValueError, match=r"first lr milestone.*Received: warmup_epochs=4"):
        get_recipe("cifar10", epochs=8, warmup_epochs=4)


class Clock:
    """A fake ``time.monotonic``."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def budget_epochs(clock, budget, seconds_per_epoch, tmp_path, epochs=300, resume_from=None):
    """Drives `TimeBudget` through epochs of the given durations; returns the callback, the
    epochs run and the lr set at each."""
    recipe = get_recipe("cifar10", epochs=epochs)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    budget = TimeBudget(recipe, budget, tmp_path, start=0.0)
    budget.set_model(model)
    budget.on_train_begin()
    lrs = []
    for epoch, seconds in enumerate(seconds_per_epoch):
        if resume_from is not None and epoch < resume_from:
            continue
        budget.on_epoch_begin(epoch)
        lrs.append(round(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 6))
        clock.now += seconds
        budget.on_epoch_end(epoch)
        if model.stop_training:
            break
    return budget, lrs


def test_time_budget_fits_the_schedule_into_the_budget(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    # Epoch 1 (compile) 30 s, then 10 s each: after epoch 2, 60 s are left, at 10.5 s per
    # epoch 5 more fit: 7 epochs, lr / 10 at epoch 3.5 -> 4 and 5.25 -> 6 (0-based).
    budget, lrs = budget_epochs(clock, 100, [30] + [10] * 20, tmp_path)
    assert budget.epochs == 7 and len(lrs) == 7
    assert lrs == [0.1] * 4 + [0.01] * 2 + [0.001]
    assert clock.now <= 100
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["epochs"] == 7 and saved["decided_after_epoch"] == 2
    assert saved["epoch_seconds"] == 10

    # Resumed at epoch 5 with a fresh clock: the saved length and schedule are kept.
    clock.now = 0.0
    _, lrs = budget_epochs(clock, 100, [30] + [10] * 20, tmp_path, resume_from=4)
    assert lrs == [0.01] * 2 + [0.001]

    # Never more than the recipe's epochs; the schedule is then the plain recipe's.
    (tmp_path / "budget.json").unlink()
    clock.now = 0.0
    budget, lrs = budget_epochs(clock, 1000, [1] * 20, tmp_path, epochs=4)
    assert budget.epochs == 4 and lrs == [0.1, 0.1, 0.01, 0.001]


def test_time_budget_plans_again_until_the_first_milestone(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    # A slow start (30 s compile, 20 s, 20 s), then 10 s epochs, budget 200 s. The plan
    # uses the median of the epochs after the first (x 1.05): after epoch 2, 150 // 21 ->
    # 9 epochs; after 5, 110 // 15.75 -> 11; after 6, 100 // 10.5 -> 15 (milestones 7.5
    # and 11.25). From epoch 9 on (past 15 * 0.5, at lr 0.01) the plan is fixed.
    durations = [30, 20, 20] + [10] * 30
    budget, lrs = budget_epochs(clock, 200, durations, tmp_path)
    assert budget.epochs == 15 and lrs == [0.1] * 8 + [0.01] * 4 + [0.001] * 3
    assert clock.now == 190
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["epochs"] == 15 and saved["decided_after_epoch"] == 6
    assert saved["epoch_seconds"] == 10

    # A resumed run keeps the saved plan, however fast its epochs are now.
    clock.now = 0.0
    budget, lrs = budget_epochs(clock, 200, [1] * 40, tmp_path, resume_from=2)
    assert budget.epochs == 15 and lrs == [0.1] * 6 + [0.01] * 4 + [0.001] * 3


def test_time_budget_never_moves_a_milestone_before_an_epoch_that_ran(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    # 9 epochs planned after epoch 2; epoch 4 takes 40 s: 30 s left fit 2 more (6 epochs),
    # but epoch 4 ran at lr 0.1, past 6 * 0.5: the plan becomes 7, and the run stops, as
    # a fifth epoch of 42 s would end past the budget.
    budget, lrs = budget_epochs(clock, 100, [10, 10, 10, 40, 10, 10], tmp_path)
    assert budget.epochs == 7 and lrs == [0.1] * 4 and clock.now == 70


@pytest.mark.backend_agnostic
def test_time_budget_lr_is_the_one_the_steps_use(tmp_path):
    """The compiled step reads the lr that the callback sets (0: nothing moves)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    zero = {**get_recipe("cifar10", epochs=3), "lr": 0.0}
    model.fit(x, y, epochs=3, batch_size=4, verbose=0,
              callbacks=[TimeBudget(zero, 3600, tmp_path)])
    for w, w0 in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, w0)
    model.optimizer.learning_rate = 0.0
    model.fit(x, y, epochs=1, batch_size=4, verbose=0,  # and at the callback's 0.1 they move
              callbacks=[TimeBudget(get_recipe("cifar10", epochs=1), 3600, tmp_path / "b")])
    assert not np.array_equal(model.get_weights()[0], before[0])


def test_time_budget_stops_before_an_epoch_that_would_not_fit(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    # Planned 2 + (100 - 50) // 10.5 = 6 epochs, but epoch 4 takes 20 s: the run stops
    # there (at 80 s), as a fifth epoch of 20 s would end past 100 s.
    budget, lrs = budget_epochs(clock, 100, [40, 10, 10, 20, 20, 20], tmp_path)
    assert budget.epochs == 6
    assert len(lrs) == 4 and clock.now == 80


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.backend_agnostic  # the GPU script trains with JAX
def test_train_with_a_time_budget(tiny, tmp_path):
    summary = train(**tiny_run(tiny, tmp_path / "run", epochs=4), time_budget=3600)
    assert summary["epochs"] == 4 and summary["time_budget"] == 3600
    rows = read_history(tmp_path / "run")
    np.testing.assert_allclose([r["lr"] for r in rows], [0.1, 0.1, 0.01, 0.001], rtol=1e-6)
    assert json.loads((tmp_path / "run" / "budget.json").read_text())["epochs"] == 4
    # A budget too short for the timed epochs: test_zoo_add_registers_a_time_budgeted_run.


def test_train_command_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "newton_cgnet_10", "--dataset", "folder", "--data", str(tiny),
            "--augment", "--epochs", "2", "--batch-size", "8", "--val-size", "6",
            "--lr", "0.05", "--out", str(out), "--verbose", "0", "--distribute", "none"]
    assert train_cli.main(argv) == 0
    assert "best validation accuracy" in capsys.readouterr().out
    for name in ("config.json", "preprocessing.json", "history.csv", "best.weights.h5",
                 "best.json", "curves.png", "model.keras", "summary.json"):
        assert (out / name).exists(), name
    if importlib.util.find_spec("tensorboard"):  # else skipped with a warning
        assert any((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "backup").exists()  # deleted once the run completed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "newton_cgnet10" and summary["epochs"] == 2
    assert summary["recipe"]["lr"] == 0.05 and summary["recipe"]["augment"]
    assert summary["recipe"]["dropout"] == 0.2 and summary["recipe"]["weight_decay"] == 5e-4
    assert summary["train_images"] == 30 and summary["val_images"] == 6
    assert summary["test_accuracy"] is not None  # the source has a test split
    assert summary["seconds_per_epoch"] > 0
    assert summary["command"].startswith("keras-newton train --model newton_cgnet_10")
    assert 0 <= summary["best_val_accuracy"] <= 1

    # mean/std of the training part (hold-out excluded), written beside the weights.
    source = load_dataset("folder", data=tiny)
    train_idx, _ = holdout_split(source.labels, 6, seed=0)
    mean, std = channel_stats(source.images[train_idx])
    pre = json.loads((out / "preprocessing.json").read_text())
    np.testing.assert_allclose(pre["mean"], mean, atol=1e-3)
    np.testing.assert_allclose(pre["std"], std, atol=1e-3)
    assert pre["class_names"] == ["cat", "dog", "frog"]
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"accuracy", "loss", "val_accuracy", "val_loss", "lr", "seconds"} <= set(rows[0])

    model = keras.saving.load_model(out / "model.keras")
    assert model.output_shape == (None, 3)

    # A completed run is not silently retrained; other settings are refused by name.
    assert train_cli.main(argv) == 2
    assert "completed run" in capsys.readouterr().err
    assert train_cli.main([*argv[:-4], "--lr", "0.01", "--verbose", "0"]) == 2
    assert "Received: out=" in capsys.readouterr().err


class Crash(keras.callbacks.Callback):
    """Simulates a kill right after epoch 1 was backed up."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights = [w.copy() for w in self.model.get_weights()]
            raise RuntimeError("killed after epoch 1")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_train_begin(self, logs=None):
        self.start_weights = [w.copy() for w in self.model.get_weights()]
        self.start_iterations = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_end(self, logs=None):
        self.iterations = int(self.model.optimizer.iterations.numpy())


def spy_on_training_batches(monkeypatch):
    """Records ``(first_epoch, labels of the first batch)`` of each training pipeline
    that `train` builds."""
    seen = []

    def spy(*args, training, **kwargs):
        data = pipeline.batches(*args, training=training, **kwargs)
        if training:
            first = next(data.as_numpy_iterator()) if hasattr(data, "as_numpy_iterator") \
                else data[0]
            seen.append((kwargs["first_epoch"], first[1].tolist()))
        return data

    monkeypatch.setattr(trainer_module, "batches", spy)
    return seen


def test_rerun_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pipelines = spy_on_training_batches(monkeypatch)
    crash = Crash()
    with pytest.raises(RuntimeError, match="killed after epoch 1"):
        train(**tiny_run(tiny, out, epochs=3), callbacks=[crash])
    first_rows = read_history(out)
    assert [r["epoch"] for r in first_rows] == [1]
    assert (out / "backup").exists() and not (out / "summary.json").exists()

    recorder = Recorder()
    summary = train(**tiny_run(tiny, out, epochs=3), callbacks=[recorder])
    assert recorder.epochs == [1, 2]  # resumed at epoch 2 (0-based 1)
    # The rerun's pipeline draws its own order: a fresh process would replay the first's.
    assert [first_epoch for first_epoch, _ in pipelines] == [0, 1]
    assert pipelines[0][1] != pipelines[1][1]
    assert recorder.start_iterations == 3  # optimizer state of epoch 1 restored
    assert recorder.iterations == 9
    for restored, saved in zip(recorder.start_weights, crash.weights, strict=True):
        np.testing.assert_array_equal(restored, saved)
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0] == first_rows[0]  # epoch 1 kept as it was
    assert summary["epochs"] == 3 and len(summary["epoch_seconds"]) == 3
    assert not (out / "backup").exists()


def test_nan_loss_stops_with_a_clear_message(tiny, tmp_path):
    class Poison(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                kernel = self.model.get_layer("predictions").kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    out = tmp_path / "run"
    with pytest.raises(LossDivergedError, match=r"became nan at epoch 1, batch 2.*lower "
                       r"learning rate or warm-up.*received: lr=0.1, warmup_epochs=0\)"):
        train(**tiny_run(tiny, out, model="resnet20"), callbacks=[Poison()])
    assert not (out / "summary.json").exists()


def test_baseline_has_no_dropout(tiny, tmp_path):
    with pytest.raises(ValueError, match="resnet20 has no dropout layers. Received: dropout=0.3"):
        train(**tiny_run(tiny, tmp_path / "run", model="resnet_20", dropout=0.3))


@pytest.mark.parametrize("change,message", [
    ({"model": "newton_cgnet_9"}, r"Valid names: \[.*'newton_cgnet10'.*Received: model="),
    ({"dataset": "mnist"}, r"Valid names: \['cifar10'.*Received: dataset='mnist'"),
    ({"data": "missing.tar.xz"}, r"does not exist. Received: data="),
    ({"dataset": "folder", "data": None}, r"Received: data=None"),
    ({"limit": 0}, r"Received: limit=0"),
    ({"time_budget": 0}, r"positive number of seconds or None. Received: time_budget=0"),
    ({"time_budget": 60, "distribute": "multiworker"}, r"needs one process.*Received: "
     r"time_budget=60, distribute='multiworker'"),
    ({"batch_size": 64}, r"larger than the 30 training images. Received: batch_size=64"),
    ({"val_size": 36}, r"Received: val_size=36"),
    ({"distribute": "tpu"}, r"Received: distribute='tpu'"),
])
def test_bad_input(tiny, tmp_path, change, message):
    settings = tiny_run(tiny, tmp_path / "run")
    settings.update(change)
    with pytest.raises(ValueError, match=message):
        train(**settings)


def test_corrupt_archive_in_train(tiny, tmp_path):
    archive = tmp_path / "broken.tar.xz"
    archive.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(ValueError, match="corrupt. Received: data="):
        train(**tiny_run(archive, tmp_path / "run"))


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    assert main_cli.COMMANDS["train"] == "keras_newton.training.cli"
    code = train_cli.main(["--model", "resnet21", "--dataset", "cifar10", "--out",
                           str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-newton train: error: Unknown model") and "resnet20" in err


def gpu_script_env(tmp_path):
    """The GPU machine's setting for zoo/gpu_train.sh on this CPU: JAX, TensorFlow hidden, a
    10-class archive of 8 images per class. Returns ``(repo root, env, archive)``."""
    import os
    import sys
    import tarfile

    hide = tmp_path / "hide_tf"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(  # `import tensorflow` fails, find_spec is None
        "import sys\nfor m in ('tensorflow', 'tensorflow_text', 'tensorflow_datasets', "
        "'tf2onnx', 'keras_tuner'):\n    sys.modules[m] = None\n")  # as on the GPU machine
    make_image_tree(tmp_path / "images", classes=CIFAR10_CLASSES, per_class={"train": 8})
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "images" / "train", arcname="train")
    env = {**os.environ, "PYTHONPATH": str(hide), "KERAS_NEWTON_HOME": str(tmp_path / "home"),
           "DATA": str(archive), "RUNS": str(tmp_path / "runs"), "CACHE": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # cache every program
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("KERAS_BACKEND", None)
    return REPO, env, archive


@pytest.mark.slow  # about 2 minutes: JAX compiles Newton-CGNet-10 on CPU
@pytest.mark.heavy
def test_gpu_script_without_tensorflow(tmp_path):
    """zoo/gpu_train.sh as on the GPU machine: JAX, bf16, TensorFlow absent, two models side
    by side, one tar each back."""
    import subprocess
    import tarfile

    root, env, _ = gpu_script_env(tmp_path)
    env.update({"DEPTHS": "10 16", "EPOCHS_10": "2", "EPOCHS_16": "4", "WARMUP_16": "1",
                "EXTRA_ARGS": "--val-size 20 --batch-size 20", "OUT": str(tmp_path / "out")})
    done = subprocess.run(["bash", str(root / "zoo" / "gpu_train.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {}
    for model, epochs in (("newton_cgnet10", 2), ("newton_cgnet16", 4)):  # side by side
        log = (tmp_path / "out" / f"{model}.log").read_text()  # each run's Keras output
        assert "TensorBoard logs are skipped" in log and f"Epoch {epochs}/{epochs}" in log
        assert f"{model}: exit 0" in done.stdout
        with tarfile.open(tmp_path / "out" / f"{model}.tar") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
            tar.extractall(tmp_path / "back", filter="data")
        assert names == sorted(f"{model}/{n}" for n in (
            "best.json", "best.weights.h5", "budget.json", "config.json", "curves.png",
            "history.csv", "legs.json", "preprocessing.json", "state.json", "summary.json"))
        run = runs[model] = tmp_path / "back" / model
        summary = json.loads((run / "summary.json").read_text())
        assert summary["backend"] == "jax" and summary["mixed_precision"] is True
        assert summary["epochs"] == epochs and summary["time_budget"] == 460  # 480 s - 20
        assert json.loads((run / "config.json").read_text())["augment"] is True
    assert "warmup_epochs" not in json.loads((runs["newton_cgnet10"] / "config.json")
                                             .read_text())  # 0, the paper's: not recorded
    lrs = [row["lr"] for row in read_history(runs["newton_cgnet16"])]
    np.testing.assert_allclose(lrs, [0.01, 0.1, 0.01, 0.001], rtol=1e-6)  # WARMUP_16=1
    # The weights, optimizer state stripped, load into a fresh model.
    model = NewtonCGNet10(weights=str(runs["newton_cgnet10"] / "best.weights.h5"))
    assert model.output_shape == (None, 10)


# --- Short schedules: cosine decay, linear warm-up, label smoothing -----------------------

def compiled_lrs(recipe, steps, steps_per_epoch=10):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    compile_for_recipe(model, recipe, steps_per_epoch=steps_per_epoch)
    lrs = []
    for step in steps:
        model.optimizer.iterations.assign(step)
        lrs.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    return lrs


@pytest.mark.backend_agnostic
def test_cosine_schedule_with_linear_warmup_by_hand():
    # 4 epochs of 10 steps, 1 linear warm-up epoch, lr 0.2: steps 0-9 ramp 0.02, 0.04, ...,
    # 0.2; then 0.1 * (1 + cos(pi * (step - 10) / 30)).
    recipe = get_recipe("cifar10", True, epochs=4, lr=0.2, warmup_epochs=1, warmup="linear",
                        schedule="cosine")
    steps = (0, 4, 9, 10, 25, 39)
    expected = [0.02, 0.1, 0.2, 0.2, 0.1, 0.1 * (1 - 0.9945218953682733)]  # cos(29 pi/30)
    np.testing.assert_allclose(compiled_lrs(recipe, steps), expected, rtol=1e-5)
    np.testing.assert_allclose([recipe_lr(recipe, s, 10) for s in steps], expected, rtol=1e-12)
    # Per epoch (TimeBudget's form): the ramp's end, then the cosine at each epoch's start.
    np.testing.assert_allclose([epoch_lr(recipe, e, 4) for e in range(4)],
                               [0.2, 0.2, 0.15, 0.05], rtol=1e-12)
    assert isinstance(RecipeSchedule.from_recipe(recipe, 10), RecipeSchedule)


@pytest.mark.backend_agnostic
def test_other_warmup_and_schedule_combinations_by_hand():
    # The paper's steps after a 2-epoch linear warm-up (8 epochs): ramp, 0.2, 0.02 from
    # step 40, 0.002 from step 60.
    recipe = get_recipe("cifar10", epochs=8, lr=0.2, warmup_epochs=2, warmup="linear")
    steps = (0, 19, 20, 39, 40, 59, 60, 79)
    expected = [0.01, 0.2, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002]
    np.testing.assert_allclose(compiled_lrs(recipe, steps), expected, rtol=1e-6)
    np.testing.assert_allclose([recipe_lr(recipe, s, 10) for s in steps], expected, rtol=1e-12)
    # Cosine after a constant warm-up (lr * lr_factor), 3 epochs: 0.02 for steps 0-9, then
    # 0.1 * (1 + cos(pi * (step - 10) / 20)).
    recipe = get_recipe("cifar10", epochs=3, lr=0.2, warmup_epochs=1, schedule="cosine")
    steps = (0, 9, 10, 20, 29)
    expected = [0.02, 0.02, 0.2, 0.1, 0.1 * (1 - 0.9876883405951378)]  # cos(19 pi/20)
    np.testing.assert_allclose(compiled_lrs(recipe, steps), expected, rtol=1e-5)
    # Cosine without warm-up: lr at step 0, lr / 2 halfway.
    recipe = get_recipe("cifar10", epochs=2, schedule="cosine")
    np.testing.assert_allclose(compiled_lrs(recipe, (0, 10)), [0.1, 0.05], rtol=1e-6)


def test_short_schedule_options_are_checked():
    for change, message in [({"schedule": "exp"}, r"Received: schedule='exp'"),
                            ({"warmup": "cubic"}, r"Received: warmup='cubic'"),
                            ({"label_smoothing": 1.0}, r"Received: label_smoothing=1.0"),
                            ({"schedule": "cosine", "epochs": 2, "warmup_epochs": 2},
                             r"cosine schedule.*Received: warmup_epochs=2")]:
        with pytest.raises(ValueError, match=message):
            get_recipe("cifar10", True, **change)
    # With the cosine, the warm-up may pass the step schedule's first milestone.
    assert get_recipe("cifar10", epochs=4, warmup_epochs=3, schedule="cosine")


def test_new_options_are_recorded_only_when_set():
    """Configs of runs started before the options (no such keys) still match: the options
    at their defaults are not recorded."""
    plain = recorded_recipe(get_recipe("cifar10", True, dropout=0.0, epochs=120))
    assert not {"warmup_epochs", "warmup", "schedule", "label_smoothing"} & set(plain)
    # The run in progress resumes with its command: its config is what `train` records
    # (the flags of zoo/in_progress/README.md).
    committed = json.loads((REPO / "zoo" / "in_progress" / "ncg82_sgdr80" / "config.json")
                           .read_text())
    recorded = recorded_recipe(get_recipe("cifar10", True, dropout=0.2, epochs=80,
                                          schedule="cosine", warmup_epochs=2, warmup="linear",
                                          label_smoothing=0.1))
    skip = ("data", "data_key", "init_weights")
    assert {k: v for k, v in committed.items() if k not in skip} == {
        "model": "newton_cgnet82", "dataset": "cifar10", "limit": None, "seed": 0, **recorded}
    short = recorded_recipe(get_recipe("cifar10", True, schedule="cosine", warmup_epochs=2,
                                       warmup="linear", label_smoothing=0.1, epochs=40))
    assert (short["schedule"], short["warmup"], short["warmup_epochs"],
            short["label_smoothing"]) == ("cosine", "linear", 2, 0.1)
    # A constant warm-up records its epochs only (as before the `warmup` option).
    assert "warmup" not in recorded_recipe(get_recipe("cifar10", warmup_epochs=1))


@pytest.mark.backend_agnostic
def test_label_smoothing_loss_by_hand():
    loss = SparseCategoricalCrossentropyWithSmoothing(0.1)
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]], "float32")
    # targets (1 - 0.1) * one_hot + 0.1 / 3
    by_hand = [-(0.9 + 0.1 / 3) * np.log(0.9) - 2 * (0.1 / 3) * np.log(0.05),
               -(0.1 / 3) * np.log(0.2) - (0.9 + 0.1 / 3) * np.log(0.7)
               - (0.1 / 3) * np.log(0.1)]
    np.testing.assert_allclose(float(loss(np.array([0, 1]), p)), np.mean(by_hand), rtol=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(np.array([[0], [1]]), p)
    np.testing.assert_allclose(float(SparseCategoricalCrossentropyWithSmoothing(0.0)(
        np.array([[0], [1]]), p)), float(plain), rtol=1e-6)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    compile_for_recipe(model, get_recipe("cifar10", label_smoothing=0.1), steps_per_epoch=1)
    assert model.loss.label_smoothing == 0.1
    restored = SparseCategoricalCrossentropyWithSmoothing.from_config(model.loss.get_config())
    assert restored.label_smoothing == 0.1


def test_run_model_file_loads_with_only_the_package_imported(tmp_path):
    """A cosine / warm-up / label-smoothing run's ``model.keras`` holds this package's
    schedule and loss in its compile config: ``import keras_newton`` registers them."""
    from helpers import run_python

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    recipe = get_recipe("cifar10", augment=True, epochs=4, schedule="cosine", warmup_epochs=1,
                        warmup="linear", label_smoothing=0.1)
    compile_for_recipe(model, recipe, steps_per_epoch=2)
    model.fit(np.ones((4, 4), "float32"), np.arange(4) % 3, batch_size=2, verbose=0)
    model.save(tmp_path / "model.keras")
    lr = float(model.optimizer.learning_rate)  # the schedule at step 2 (warm-up ended)
    out = run_python(
        "import sys, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "print(type(m.optimizer._learning_rate).__name__, type(m.loss).__name__, "
        "int(m.optimizer.iterations), float(m.optimizer.learning_rate))\n",
        tmp_path / "model.keras")
    name, loss, step, got_lr = out.split()[-4:]
    assert (name, loss, step) == ("RecipeSchedule", "SparseCategoricalCrossentropyWithSmoothing",
                                  "2")
    assert float(got_lr) == pytest.approx(lr)


# --- Pausing, the light state, resuming on another machine -----------------------------

def test_stop_after_pauses_at_the_last_epoch_that_fits(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.stop_training = False  # as `fit` sets it
    stop = StopAfter(100, start=0.0)
    stop.set_model(model)
    stop.set_params({"epochs": 300})
    stop.on_train_begin()
    ran = 0
    # Epoch 1 (compiling) 30 s, then 10 s: after epoch 7 (90 s) the next (10.5 s) would end
    # past 100 s.
    for epoch, seconds in enumerate([30] + [10] * 20):
        stop.on_epoch_begin(epoch)
        clock.now += seconds
        stop.on_epoch_end(epoch)
        ran += 1
        if model.stop_training:
            break
    assert ran == 7 and stop.paused and clock.now == 90
    # At the run's last epoch it does not pause: the run ends.
    model.stop_training = False
    stop.set_params({"epochs": 1})
    stop.on_train_begin()
    stop.on_epoch_begin(0)
    clock.now += 500
    stop.on_epoch_end(0)
    assert not stop.paused and not model.stop_training


class StartState(keras.callbacks.Callback):
    """Records the epochs run and the state at the start of `fit`."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_train_begin(self, logs=None):
        self.weights = [w.copy() for w in self.model.get_weights()]
        optimizer = self.model.optimizer
        self.iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self.slots = [keras.ops.convert_to_numpy(v) for v in optimizer.variables
                      if "momentum" in v.path]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.mark.slow  # three calls of `train`
@pytest.mark.heavy
@pytest.mark.backend_agnostic
def test_light_state_resumes_elsewhere_without_momentum(tiny, tmp_path, capsys):
    """Two calls paused by --stop-after (the second resumes the backup), a snapshot, and
    the run continued from it in a fresh folder: next epoch, exact lr, history kept."""
    out = tmp_path / "run"
    settings = tiny_run(tiny, out, epochs=4, schedule="cosine", warmup_epochs=1,
                        warmup="linear", augment=True)
    first = train(**settings, stop_after=1e-3)
    assert first["status"] == "paused" and first["epochs"] == 1
    assert not (out / "summary.json").exists() and (out / "backup").exists()
    resumed = StartState()
    assert train(**settings, stop_after=1e-3, callbacks=[resumed])["epochs"] == 2
    assert resumed.epochs == [1] and resumed.iterations == 3  # the backup, with momentum
    assert any(np.abs(s).max() > 0 for s in resumed.slots)
    state = json.loads((out / "state.json").read_text())
    assert (state["epochs_done"], state["iterations"], state["steps_per_epoch"]) == (2, 6, 3)
    model = NewtonCGNet10(classes=3)
    model.load_weights(out / "last.weights.h5")
    weights_after_2 = [w.copy() for w in model.get_weights()]

    snap = tmp_path / "in_progress" / "run"
    names = light_state.snapshot(out, snap)
    assert "backup" not in names and "last.weights.h5" in names and names[-1] == "SHA256SUMS"
    light_state.check_sums(snap)
    with h5py.File(snap / "last.weights.h5") as f:
        assert "optimizer" not in f
    best = json.loads((snap / "best.json").read_text())
    assert (snap / "best.weights.h5").exists() == (best["epoch"] != 2)

    # Elsewhere: the committed folder, copied to a new place, resumes with --resume's
    # settings (here `train` itself, to watch the start).
    moved = tmp_path / "elsewhere"
    shutil.copytree(snap, moved)
    light = StartState()
    summary = train(**{**settings, "out": moved}, callbacks=[light])
    assert "from its light state" in capsys.readouterr().out
    assert light.epochs == [2, 3] and light.iterations == 6
    # No momentum came with it: the slots are zeros (JAX builds them before `fit` starts)
    # or not built yet (TensorFlow builds them at the first step, from zeros).
    assert all(np.abs(s).max() == 0 for s in light.slots)
    for restored, saved in zip(light.weights, weights_after_2, strict=True):
        np.testing.assert_array_equal(restored, saved)
    rows = read_history(moved)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == read_history(out)[:2]
    # epoch 3 starts at step 6: 0.05 * (1 + cos(pi * (6 - 3) / 9)) = 0.075; epoch 4: 0.025
    np.testing.assert_allclose([r["lr"] for r in rows], [0.1 / 3, 0.1, 0.075, 0.025],
                               rtol=1e-5)
    assert summary["status"] == "completed" and summary["epochs"] == 4
    assert [leg["resumed_from"] for leg in summary["legs"]] == ["start", "backup", "light"]
    assert [leg["first_epoch"] for leg in summary["legs"]] == [1, 2, 3]
    assert not (moved / "SHA256SUMS").exists()  # it described the state it resumed from


@pytest.mark.slow
@pytest.mark.heavy
def test_light_state_is_checked_and_a_newer_one_wins(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed after epoch 1"):
        train(**tiny_run(tiny, out, epochs=3), callbacks=[Crash()])
    snap = tmp_path / "snap"
    light_state.snapshot(out, snap)
    (snap / "history.csv").write_text("epoch\n1\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS: history.csv \(sha256 differs\)"):
        train(**tiny_run(tiny, snap, epochs=3))
    # A backup older than the light state (a newer state copied over the folder) is set
    # aside; one as recent is preferred (it has the momentum).
    state = json.loads((out / "state.json").read_text())
    assert light_state.resume_kind(out) == "backup"
    (out / "state.json").write_text(json.dumps({**state, "epochs_done": 2}))
    assert light_state.resume_kind(out) == "light"
    assert (out / "backup.old").exists() and not (out / "backup").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_resume_flag_takes_the_settings_from_config(tiny, tmp_path, capsys):
    """A folder holding only a config.json (a run created for another machine) starts with
    `--resume`; later calls continue it; --data is checked by content."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(**tiny_run(tiny, out, epochs=3, label_smoothing=0.1, dropout=0.0),
              callbacks=[Crash()])
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "images" and config["data_key"].startswith("folder-")
    assert config["label_smoothing"] == 0.1 and "schedule" not in config
    fresh = tmp_path / "fresh"  # --config-only writes the config `train` writes
    assert train_cli.main(["--config-only", "--model", "newton_cgnet10", "--dataset", "folder",
                           "--data", str(tiny), "--epochs", "3", "--batch-size", "8",
                           "--val-size", "6", "--label-smoothing", "0.1", "--dropout", "0",
                           "--out", str(fresh)]) == 0
    assert json.loads((fresh / "config.json").read_text()) == config
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json"]
    argv = ["--resume", "--out", str(fresh), "--data", str(tiny), "--verbose", "0",
            "--distribute", "none", "--stop-after", "0.001"]
    assert train_cli.main(argv) == 0
    assert "paused after epoch 1 of 3" in capsys.readouterr().out
    assert json.loads((fresh / "config.json").read_text()) == config
    assert train_cli.main([*argv, "--lr", "0.3"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert train_cli.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "needs the run's config.json" in capsys.readouterr().err


def test_command_from_config_is_portable():
    config = json.loads((REPO / "zoo" / "in_progress" / "ncg82_sgdr80" / "config.json")
                        .read_text())
    plain = {**config, "model": "newton_cgnet10", "epochs": 120, "dropout": 0.0}
    for key in ("warmup_epochs", "warmup", "schedule", "label_smoothing", "init_weights"):
        del plain[key]
    assert train_cli.command_from_config(
        plain, "../shared/datasets/cifar10-jpeg/train.tar.xz", out="runs/ncg10_d0_e120") == (
        "keras-newton train --model newton_cgnet10 --dataset cifar10 --data "
        "../shared/datasets/cifar10-jpeg/train.tar.xz --augment --epochs 120 --dropout 0 "
        "--out runs/ncg10_d0_e120")
    short = {**plain, "epochs": 40, "dropout": 0.2, "schedule": "cosine", "warmup": "linear",
             "warmup_epochs": 2, "label_smoothing": 0.1}
    assert train_cli.command_from_config(short, "PATH/train.tar.xz").endswith(
        "--data PATH/train.tar.xz --augment --epochs 40 --schedule cosine --warmup linear "
        "--warmup-epochs 2 --label-smoothing 0.1")


# --- The JAX path with the data on the device ----------------------------------------

def test_on_device_needs_jax_and_one_device(tiny, tmp_path):
    if keras.backend.backend() == "jax":
        pytest.skip("the TensorFlow backend's refusal")
    with pytest.raises(ValueError, match="needs the JAX backend.*Received: on_device=True"):
        train(**tiny_run(tiny, tmp_path / "run"), on_device=True)
    with pytest.raises(ValueError, match=r"cosine.*Received: time_budget=60, schedule='cosine'"):
        train(**tiny_run(tiny, tmp_path / "run", schedule="cosine"), time_budget=60)


def test_execution_length_divides_the_epoch_when_it_can():
    from keras_newton.training.on_device import execution_length

    assert execution_length(351, 64) == 39 and execution_length(351, 39) == 39
    assert execution_length(352, 64) == 44 and execution_length(10, 100) == 10  # 352 = 8 * 44
    assert execution_length(353, 64) == 64  # prime: the last call takes the rest
    assert execution_length(7, 1) == 1


def _shifts_and_flip(original, augmented, shift=4):
    """The (dy, dx, flipped) of every zero-filled shift of ``original`` (mirrored or not)
    that equals ``augmented``."""
    h, w = original.shape[:2]
    padded = np.pad(original, ((shift, shift), (shift, shift), (0, 0)))
    found = []
    for flipped in (False, True):
        for r in range(2 * shift + 1):
            for c in range(2 * shift + 1):
                crop = padded[r:r + h, c:c + w]
                if np.array_equal(crop[:, ::-1] if flipped else crop, augmented):
                    found.append((r - shift, c - shift, flipped))
    return found


@pytest.mark.backend_agnostic
@jax_only
def test_device_augmentation_is_the_pipelines():
    """Every augmented image is a zero-filled shift within +-4 pixels, mirrored or not, of
    its source, as in pipeline._shift_and_flip; shifts and flips vary."""
    import jax

    from keras_newton.data.pipeline import _shift_and_flip
    from keras_newton.training.on_device import shift_and_flip

    images = np.random.default_rng(0).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    ours = np.asarray(jax.jit(shift_and_flip)(images, jax.random.key(1)))
    reference = _shift_and_flip(images, 4, np.random.default_rng(1))
    assert ours.dtype == np.uint8 and ours.shape == images.shape
    seen = []
    for batch in (ours, reference):
        found = [_shifts_and_flip(x, y) for x, y in zip(images, batch, strict=True)]
        assert all(len(f) == 1 for f in found)  # nonzero pixels: exactly one explanation
        seen.append([f[0] for f in found])
    for kind in seen:
        assert 16 <= sum(f for _, _, f in kind) <= 48  # about half mirrored
        assert {dy for dy, _, _ in kind} | {dx for _, dx, _ in kind} <= set(range(-4, 5))
        assert len({(dy, dx) for dy, dx, _ in kind}) > 20


def small_model(classes=3):
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, strides=2),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes, activation="softmax")])
    return model


def learnable(n, rng):
    """Images whose class is the brightest channel."""
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, 32, 32, 3))
    images[np.arange(n), :, :, labels] += 120
    return images.astype(np.uint8), labels


@pytest.mark.backend_agnostic
@jax_only
def test_on_device_step_is_keras_train_step():
    """One on-device step over all images (no augmentation) gives the weights of
    ``train_on_batch`` on the same images, normalised on the host."""
    from keras_newton.training.on_device import fit_on_device

    rng = np.random.default_rng(0)
    images, labels = learnable(16, rng)
    mean, std = [110.0, 100.0, 90.0], [60.0, 50.0, 40.0]
    a, b = small_model(), small_model()
    b.set_weights(a.get_weights())
    recipe = get_recipe("cifar10", epochs=1, label_smoothing=0.1)
    for model in (a, b):
        compile_for_recipe(model, recipe, steps_per_epoch=1)
    fit_on_device(a, (images, labels), None, mean, std, epochs=1, batch_size=16,
                  augment=False, verbose=0)
    b.train_on_batch((images.astype("float32") - mean) / np.asarray(std, "float32"), labels)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=2e-5, atol=2e-6)
    assert int(a.optimizer.iterations.numpy()) == 1


@pytest.mark.backend_agnostic
@jax_only
def test_on_device_training_learns_and_resumes(tmp_path):
    """Calls of 3 steps (a loop, as on GPUs) per epoch: the loss falls; the callbacks see
    the usual logs; a second fit from a backup continues at the next epoch."""
    from keras_newton.training.on_device import fit_on_device

    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = learnable(96, rng), learnable(20, rng)
    mean, std = [120.0] * 3, [70.0] * 3
    model = small_model()
    compile_for_recipe(model, get_recipe("cifar10", epochs=6, lr=0.2), steps_per_epoch=6)
    backup = tmp_path / "backup"
    crash = Crash()  # after epoch 1, with the backup written
    with pytest.raises(RuntimeError, match="killed after epoch 1"):
        fit_on_device(model, (x, y), (xv, yv), mean, std, epochs=6, batch_size=16,
                      steps_per_execution=4, loop=True, verbose=0, callbacks=[
                          keras.callbacks.BackupAndRestore(str(backup)), crash])
    fresh = small_model()
    compile_for_recipe(fresh, get_recipe("cifar10", epochs=6, lr=0.2), steps_per_epoch=6)
    start = StartState()
    history = fit_on_device(fresh, (x, y), (xv, yv), mean, std, epochs=6, batch_size=16,
                            steps_per_execution=4, loop=True, verbose=0, callbacks=[
                                keras.callbacks.BackupAndRestore(str(backup)), start])
    assert start.epochs == [1, 2, 3, 4, 5] and start.iterations == 6
    for restored, saved in zip(start.weights, crash.weights, strict=True):
        np.testing.assert_array_equal(restored, saved)
    losses = history.history["loss"]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert losses[-1] < 0.7 * losses[0] and history.history["val_accuracy"][-1] > 0.6
    assert int(fresh.optimizer.iterations.numpy()) == 36  # 6 epochs x 6 steps (3 + 3)


@pytest.mark.backend_agnostic
@jax_only
def test_on_device_loop_is_the_steps_one_by_one():
    """Without augmentation (same batches), 3 steps in a loop per call give the weights of
    one step per call (the CPU's default)."""
    from keras_newton.training.on_device import fit_on_device

    rng = np.random.default_rng(1)
    (x, y), (xv, yv) = learnable(48, rng), learnable(10, rng)
    a, b = small_model(), small_model()
    b.set_weights(a.get_weights())
    logs = {}
    for model, loop in ((a, True), (b, False)):
        compile_for_recipe(model, get_recipe("cifar10", epochs=2, schedule="cosine"), 3)
        logs[loop] = fit_on_device(model, (x, y), (xv, yv), [110.0] * 3, [60.0] * 3,
                                   epochs=2, batch_size=16, augment=False, loop=loop,
                                   steps_per_execution=3, verbose=0).history
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(logs[True][key], logs[False][key], rtol=1e-4)


@pytest.mark.slow  # about 2 minutes: JAX compiles Newton-CGNet-10 twice on this CPU
@pytest.mark.heavy
@pytest.mark.backend_agnostic
@jax_only
def test_train_on_device_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    settings = tiny_run(tiny, out, epochs=2, augment=True, schedule="cosine")
    first = train(**settings, on_device=True, steps_per_execution=2, stop_after=1e-3)
    assert first["status"] == "paused" and first["epochs"] == 1
    summary = train(**settings, on_device=True, steps_per_execution=2)
    assert summary["status"] == "completed" and summary["on_device"]
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    np.testing.assert_allclose([r["lr"] for r in rows], [0.1, 0.05], rtol=1e-5)
    assert [leg["on_device"] for leg in summary["legs"]] == [True, True]
    assert json.loads((out / "state.json").read_text())["iterations"] == 6


def restore_gpu_files(files, name, folder):
    """The restore lines of zoo/gpu_train.sh's header, in Python."""
    import tarfile

    if (folder / name).exists():
        shutil.rmtree(folder / name)
    with tarfile.open(files / f"{name}.tar") as tar:
        tar.extractall(folder, filter="data")
    for weights in files.glob(f"{name}.*.weights.h5"):
        shutil.copyfile(weights, folder / name / weights.name[len(name) + 1:])
    light_state.check_sums(folder / name)


@pytest.mark.slow  # 10 minutes here: two calls, each compiling Newton-CGNet-10 in bf16
@pytest.mark.heavy
def test_gpu_script_continues_a_run(tmp_path, monkeypatch, capsys):
    """CONTINUE mode as on the GPU machine (JAX, bf16, data on the device, TensorFlow
    absent): a run created with --config-only is paused after epoch 1, its files come back
    and are restored as the header says, a second call ends it, and `zoo add` registers
    the restored folder with a portable command."""
    import subprocess

    from keras_newton import zoo

    root, env, archive = gpu_script_env(tmp_path)
    folder = tmp_path / "in_progress"
    assert train_cli.main(["--config-only", "--model", "newton_cgnet10", "--dataset", "cifar10",
                           "--data", str(archive), "--augment", "--epochs", "3", "--schedule",
                           "cosine", "--warmup-epochs", "1", "--warmup", "linear",
                           "--label-smoothing", "0.1", "--val-size", "20", "--batch-size", "20",
                           "--out", str(folder / "ncg10_t")]) == 0
    # A second run (one epoch, no warm-up), continued beside the first in the second call.
    assert train_cli.main(["--config-only", "--model", "newton_cgnet10", "--dataset", "cifar10",
                           "--data", str(archive), "--augment", "--epochs", "1",
                           "--val-size", "20", "--batch-size", "20",
                           "--out", str(folder / "ncg10_u")]) == 0
    config = json.loads((folder / "ncg10_t" / "config.json").read_text())
    programs = []  # the training steps in JAX's compilation cache after each call
    for call, margin, runs in ((1, "599", ["ncg10_t"]), (2, "0", ["ncg10_t", "ncg10_u"])):
        # call 1 pauses after 1 s (epoch 1); call 2 ends both runs, side by side
        env.update({"CONTINUE": " ".join(str(folder / r) for r in runs), "SECONDS_RUN": "600",
                    "MARGIN": margin, "OUT": str(tmp_path / f"out{call}")})
        done = subprocess.run(["bash", str(root / "zoo" / "gpu_train.sh")], cwd=root,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        files = tmp_path / f"out{call}"
        back = sorted(p.name for p in files.iterdir())
        for r in runs:
            assert {f"{r}.tar", f"{r}.last.weights.h5", f"{r}.log"} <= set(back)
            restore_gpu_files(files, r, folder)
        assert all((files / n).stat().st_size < 16 * 2**20 for n in back) and len(back) <= 8
        state = json.loads((folder / "ncg10_t" / "state.json").read_text())
        assert state["epochs_done"] == (1 if call == 1 else 3)
        programs.append({p.name for p in (tmp_path / "cache" / "jax").glob("jit_train_call-*")})
    # JAX's compilation cache (CACHE, kept between the calls): the continued run's training
    # step has the same cache key in both calls (a hit in call 2, no recompilation); only the
    # new run's step (another schedule) was added.
    assert len(programs[0]) == 1 and programs[0] < programs[1] and len(programs[1]) == 2
    second = json.loads((folder / "ncg10_u" / "summary.json").read_text())
    assert second["status"] == "completed" and second["epochs"] == 1, second
    log = (tmp_path / "out1" / "ncg10_t.log").read_text()
    assert "paused after epoch 1 of 3" in log
    run = folder / "ncg10_t"
    assert json.loads((run / "config.json").read_text()) == config
    rows = read_history(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # linear warm-up (3 steps) 0.1 / 3 at step 0; the cosine from step 3: 0.1, then 0.05
    np.testing.assert_allclose([r["lr"] for r in rows], [0.1 / 3, 0.1, 0.05], rtol=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["on_device"]
    assert [(leg["resumed_from"], leg["backend"], leg["mixed_precision"], leg["on_device"])
            for leg in summary["legs"]] == [("start", "jax", True, True),
                                            ("light", "jax", True, True)]

    monkeypatch.setattr(zoo, "REPO_ZOO", tmp_path / "zoo")
    monkeypatch.setattr(zoo, "REGISTRY_FILE", tmp_path / "registry.json")
    monkeypatch.setattr(zoo, "REGISTRY", {})
    add = ["zoo", "add", "--run", str(run), "--tag", "t", "--commit", "abc1234"]
    assert main_cli.main(add) == 2  # the config names the source by name and sha256 only
    assert "Pass --data, the run's source" in capsys.readouterr().err
    assert main_cli.main([*add, "--data", str(archive)]) == 0
    recipe = json.loads((tmp_path / "registry.json").read_text())["newton_cgnet10.t"]["recipe"]
    assert recipe["command"] == (  # from its config; the archive is not beside the repository
        "keras-newton train --model newton_cgnet10 --dataset cifar10 --data PATH/images.tar "
        "--augment --batch-size 20 --warmup-epochs 1 --warmup linear --schedule cosine "
        "--label-smoothing 0.1 --val-size 20 --epochs 3 --out runs/ncg10_t")
    assert "/tmp" not in recipe["command"] and recipe["data"]["file"] == "images.tar"
    assert "resumed at epoch 2 from the last epoch's weights" in recipe["trained_with"]


def test_records_hold_no_machine_path():
    """Registry commands and the committed Newton-CGNet-82 run name their data source (and
    its warm start) by a path from the repository or by name and sha256, never this
    machine's path."""
    import shlex

    from keras_newton import zoo

    for key, entry in zoo.REGISTRY.items():
        argv = shlex.split(entry["recipe"]["command"])
        assert not Path(argv[argv.index("--data") + 1]).is_absolute(), key
    config = json.loads((REPO / "zoo" / "in_progress" / "ncg82_sgdr80" / "config.json")
                        .read_text())
    recipe = get_recipe("cifar10", True, epochs=80, schedule="cosine", warmup_epochs=2,
                        warmup="linear", label_smoothing=0.1)  # zoo/in_progress/README.md
    weights = zoo.REPO_ZOO / zoo.REGISTRY["newton_cgnet82.cifar10"]["file"]
    assert config == {
        "model": "newton_cgnet82", "dataset": "cifar10", "data": "train.tar.xz",
        "data_key": "sha256-da41fa56b5d113f3661f7d567d5c0652bab701eef3a0fff0d6364184aa9c7847",
        "limit": None, "seed": 0, **recorded_recipe(recipe),
        "init_weights": {"zoo": "newton_cgnet82.cifar10",
                         "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}


# --- Warm start: --init-weights ------------------------------------------------------

def seeded_weights_file(path, classes=3, model=NewtonCGNet10, seed=123):
    """The weights of a model's own seeded initialisation (not a run's: seed 123)."""
    keras.utils.set_random_seed(seed)
    model(classes=classes).save_weights(path)
    return path


def trainable_arrays(weights_file):
    model = NewtonCGNet10(classes=3)
    model.load_weights(weights_file)
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]


@pytest.mark.slow  # two calls that train
@pytest.mark.backend_agnostic
@pytest.mark.jax_heavy  # JAX compiles Newton-CGNet-10 twice on this CPU
def test_init_weights_warm_start_from_a_file(tiny, tmp_path, capsys):
    """A --config-only run with --init-weights FILE records the file by name and sha256
    and carries a copy; its --resume (on JAX with the data on the device) starts from
    those weights: at lr 1e-20 they end unchanged, a run without them ends elsewhere. A
    changed copy is refused; a snapshot after epoch 1 leaves the copy out; the card's
    command names the file."""
    from keras_newton.commands import zoo as zoo_command

    source = seeded_weights_file(tmp_path / "mine.weights.h5")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    flags = ["--model", "newton_cgnet10", "--dataset", "folder", "--data", str(tiny),
             "--epochs", "1", "--batch-size", "8", "--val-size", "6", "--lr", "1e-20"]
    out = tmp_path / "sgdr"
    assert train_cli.main(["--config-only", *flags, "--init-weights", str(source),
                           "--out", str(out)]) == 0
    text = (out / "config.json").read_text()
    config = json.loads(text)
    assert config["init_weights"] == {"file": "mine.weights.h5", "sha256": digest}
    assert str(tmp_path) not in text and config["data"] == "images"
    assert (out / "init.weights.h5").read_bytes() == source.read_bytes()

    resume = ["--resume", "--data", str(tiny), "--verbose", "0", "--distribute", "none",
              "--no-test"]
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    with h5py.File(changed / "init.weights.h5", "r+") as f:
        kernels = []
        f.visititems(lambda name, item: kernels.append(item) if name.endswith("vars/0")
                     and item.ndim == 4 else None)
        kernels[0][...] = kernels[0][...] + 1
    assert train_cli.main([*resume, "--out", str(changed)]) == 2
    err = capsys.readouterr().err
    assert f"{changed / 'init.weights.h5'} is not the `init_weights` file" in err
    assert f"expected {digest}" in err and not (changed / "history.csv").exists()

    on_device = ["--on-device"] if keras.backend.backend() == "jax" else []
    assert train_cli.main([*resume, "--out", str(out), *on_device]) == 0
    assert f"from {out / 'init.weights.h5'}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text()) == config
    warm = trainable_arrays(out / "last.weights.h5")
    start = trainable_arrays(source)
    for got, want in zip(warm, start, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    cold = tmp_path / "cold"
    assert train_cli.main([*flags, "--out", str(cold), *resume[3:]]) == 0
    kernels = [(w, s) for w, s in zip(trainable_arrays(cold / "last.weights.h5"), start,
                                      strict=True) if w.ndim == 4]
    assert len(kernels) >= 7 and all(np.abs(w - s).max() > 0.01 for w, s in kernels)
    assert not (cold / "init.weights.h5").exists()
    assert "init_weights" not in json.loads((cold / "config.json").read_text())

    # The snapshot needs the copy only before the first epoch.
    early = tmp_path / "early"
    shutil.copytree(out, early)
    state = json.loads((early / "state.json").read_text())
    (early / "state.json").write_text(json.dumps({**state, "epochs_done": 0}))
    snap = tmp_path / "snap"
    assert "init.weights.h5" in light_state.snapshot(early, snap)
    light_state.check_sums(snap)
    names = light_state.snapshot(out, snap)  # after epoch 1: removed
    assert "init.weights.h5" not in names and not (snap / "init.weights.h5").exists()
    assert json.loads((snap / "config.json").read_text())["init_weights"]["sha256"] == digest

    assert train_cli.command_from_config(config, "PATH/images").endswith(
        "--lr 1e-20 --val-size 6 --epochs 1 --init-weights mine.weights.h5")
    summary = json.loads((out / "summary.json").read_text())
    assert zoo_command._trained_with(summary, None, config["init_weights"]).endswith(
        f"; initialised from mine.weights.h5 (sha256 {digest[:12]})")


@pytest.mark.backend_agnostic
def test_init_weights_refuses_bad_sources_and_other_models(tiny, tmp_path, capsys):
    """No training: bad names and paths, another architecture, another class count, a
    bigger model's file, and another source on --resume are refused by name."""
    from keras_newton.models import NewtonCGNet16

    flags = ["--dataset", "folder", "--data", str(tiny), "--epochs", "1", "--batch-size", "8",
             "--val-size", "6"]
    for source in ("newton_cgnet10.nope", str(tmp_path / "missing.weights.h5")):
        assert train_cli.main(["--config-only", "--model", "newton_cgnet10", *flags,
                               "--init-weights", source, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "(--init-weights) must be a registered zoo name (newton_cgnet10.cifar10" in err
        assert f"`.weights.h5` file. Received: init_weights={source!r}" in err
    assert not (tmp_path / "x").exists()
    assert train_cli.main(["--config-only", "--model", "resnet20", *flags, "--init-weights",
                           "newton_cgnet10.cifar10", "--out", str(tmp_path / "x")]) == 2
    assert "not of the run's model resnet20" in capsys.readouterr().err

    with pytest.raises(ValueError, match=r"\(--init-weights\) newton_cgnet10.cifar10 has 10 "
                                         r"classes, the run's model 3"):
        train(**tiny_run(tiny, tmp_path / "a", epochs=1), init_weights="newton_cgnet10.cifar10")
    ten = seeded_weights_file(tmp_path / "ten.weights.h5", classes=10)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(
            ValueError, match=r"do not fit the run's model .* with 3 classes: .*"
                              r"shape=\(64, 3\), Received: value.shape=\(64, 10\)"):
        warnings.simplefilter("always")
        train(**tiny_run(tiny, tmp_path / "b", epochs=1), init_weights=ten)
    # Keras' "Affected layers will retain their freshly-initialized weights" would
    # contradict the refusal
    assert not [w for w in seen if "freshly-initialized" in str(w.message)]
    deeper = seeded_weights_file(tmp_path / "deeper.weights.h5", model=NewtonCGNet16)
    with pytest.raises(ValueError, match="do not fit the run's model .* weight arrays"):
        train(**tiny_run(tiny, tmp_path / "c", epochs=1), init_weights=deeper)

    out = tmp_path / "d"
    assert train_cli.main(["--config-only", "--model", "newton_cgnet10", *flags,
                           "--init-weights", str(ten), "--out", str(out)]) == 0
    assert train_cli.main(["--resume", "--out", str(out), "--data", str(tiny),
                           "--init-weights", "newton_cgnet10.cifar10"]) == 2
    assert "other settings (init_weights)" in capsys.readouterr().err


class StopAtStart(keras.callbacks.Callback):
    """Records the weights `fit` starts from and stops before the first step (no compile)."""

    def on_train_begin(self, logs=None):
        self.weights = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_weights]
        raise RuntimeError("stopped at the start")


@pytest.mark.backend_agnostic
def test_init_weights_from_the_zoo_by_name(tmp_path, monkeypatch):
    """A zoo name: config.json records it with the released file's sha256, and the model
    (here in bf16 mixed precision) starts from that file's weights."""
    import hashlib

    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))
    make_image_tree(tmp_path / "images", classes=CIFAR10_CLASSES, per_class={"train": 2})
    released = REPO / "zoo" / "newton_cgnet10.cifar10.weights.h5"
    start = StopAtStart()
    with pytest.raises(RuntimeError, match="stopped at the start"):
        train(**tiny_run(tmp_path / "images", tmp_path / "run", val_size=10),
              mixed_precision=True, init_weights="newton_cgnet10.cifar10", callbacks=[start])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["init_weights"] == {"zoo": "newton_cgnet10.cifar10",
                                      "sha256": hashlib.sha256(released.read_bytes()).hexdigest()}
    assert not (tmp_path / "run" / "init.weights.h5").exists()
    model = NewtonCGNet10(classes=10)
    model.load_weights(released)
    for got, want in zip(start.weights, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(got, keras.ops.convert_to_numpy(want))

"""Training: recipes, the `train` command end to end, resume after a kill, NaN, bad input."""

import importlib.util
import json

import keras
import numpy as np
import pytest
from test_data import make_image_tree

from keras_newton import cli as main_cli
from keras_newton.data import CIFAR10_CLASSES, channel_stats, holdout_split, load_dataset
from keras_newton.models import NewtonCGNet10
from keras_newton.training import (
    RECIPES,
    LossDivergedError,
    compile_for_recipe,
    get_recipe,
    read_history,
    train,
)
from keras_newton.training import callbacks as callbacks_module
from keras_newton.training import cli as train_cli
from keras_newton.training.callbacks import TimeBudget, milestone_lr


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


def test_rerun_resumes_after_a_kill(tiny, tmp_path):
    out = tmp_path / "run"
    crash = Crash()
    with pytest.raises(RuntimeError, match="killed after epoch 1"):
        train(**tiny_run(tiny, out, epochs=3), callbacks=[crash])
    first_rows = read_history(out)
    assert [r["epoch"] for r in first_rows] == [1]
    assert (out / "backup").exists() and not (out / "summary.json").exists()

    recorder = Recorder()
    summary = train(**tiny_run(tiny, out, epochs=3), callbacks=[recorder])
    assert recorder.epochs == [1, 2]  # resumed at epoch 2 (0-based 1)
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


@pytest.mark.slow  # about 2 minutes: JAX compiles Newton-CGNet-10 on CPU
@pytest.mark.heavy
def test_gpu_script_without_tensorflow(tmp_path):
    """zoo/gpu_train.sh as on the GPU machine: JAX, bf16, TensorFlow absent, two models side
    by side, one tar each back."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    hide = tmp_path / "hide_tf"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(  # `import tensorflow` fails, find_spec is None
        "import sys\nfor m in ('tensorflow', 'tensorflow_text', 'tensorflow_datasets', "
        "'tf2onnx', 'keras_tuner'):\n    sys.modules[m] = None\n")  # as on the GPU machine
    make_image_tree(tmp_path / "images", classes=CIFAR10_CLASSES, per_class={"train": 8})
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "images" / "train", arcname="train")
    env = {**os.environ, "PYTHONPATH": str(hide), "DEPTHS": "10 16", "EPOCHS_10": "2",
           "EPOCHS_16": "4", "WARMUP_16": "1", "KERAS_NEWTON_HOME": str(tmp_path / "home"),
           "EXTRA_ARGS": "--val-size 20 --batch-size 20",
           "DATA": str(archive), "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("KERAS_BACKEND", None)
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
            "history.csv", "preprocessing.json", "summary.json"))
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

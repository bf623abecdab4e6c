"""Hyperparameter search: spaces, a real 2-trial search end to end, resume after a kill,
Figure 4 sweeps, MirroredStrategy, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pytest
from helpers import REPO
from test_data import make_image_tree

from keras_newton import cli as main_cli
from keras_newton.tuning import (
    CGNetHyperModel,
    figure4,
    figure4_points,
    plot_figure4,
    read_table,
    resolve_space,
    search,
)
from keras_newton.tuning import cli as tune_cli

TINY_SPACE = {"blocks": 1, "width_multiplier": 0.5, "batch_size": [16, 32]}


@pytest.fixture
def images(tmp_path, monkeypatch):
    """3 classes x 100 images, 32x32 (300 images: 240 training, 60 validation)."""
    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))
    make_image_tree(tmp_path / "images", per_class={"train": 100})
    return tmp_path / "images"


def tiny_search(data, directory, **kwargs):
    settings = dict(family="newton_cgnet", dataset="folder", data=str(data), tuner="random",
                    max_trials=2, epochs=1, directory=str(directory), space=TINY_SPACE,
                    val_size=60, distribute="none", verbose=0, final_epochs=1)
    return {**settings, **kwargs}


def trial_json(directory, trial_id):
    return json.loads((Path(directory) / "search" / f"trial_{trial_id}" / "trial.json")
                      .read_text())


# --- search spaces -------------------------------------------------------------------


def test_space_forms_and_defaults():
    space = resolve_space("newton_cgnet", {"lr": (0.01, 0.3), "batch_size": [128, 64, 64],
                                           "dropout": 0.2, "blocks": (2, 2)})
    assert space["lr"] == ("range", 0.01, 0.3)
    assert space["batch_size"] == ("choice", [64, 128])  # sorted, deduplicated
    assert space["dropout"] == ("fixed", 0.2)
    assert space["blocks"] == ("fixed", 2)  # an empty-width range is a fixed value
    assert space["width_multiplier"] == ("choice", [0.5, 1.0])  # the default
    assert set(resolve_space("resnet")) == {"blocks", "lr", "weight_decay", "batch_size"}
    assert tune_cli.parse_space_value("0.01:0.3") == (0.01, 0.3)
    assert tune_cli.parse_space_value("64,128") == [64, 128]
    assert tune_cli.parse_space_value("5e-4") == 5e-4


@pytest.mark.parametrize("family, space, message", [
    ("newton_cgnet", {"blocks": (3, 1)}, r"`blocks` range is empty: max < min"),
    ("newton_cgnet", {"lr": []}, r"`lr` choices are empty"),
    ("newton_cgnet", {"depth": 20}, r"Unknown hyperparameter .* Received: depth=20"),
    ("resnet", {"width_multiplier": 0.5}, r"Unknown hyperparameter for family 'resnet'"),
    ("newton_cgnet", {"dropout": (0.0, 1.0)}, r"`dropout` values must be in \[0, 1\)"),
    ("newton_cgnet", {"lr": (-1, 0.1)}, r"`lr` values must be > 0"),
    ("newton_cgnet", {"blocks": [1.5, 2]}, r"`blocks` values must be positive integers"),
    ("newton_cgnet", {"lr": (0.1, 0.2, 0.3)}, r"A range must be \(min, max\)"),
    ("resnet", {"blocks": 1, "lr": 0.1, "weight_decay": 0.0, "batch_size": 64},
     r"The search space is empty: every hyperparameter is fixed"),
    ("vgg", None, r"`family` must be one of \['newton_cgnet', 'resnet', 'both'\]"),
    ("newton_cgnet", [("lr", 0.1)], r"`space` must be a dict"),
])
def test_invalid_space_is_refused(family, space, message):
    with pytest.raises(ValueError, match=message):
        resolve_space(family, space)


@pytest.mark.parametrize("family", ["newton_cgnet", "resnet", "both"])
def test_hypermodel_builds_each_family(family):
    hm = CGNetHyperModel(family, {"blocks": (1, 2), "batch_size": [16, 32]}, classes=3,
                         input_shape=(16, 16, 3))
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    assert model.output_shape == (None, 3)
    assert model.optimizer is not None and model.count_params() == hm.last_params
    built = "resnet" if family == "resnet" else "newton_cgnet"
    if family == "both":
        assert hp.values["family"] == "newton_cgnet"  # the first choice by default
        hp.values["family"] = "resnet"
        assert hm.build(hp).name == "resnet8"
        assert hp.is_active("n") and not hp.is_active("N1")  # conditional on the family
        hp.values["family"] = "newton_cgnet"
    depth = 8  # blocks=1 (the range's minimum): 2*3+2 for Newton-CGNet, 6*1+2 for ResNet
    assert model.name == f"{built}{depth}"
    # Fixed stages override the blocks range (e.g. the paper's Newton-CGNet-10).
    hm10 = CGNetHyperModel("newton_cgnet", {"lr": [0.1, 0.2]}, classes=3,
                           input_shape=(16, 16, 3), stages=(1, 1, 2))
    hp10 = keras_tuner.HyperParameters()
    assert hm10.build(hp10).name == "newton_cgnet10"
    assert [hp10.values[k] for k in ("N1", "N2", "N3")] == [1, 1, 2]


def test_cli_choices_match_the_library():
    from keras_newton.tuning import FAMILIES, TUNERS

    assert tune_cli.FAMILIES == FAMILIES and tune_cli.TUNERS == TUNERS


def test_batch_sizes_must_split_across_replicas():
    with pytest.raises(ValueError, match=r"divisible by the 3 replicas. Received: batch_size=16"):
        CGNetHyperModel("resnet", {"batch_size": [16, 32]}, num_replicas=3)


# --- bad input to search and the CLI ----------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"tuner": "grid"}, r"`tuner` must be one of \['bayesian', 'hyperband', 'random'\]. "
                        r"Received: tuner='grid'"),
    ({"max_trials": 0}, r"`max_trials` must be a positive integer. Received: max_trials=0"),
    ({"epochs": 0}, r"`epochs` must be a positive integer. Received: epochs=0"),
    ({"subset": -5}, r"`subset` must be a positive integer. Received: subset=-5"),
    ({"final_epochs": -1}, r"`final_epochs` must be an integer >= 0"),
    ({"distribute": "multiworker"}, r"`distribute` must be one of \['auto', 'none', "
                                    r"'mirrored'\] for a search"),
    ({"space": {"blocks": (4, 2)}}, r"`blocks` range is empty"),
])
def test_search_refuses_bad_input(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        search(**tiny_search(tmp_path / "nowhere", tmp_path / "s", **change))
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    base = ["tune", "--dataset", "folder", "--data", str(tmp_path), "--directory",
            str(tmp_path / "s")]
    assert main_cli.main([*base, "--max-trials", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("keras-newton tune: error: `max_trials` must be a positive integer. "
                           "Received: max_trials=0")
    assert main_cli.main([*base, "--blocks", "3:1"]) == 2
    assert "`blocks` range is empty: max < min. Received: blocks=(3, 1)" in capsys.readouterr().err
    assert main_cli.main([*base, "--preset", "figure4", "--tuner", "bayesian"]) == 2
    assert "--preset figure4 runs its own" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main_cli.main([*base, "--tuner", "grid"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'grid'" in capsys.readouterr().err


# --- a real search ----------------------------------------------------------------------


def test_two_trial_search_end_to_end(images, tmp_path, capsys, monkeypatch):
    """`keras-newton tune`: 2 trials, 1 epoch, 300 images; table, plot, best model."""
    clears = []
    original_clear = keras.backend.clear_session
    monkeypatch.setattr(keras.backend, "clear_session",
                        lambda *a, **k: (clears.append(1), original_clear(*a, **k))[1])
    directory = tmp_path / "search"
    argv = ["tune", "--family", "newton_cgnet", "--dataset", "folder", "--data", str(images),
            "--tuner", "random", "--max-trials", "2", "--epochs", "1", "--val-size", "60",
            "--blocks", "1", "--width-multiplier", "0.5", "--batch-size", "16,32",
            "--directory", str(directory), "--distribute", "none", "--verbose", "0"]
    assert main_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "New search in" in out and "overwrite=False" in out

    rows = read_table(directory / "results.csv")
    assert [r["trial"] for r in rows] == [0, 1]
    assert all(r["status"] == "COMPLETED" for r in rows)
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and r["seconds"] > 0 and r["params"] > 1000
        assert (r["N1"], r["N2"], r["N3"], r["depth"]) == (1, 1, 1, 8)
        assert r["batch_size"] in (16, 32) and 0.01 <= r["lr"] <= 0.3
        assert 1e-5 <= r["weight_decay"] <= 1e-3 and 0 <= r["dropout"] <= 0.4
    header = next(line.split() for line in out.splitlines() if line.startswith("trial "))
    assert header[:2] == ["trial", "status"] and "val_accuracy" in header  # printed table
    assert (directory / "results.png").stat().st_size > 10_000
    assert len(clears) >= 2  # keras.backend.clear_session() before each trial's build

    best = json.loads((directory / "best_hyperparameters.json").read_text())
    best_row = max(rows, key=lambda r: r["val_accuracy"])
    assert best["lr"] == pytest.approx(best_row["lr"])
    assert best["batch_size"] == best_row["batch_size"]
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["trials_run"] == ["0", "1"] and summary["trials_completed"] == 2
    assert summary["best_val_accuracy"] == best_row["val_accuracy"]
    assert summary["best_hyperparameters"] == best

    # The saved best model loads and predicts (with the recorded preprocessing).
    prep = json.loads((directory / "preprocessing.json").read_text())
    assert prep["class_names"] == ["cat", "dog", "frog"]
    model = keras.saving.load_model(directory / "best_model.keras")
    x = (np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
         - prep["mean"]) / prep["std"]
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert model.count_params() == next(r["params"] for r in rows
                                        if r["trial"] == summary["best_trial"])

    # Rerunning resumes: nothing is redone; other settings are refused by name.
    assert main_cli.main([*argv, "--final-epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert "Resuming the search" in out and "2 trial(s) finished" in out
    assert json.loads((directory / "summary.json").read_text())["trials_run"] == []
    assert main_cli.main([*argv[:-2], "--epochs", "2", "--verbose", "0"]) == 2
    assert "other settings (epochs)" in capsys.readouterr().err


def test_directory_that_is_not_a_search_is_left_alone(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a keras-newton search"):
        search(**{**tiny_search(None, tmp_path / "s", overwrite=True, dataset="cifar10"),
                  "data": None})
    assert (tmp_path / "s" / "notes.txt").exists()


def test_overwrite_deletes_only_a_previous_search(tmp_path):
    from keras_newton.tuning.search import _prepare_directory

    directory = tmp_path / "s"
    assert _prepare_directory(directory, {"epochs": 1}, overwrite=False) is False  # new
    (directory / "search").mkdir()
    (directory / "results.csv").write_text("old")
    assert _prepare_directory(directory, {"epochs": 1}, overwrite=False) is True  # resume
    with pytest.raises(ValueError, match=r"other settings \(epochs\)"):
        _prepare_directory(directory, {"epochs": 2}, overwrite=False)
    assert _prepare_directory(directory, {"epochs": 2}, overwrite=True) is False
    assert sorted(p.name for p in directory.iterdir()) == ["search.json"]
    assert json.loads((directory / "search.json").read_text()) == {"epochs": 2}


KILL_AFTER_FIRST_TRIAL = """
import json, os, sys
import keras
from keras_newton.tuning import search

STARTS = [0]

class Kill(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        STARTS[0] += 1
        if STARTS[0] == 2:  # trial 2 starts: die like a killed process (no cleanup)
            os._exit(17)

search(**json.loads(sys.argv[1]), callbacks=[Kill()])
"""


def test_killed_search_resumes_without_redoing_finished_trials(images, tmp_path):
    directory = tmp_path / "search"
    settings = tiny_search(images, directory, max_trials=3, final_epochs=0)
    result = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_TRIAL, json.dumps(settings)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ),
                            cwd=REPO)
    assert result.returncode == 17, result.stderr[-3000:]
    first = trial_json(directory, "0")
    interrupted = trial_json(directory, "1")
    assert first["status"] == "COMPLETED" and interrupted["status"] == "RUNNING"
    assert not (directory / "search" / "trial_2").exists()

    summary = search(**settings)
    assert summary["trials_run"] == ["1", "2"]  # trial 0 was not redone
    assert [r["status"] for r in summary["rows"]] == ["COMPLETED"] * 3
    assert trial_json(directory, "0") == first
    assert summary["rows"][0]["val_accuracy"] == pytest.approx(first["score"], abs=1e-4)
    # The interrupted trial is rerun with the hyperparameters it had.
    assert trial_json(directory, "1")["hyperparameters"]["values"] == \
        interrupted["hyperparameters"]["values"]


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("tuner, family, epochs", [("bayesian", "both", 1),
                                                   ("hyperband", "resnet", 2)])
def test_other_tuners_and_families(images, tmp_path, tuner, family, epochs):
    space = {"blocks": 1, "batch_size": [16, 32]}
    if family == "both":
        space["width_multiplier"] = 0.5
    summary = search(**tiny_search(images, tmp_path / "s", tuner=tuner, family=family,
                                   space=space, epochs=epochs, final_epochs=0))
    rows = summary["rows"]
    assert [r["status"] for r in rows] == ["COMPLETED"] * 2
    assert all(r["epochs"] == epochs and 0 <= r["val_accuracy"] <= 1 for r in rows)
    for r in rows:
        assert r["depth"] == 8 and (r["n"] == 1 if r.get("family", family) == "resnet"
                                    else r["N1"] == 1)
    assert summary["best_hyperparameters"]["batch_size"] in (16, 32)


# --- Figure 4 ---------------------------------------------------------------------------


def test_figure4_points_and_plot(tmp_path):
    points = figure4_points()
    assert len(points) == 11  # 6 weight decays at lr 0.1 + 5 other lrs at wd 5e-4
    assert len({(p["lr"], p["weight_decay"]) for p in points}) == 11
    assert sum(p == {"lr": 0.1, "weight_decay": 5e-4} for p in points) == 1
    assert len(figure4_points(full_grid=True)) == 36
    with pytest.raises(ValueError, match="sweeps cross at lr=0.1"):
        figure4_points(lrs=(0.01, 0.2))
    rows = [{**p, "val_error_percent": 10 + i} for i, p in enumerate(points)]
    plot_figure4(rows, tmp_path / "f.png", title="test")
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.heavy
def test_figure4_preset_runs_its_sweeps(images, tmp_path):
    directory = tmp_path / "fig4"
    summary = figure4("8-{1,1,1}", "folder", str(images), lrs=(0.05, 0.1),
                      weight_decays=(5e-4, 1e-3), epochs=1, directory=str(directory),
                      val_size=60, distribute="none", verbose=0, augment=False)
    rows = read_table(directory / "figure4.csv")
    assert sorted((r["lr"], r["weight_decay"]) for r in rows) == [
        (0.05, 5e-4), (0.1, 5e-4), (0.1, 1e-3)]
    for r in rows:
        assert r["val_error_percent"] == pytest.approx(100 * (1 - r["val_accuracy"]), abs=0.01)
    assert all(r["depth"] == 8 and r["dropout"] == 0.4 for r in summary["rows"])  # C10 recipe
    assert (directory / "figure4.png").stat().st_size > 10_000
    assert summary["trials_run"] == ["0", "1", "2"] and summary["final_val_accuracy"] is None


# --- MirroredStrategy -------------------------------------------------------------------

MIRRORED_SEARCH = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from keras_newton.tuning import search
s = search(**json.loads(sys.argv[1]))
print("RESULTS " + json.dumps({k: s[k] for k in ("distribute", "replicas", "trials_completed",
                                                 "final_val_accuracy")}))
"""


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute needs the TensorFlow backend")
def test_search_under_mirrored_strategy(images, tmp_path):
    settings = tiny_search(images, tmp_path / "search", max_trials=1, distribute="mirrored")
    result = subprocess.run([sys.executable, "-c", MIRRORED_SEARCH, json.dumps(settings)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert results["distribute"] == "mirrored" and results["replicas"] == 2
    assert results["trials_completed"] == 1 and results["final_val_accuracy"] is not None


def test_cli_without_keras_tuner(monkeypatch, capsys):
    """Where keras_tuner is missing (the GPU machine), `tune` says so; the rest works."""
    import sys

    from keras_newton import cli

    for name in [m for m in sys.modules if m.startswith("keras_newton.tuning")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "keras_tuner", None)  # `import keras_tuner` fails
    assert cli.main(["tune", "--model", "newton_cgnet10", "--max-trials", "2"]) == 2
    assert "needs the package 'keras_tuner'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0 and "--time-budget" in capsys.readouterr().out

"""Hyperparameter search: spaces, a real 2-trial search end to end, resume after a kill,
Figure 4 sweeps, MirroredStrategy, bad input, KerasTuner's chief/worker mode on loopback."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
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


@pytest.mark.slow
@pytest.mark.heavy
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


@pytest.mark.heavy
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


# --- distributed search (KerasTuner chief/worker) -----------------------------------------


def test_role_from_kerastuner_environment():
    from keras_newton.tuning.distributed import role

    assert role({}).kind == "single" and role({}).tuner_id == "tuner0"
    env = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "8000"}
    chief = role({**env, "KERASTUNER_TUNER_ID": "chief"})
    assert (chief.kind, chief.address) == ("chief", "127.0.0.1:8000")
    assert role({**env, "KERASTUNER_TUNER_ID": "tuner3"}).kind == "worker"
    with pytest.raises(ValueError, match=r"KERASTUNER_TUNER_ID is not. Received: "):
        role(env)
    with pytest.raises(ValueError, match=r"Received: KERASTUNER_ORACLE_PORT='http'"):
        role({**env, "KERASTUNER_ORACLE_PORT": "http", "KERASTUNER_TUNER_ID": "chief"})


def test_worker_never_deletes_a_search(tmp_path):
    from keras_newton.tuning.search import _join_directory, _prepare_directory

    directory = tmp_path / "s"
    _join_directory(directory, {"epochs": 1})  # a worker's own new directory
    assert json.loads((directory / "search.json").read_text()) == {"epochs": 1}
    _join_directory(directory, {"epochs": 1})  # the chief's (shared) directory
    with pytest.raises(ValueError, match=r"other settings \(epochs\); a worker never deletes"):
        _join_directory(directory, {"epochs": 2})
    assert _prepare_directory(directory, {"epochs": 1}, overwrite=False) is True


def test_a_chief_resumes_a_single_process_search_and_back(tmp_path):
    """KerasTuner reloads the oracle only when ``<tuner id>.json`` exists."""
    from keras_newton.tuning.search import _adopt_oracle_state

    project = tmp_path / "search"
    project.mkdir()
    _adopt_oracle_state(tmp_path, "chief")
    assert not (project / "chief.json").exists()  # a new search: nothing to reload
    (project / "oracle.json").write_text("{}")
    (project / "tuner0.json").write_text('{"x": 1}')
    _adopt_oracle_state(tmp_path, "chief")
    _adopt_oracle_state(tmp_path, "tuner0")
    assert (project / "chief.json").read_text() == "{}"
    assert (project / "tuner0.json").read_text() == '{"x": 1}'  # left as it was


class _Oracle:
    """A KerasTuner random-search oracle behind the chief's servicer, with a fake clock."""

    def __init__(self, tmp_path, max_trials=3, retries=1, max_failures=3, timeout=10):
        from keras_tuner.src import protos

        from keras_newton.tuning.distributed import ChiefServicer

        hp = keras_tuner.HyperParameters()
        hp.Float("lr", 0.01, 0.3, sampling="log")
        self.oracle = keras_tuner.oracles.RandomSearchOracle(
            objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=max_trials,
            hyperparameters=hp, seed=1, max_retries_per_trial=retries,
            max_consecutive_failed_trials=max_failures)
        self.oracle._set_project_dir(str(tmp_path), "search")
        self.oracle.verbose = 0
        self.now = 0.0
        self.servicer = ChiefServicer(self.oracle, timeout, clock=lambda: self.now)
        self.service = protos.get_service()

    def create(self, tuner_id):
        response = self.servicer.CreateTrial(
            self.service.CreateTrialRequest(tuner_id=tuner_id), None)
        trial = keras_tuner.engine.trial.Trial.from_proto(response.trial)
        return trial.status, trial.trial_id

    def beat(self, trial_id):
        self.servicer.GetTrial(self.service.GetTrialRequest(trial_id=trial_id), None)

    def finish(self, trial_id, score=0.5):
        self.servicer.UpdateTrial(self.service.UpdateTrialRequest(
            trial_id=trial_id, metrics={"val_accuracy": score}), None)
        trial = self.oracle.get_trial(trial_id)
        done = keras_tuner.engine.trial.Trial(trial.hyperparameters, trial_id, "COMPLETED")
        self.servicer.EndTrial(self.service.EndTrialRequest(trial=done.to_proto()), None)

    def status(self, trial_id):
        return self.oracle.trials[trial_id].status


def test_chief_retries_the_trial_of_a_lost_worker(tmp_path):
    """tuner1 goes silent mid-trial: after the timeout its trial is queued for a retry
    and tuner0 reruns it; tuner1's late result is then ignored; the chief finishes."""
    from keras_newton.tuning.distributed import search_is_over, tidy_retry_queue

    chief = _Oracle(tmp_path, max_trials=3, retries=1)
    assert chief.create("tuner0") == ("RUNNING", "0")
    assert chief.create("tuner1") == ("RUNNING", "1")
    chief.now = 5
    chief.beat("1")  # tuner1's heartbeat
    assert chief.create("tuner1") == ("RUNNING", "1")  # a restarted tuner1 gets its trial back
    chief.finish("0")
    chief.now = 12
    assert chief.create("tuner0") == ("RUNNING", "2")
    chief.servicer.check_workers()
    assert chief.servicer.lost == []  # tuner1 was heard from 7 s ago
    chief.now = 16
    chief.beat("2")
    chief.servicer.check_workers()  # tuner1: 11 s of silence > 10 s
    assert chief.servicer.lost == [{"tuner_id": "tuner1", "trial": "1", "outcome": "retry"}]
    assert chief.status("1") == "INVALID" and "tuner1" not in chief.oracle.tuner_ids
    chief.finish("2")
    assert chief.create("tuner0") == ("RUNNING", "1")  # the retry
    assert not chief.servicer.finished()
    chief.finish("1", score=0.7)
    chief.finish("1", score=0.1)  # tuner1 comes back late: ignored
    assert chief.oracle.trials["1"].score == pytest.approx(0.7)
    assert chief.create("tuner0")[0] == "STOPPED"
    assert chief.servicer.finished()
    assert [chief.status(t) for t in "012"] == ["COMPLETED"] * 3
    assert chief.servicer.ended == ["0", "2", "1"]
    # The saved oracle holds no running trial (a resumed chief would rerun it) ...
    assert json.loads((tmp_path / "search" / "oracle.json").read_text())["ongoing_trials"] == {}
    # ... and a chief resuming a directory where one was left drops it.
    chief.oracle._retry_queue = ["1"]
    tidy_retry_queue(chief.oracle)
    assert chief.oracle._retry_queue == [] and search_is_over(chief.oracle)


def test_chief_marks_a_lost_trial_failed_without_retries(tmp_path):
    chief = _Oracle(tmp_path, max_trials=2, retries=0, max_failures=2)
    assert chief.create("tuner0") == ("RUNNING", "0")
    assert chief.create("tuner1") == ("RUNNING", "1")
    chief.finish("0")
    assert chief.create("tuner0")[0] == "STOPPED"  # no retries: nothing to wait for
    assert not chief.servicer.finished()  # tuner1's trial still runs
    chief.now = 11
    chief.servicer.check_workers()
    assert chief.servicer.lost == [{"tuner_id": "tuner1", "trial": "1", "outcome": "FAILED"}]
    assert chief.servicer.finished() and chief.servicer.fatal is None
    chief.finish("1")  # a late result of a FAILED trial is ignored
    assert chief.status("1") == "FAILED"


def test_chief_waits_for_a_possible_retry_then_stops_on_failures(tmp_path):
    chief = _Oracle(tmp_path, max_trials=2, retries=1, max_failures=1)
    chief.create("tuner0"), chief.create("tuner1")
    chief.finish("0")
    assert chief.create("tuner0")[0] == "IDLE"  # trial 1 may come back for a retry
    chief.now = 11
    chief.beat("1")
    chief.servicer.check_workers()  # tuner0 keeps asking (IDLE) in real life: drop it too
    assert [x["tuner_id"] for x in chief.servicer.lost] == ["tuner0"]
    chief.now = 30
    chief.servicer.check_workers()
    assert chief.servicer.lost[-1] == {"tuner_id": "tuner1", "trial": "1", "outcome": "retry"}
    assert chief.create("tuner0") == ("RUNNING", "1")
    chief.now = 50
    chief.servicer.check_workers()  # lost again: no retry left, 1 failure stops the search
    assert chief.status("1") == "FAILED"
    assert "consecutive failures exceeded the limit of 1" in chief.servicer.fatal
    assert chief.create("tuner1")[0] == "STOPPED" and chief.servicer.finished()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tuner_id, port, argv, log, code=None):
    """Starts `keras-newton tune` (or ``code``) as ``tuner_id`` on 127.0.0.1:``port``."""
    env = {**os.environ, "KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(port), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "keras_newton.tuning.cli", *argv] if code is None \
        else [sys.executable, "-c", code, *argv]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def _wait_all(processes, deadline):
    for process in processes:
        process.wait(timeout=max(1, deadline - time.monotonic()))


def _stop_all(processes):
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _tune_argv(images, directory, max_trials, final_epochs, *extra):
    return ["--family", "newton_cgnet", "--dataset", "folder", "--data", str(images),
            "--tuner", "random", "--max-trials", str(max_trials), "--epochs", "1",
            "--val-size", "60", "--blocks", "1", "--width-multiplier", "0.5",
            "--batch-size", "16,32", "--directory", str(directory), "--distribute", "none",
            "--verbose", "0", "--final-epochs", str(final_epochs), *extra]


def _records(directory):
    return {p.parent.name.removeprefix("trial_"): json.loads(p.read_text())
            for p in sorted((Path(directory) / "search").glob("trial_*/record.json"))}


def _ran(log_text):
    """The trial ids a worker says it ran."""
    found = re.search(r"ran trial\(s\) \[(.*?)\]", log_text)
    assert found, log_text[-3000:]
    return re.findall(r"'(\d+)'", found.group(1))


# The bound on a whole distributed test, processes killed after it: they take 2-5 min on
# 2 CPU cores shared with other jobs, well under a minute on a free 8-core machine.
DISTRIBUTED_TIMEOUT = 540


MIRRORED_WORKER = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from keras_newton.tuning import cli
sys.exit(cli.main([*sys.argv[1:], "--distribute", "mirrored"]))
"""


@pytest.mark.heavy
@pytest.mark.slow
def test_chief_and_two_workers_on_loopback(images, tmp_path):
    """`keras-newton tune` unchanged as chief + 2 workers (127.0.0.1), tuner1 under a
    MirroredStrategy over 2 (logical CPU) devices: 3 trials of 1 epoch, each run once;
    the chief writes the table, plot and best model; a rerun of the chief finds the
    search over and reports it again without a worker."""
    directory, port = tmp_path / "search", _free_port()
    argv = _tune_argv(images, directory, 3, 1, "--worker-timeout", "30")
    names = ("chief", "tuner0", "tuner1")
    mirrored = keras.backend.backend() == "tensorflow"
    processes, deadline = [], time.monotonic() + DISTRIBUTED_TIMEOUT
    try:
        for name in names:
            with open(tmp_path / f"{name}.log", "w") as log:
                code = MIRRORED_WORKER if name == "tuner1" and mirrored else None
                processes.append(_start(name, port, argv, log, code=code))
        _wait_all(processes, deadline)
    finally:
        _stop_all(processes)
    out = {name: (tmp_path / f"{name}.log").read_text() for name in names}
    for name, process in zip(names, processes, strict=True):
        assert process.returncode == 0, f"{name}:\n{out[name][-3000:]}"

    rows = read_table(directory / "results.csv")
    assert [r["trial"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "COMPLETED" and 0 <= r["val_accuracy"] <= 1 for r in rows)
    assert all(r["seconds"] > 0 and r["params"] > 1000 for r in rows)
    # Every trial ran once, on a worker; both workers ran some.
    ran = {name: _ran(out[name]) for name in ("tuner0", "tuner1")}
    assert sorted(ran["tuner0"] + ran["tuner1"]) == ["0", "1", "2"]
    assert ran["tuner0"] and ran["tuner1"]
    assert {k: v["tuner_id"] for k, v in _records(directory).items()} == {
        trial: name for name in ("tuner0", "tuner1") for trial in ran[name]}
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["role"] == "chief" and summary["workers_lost"] == []
    assert sorted(summary["trials_run"]) == ["0", "1", "2"]
    assert summary["trials_completed"] == 3 and summary["final_val_accuracy"] is not None
    assert (directory / "results.png").stat().st_size > 10_000
    assert keras.saving.load_model(directory / "best_model.keras").count_params() == \
        next(r["params"] for r in rows if r["trial"] == summary["best_trial"])
    assert "best trial" in out["chief"] and "the chief writes the results" in out["tuner0"]
    assert "Worker tuner0 (none, 1 replica(s))" in out["tuner0"]
    if mirrored:
        assert "Worker tuner1 (mirrored, 2 replica(s))" in out["tuner1"]

    # Resume: the chief alone finds nothing left to run and writes the same table.
    with open(tmp_path / "chief2.log", "w") as log:
        chief = _start("chief", _free_port(), _tune_argv(images, directory, 3, 0), log)
    try:
        chief.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        _stop_all([chief])
    again = (tmp_path / "chief2.log").read_text()
    assert chief.returncode == 0, again[-3000:]
    assert "Resuming the search" in again and "the search is over" in again
    assert read_table(directory / "results.csv") == rows
    assert json.loads((directory / "summary.json").read_text())["trials_run"] == []


VICTIM = """
import sys, time
import keras
from keras_newton.tuning import cli

module = sys.modules["keras_newton.tuning.search"]  # the package's `search` hides it

class Slow(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        print("IN TRIAL", flush=True)  # the test kills this process now
        time.sleep(0.5)

search = module.search
module.search = lambda **kwargs: search(**kwargs, callbacks=[Slow()])
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.heavy
@pytest.mark.slow
def test_killed_worker_does_not_lose_the_search(images, tmp_path):
    """tuner0 is killed (SIGKILL) inside its trial; tuner1 goes on. After
    --worker-timeout the chief gives tuner0's trial up; with --max-retries 1 tuner1
    reruns it; both trials complete and the chief writes the report."""
    directory, port = tmp_path / "search", _free_port()
    argv = _tune_argv(images, directory, 2, 0, "--worker-timeout", "15", "--max-retries", "1")
    names = ("chief", "tuner0", "tuner1")
    processes = []
    deadline = time.monotonic() + DISTRIBUTED_TIMEOUT
    try:
        for name in names:
            with open(tmp_path / f"{name}.log", "w") as log:
                processes.append(_start(name, port, argv, log,
                                        code=VICTIM if name == "tuner0" else None))
        victim = processes[1]
        while "IN TRIAL" not in (tmp_path / "tuner0.log").read_text():
            assert victim.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "tuner0.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)
        _wait_all(processes, deadline)
    finally:
        _stop_all(processes)
    out = {name: (tmp_path / f"{name}.log").read_text() for name in names}
    assert processes[1].returncode == -signal.SIGKILL
    for name in ("chief", "tuner1"):
        process = processes[names.index(name)]
        assert process.returncode == 0, f"{name}:\n{out[name][-3000:]}"

    summary = json.loads((directory / "summary.json").read_text())
    [lost] = summary["workers_lost"]
    assert lost["tuner_id"] == "tuner0" and lost["outcome"] == "retry"
    assert "Worker tuner0 lost" in out["chief"] and "queued for a retry" in out["chief"]
    rows = read_table(directory / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [(0, "COMPLETED"), (1, "COMPLETED")]
    assert sorted(_ran(out["tuner1"])) == ["0", "1"]  # its own trial and the lost one
    assert {v["tuner_id"] for v in _records(directory).values()} == {"tuner1"}
    assert summary["trials_completed"] == 2 and summary["best_model"] is None

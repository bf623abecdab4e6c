"""``search``: one resumable KerasTuner search in its own directory, with its report.

The directory receives ``search.json`` (the settings; a rerun must match them),
``search/`` (KerasTuner's oracle and one folder per trial, each with ``record.json``:
seconds, parameters, tuner id), ``results.csv`` and ``results.png`` (validation
accuracy against trial and against the hyperparameters that mattered most), and at the
end ``best_hyperparameters.json``, ``best_model.keras`` (the best trial's
hyperparameters rebuilt and trained again), ``preprocessing.json`` and ``summary.json``.

In KerasTuner's chief/worker mode (``distributed``) the chief owns the directory as a
single process does (its oracle state is ``search/oracle.json`` and ``search/chief.json``)
and writes the report after its last worker is done; a worker writes only its trials'
folders (``search/trial_<id>``, ``search/<tuner id>.json``), in the chief's directory
when they share one, else in its own.
"""

import contextlib
import csv
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import keras
import keras_tuner
import numpy as np

from keras_newton.tuning import distributed
from keras_newton.tuning.hypermodel import CGNetHyperModel, depth_of, describe_space

TUNERS = ("bayesian", "hyperband", "random")
OBJECTIVE = "val_accuracy"
PROJECT = "search"
SEARCH_JSON = "search.json"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"
BEST_HP_JSON = "best_hyperparameters.json"
BEST_MODEL = "best_model.keras"
PREPROCESSING_JSON = "preprocessing.json"
SUMMARY_JSON = "summary.json"
RECORD_JSON = "record.json"
# Column order of the results table (absent columns are left out).
COLUMNS = ("trial", "status", "family", "depth", "N1", "N2", "N3", "n", "width_multiplier",
           "dropout", "lr", "weight_decay", "batch_size", "epochs", "params", "val_accuracy",
           "best_epoch", "seconds")
TUNED_COLUMNS = ("family", "N1", "N2", "N3", "n", "depth", "width_multiplier", "dropout", "lr",
                 "weight_decay", "batch_size")


class _RecordingMixin:
    """Times each trial, records it, counts trials run; a worker's trials send heartbeats.

    The record (seconds, parameters, epochs, tuner id) goes to ``trial_<id>/record.json``
    and, as the constant metrics ``trial_seconds``, ``trial_params`` and
    ``trial_epochs``, into the trial itself, so that a chief on another machine has it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trials_run = []

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        if hasattr(self.oracle, "start_heartbeat"):
            self.oracle.start_heartbeat(trial.trial_id)

    def on_trial_end(self, trial):
        try:
            super().on_trial_end(trial)
        finally:
            if hasattr(self.oracle, "stop_heartbeat"):
                self.oracle.stop_heartbeat()

    def run_trial(self, trial, *args, **kwargs):
        started = time.time()
        results = super().run_trial(trial, *args, **kwargs)
        record = {"seconds": round(time.time() - started, 2),
                  "params": self.hypermodel.last_params,
                  "epochs": kwargs.get("epochs")}
        for history in results if isinstance(results, list) else [results]:
            if isinstance(history, keras.callbacks.History) and history.epoch:
                history.history.update({f"trial_{k}": [v] * len(history.epoch)
                                        for k, v in record.items() if v is not None})
        path = Path(self.get_trial_dir(trial.trial_id)) / RECORD_JSON
        path.write_text(json.dumps({**record, "tuner_id": self.tuner_id}))
        self.trials_run.append(trial.trial_id)
        return results


class SweepOracle(keras_tuner.Oracle):
    """Runs a fixed list of points (dicts of hyperparameter values), once each, in order."""

    def __init__(self, points, **kwargs):
        super().__init__(max_trials=len(points), **kwargs)
        self.points = [dict(p) for p in points]

    def populate_space(self, trial_id):
        done = [t.hyperparameters.values for t in self.trials.values()]
        for point in self.points:
            if not any(all(v.get(k) == x for k, x in point.items()) for v in done):
                values = {**self.hyperparameters.values, **point}
                return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING,
                        "values": values}
        return {"status": keras_tuner.engine.trial.TrialStatus.STOPPED, "values": None}


def make_tuner(kind, hypermodel, *, max_trials, epochs, directory, seed=0,
               distribution_strategy=None, points=None, max_retries=0):
    """Returns the KerasTuner tuner ``kind`` (one of ``TUNERS``, or ``"sweep"`` with ``points``).

    Trials are timed and recorded; KerasTuner calls ``keras.backend.clear_session()``
    before building each trial's model. ``overwrite`` is always False here: the
    directory is cleared (or checked) by ``search``. ``max_retries`` is KerasTuner's
    ``max_retries_per_trial`` (reruns of a trial that crashed or whose worker was lost).
    """
    common = dict(hypermodel=hypermodel, objective=keras_tuner.Objective(OBJECTIVE, "max"),
                  directory=str(directory), project_name=PROJECT, overwrite=False,
                  distribution_strategy=distribution_strategy, seed=seed,
                  max_retries_per_trial=max_retries)
    if kind == "random":
        return type("RandomSearch", (_RecordingMixin, keras_tuner.RandomSearch), {})(
            max_trials=max_trials, **common)
    if kind == "bayesian":
        return type("BayesianOptimization",
                    (_RecordingMixin, keras_tuner.BayesianOptimization), {})(
            max_trials=max_trials, **common)
    if kind == "hyperband":
        tuner = type("Hyperband", (_RecordingMixin, keras_tuner.Hyperband), {})(
            max_epochs=epochs, factor=3, **common)
        tuner.oracle.max_trials = max_trials  # Hyperband has no trial budget of its own
        return tuner
    if kind == "sweep":
        oracle = SweepOracle(points, objective=common.pop("objective"), seed=common.pop("seed"),
                             max_retries_per_trial=common.pop("max_retries_per_trial"))
        return type("Sweep", (_RecordingMixin, keras_tuner.Tuner), {})(oracle=oracle, **common)
    raise ValueError(f"`tuner` must be one of {list(TUNERS)}. Received: tuner={kind!r}")


def _trial_record(tuner, trial):
    """``record.json`` of a trial, else the record its worker sent as metrics."""
    path = Path(tuner.get_trial_dir(trial.trial_id)) / RECORD_JSON
    if path.exists():
        return json.loads(path.read_text())
    record = {}
    for key, kind in (("seconds", float), ("params", int), ("epochs", int)):
        if trial.metrics.exists(f"trial_{key}"):
            record[key] = kind(trial.metrics.get_last_value(f"trial_{key}"))
    return record


def results_table(tuner):
    """Returns one row per trial (dicts keyed by ``COLUMNS``), in trial order."""
    rows = []
    for trial_id in sorted(tuner.oracle.trials, key=int):
        trial = tuner.oracle.trials[trial_id]
        hp = trial.hyperparameters
        values = {p.name: hp.values[p.name] for p in hp.space
                  if p.name in hp.values and hp.is_active(p)}
        record = _trial_record(tuner, trial)
        row = {"trial": int(trial_id), "status": str(trial.status).split(".")[-1]}
        row.update({k: v for k, v in values.items() if not k.startswith("tuner/")})
        row["depth"] = depth_of(values)
        row["epochs"] = hp.values.get("tuner/epochs", record.get("epochs"))
        row["params"] = record.get("params")
        row["val_accuracy"] = None if trial.score is None else round(float(trial.score), 4)
        row["best_epoch"] = None if trial.best_step is None else int(trial.best_step) + 1
        row["seconds"] = record.get("seconds")
        rows.append(row)
    return rows


def _columns(rows):
    present = {k for row in rows for k, v in row.items() if v is not None}
    return [c for c in COLUMNS if c in present]


def write_table(rows, path):
    """Writes ``rows`` as CSV (columns in ``COLUMNS`` order)."""
    columns = _columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_table(path):
    """Reads a results CSV back (numbers as int/float, empty cells as None)."""
    def parse(v):
        if v == "":
            return None
        for kind in (int, float):
            with contextlib.suppress(ValueError):
                return kind(v)
        return v

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def format_table(rows):
    """Returns the results as an aligned text table."""
    columns = _columns(rows)

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 and v else f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _ranks(values):
    values = np.asarray(values, dtype=float)
    order = values.argsort()
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in np.unique(values):  # ties share their mean rank
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def parameter_importance(rows):
    """Returns ``[(name, rho)]``: Spearman correlation of each tuned numeric
    hyperparameter with the validation accuracy over completed trials, by ``|rho|``.

    A rough guide with few trials: it sees only monotonic effects.
    """
    done = [r for r in rows if r.get("val_accuracy") is not None]
    scores = [r["val_accuracy"] for r in done]
    result = []
    for name in TUNED_COLUMNS:
        values = [r.get(name) for r in done]
        if any(not isinstance(v, (int, float)) for v in values) or len(set(values)) < 2:
            continue
        a, b = _ranks(values), _ranks(scores)
        denom = a.std() * b.std()
        rho = float(((a - a.mean()) * (b - b.mean())).mean() / denom) if denom else 0.0
        result.append((name, rho))
    return sorted(result, key=lambda item: -abs(item[1]))


def plot_results(rows, path, title="", top=4):
    """Plots validation accuracy against trial and against the ``top`` parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r.get("val_accuracy") is not None]
    important = parameter_importance(rows)[:top]
    fig, axes = plt.subplots(1, 1 + len(important), figsize=(4 * (1 + len(important)), 3.4),
                             squeeze=False)
    axes = axes[0]
    trials = [r["trial"] for r in done]
    scores = [r["val_accuracy"] for r in done]
    axes[0].plot(trials, scores, "o", label="trial")
    axes[0].plot(trials, np.maximum.accumulate(scores) if scores else [], "-", label="best so far")
    axes[0].set_xlabel("trial")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="best", fontsize=8)
    for ax, (name, rho) in zip(axes[1:], important, strict=True):
        ax.plot([r[name] for r in done], scores, "o")
        if name in ("lr", "weight_decay") and min(r[name] for r in done) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        elif all(isinstance(r[name], int) for r in done):
            ticks = sorted({r[name] for r in done})
            if len(ticks) <= 6:
                ax.set_xticks(ticks)
            else:
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(name)
        ax.set_title(f"Spearman rho = {rho:+.2f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _changed_settings(directory, old, config, hint):
    changed = sorted(k for k in set(old) | set(config)
                     if k != "data" and old.get(k) != config.get(k))
    if changed:
        raise ValueError(
            "The directory holds a search with other settings (" + ", ".join(changed)
            + f"); {hint}. Received: directory={str(directory)!r}, "
            + ", ".join(f"{k}={config.get(k)!r}" for k in changed)
        )


def _refuse_foreign(directory):
    if directory.exists() and any(directory.iterdir()) and not (directory / SEARCH_JSON).exists():
        raise ValueError("`directory` holds files that are not a keras-newton search; use an "
                         f"empty or new directory. Received: directory={str(directory)!r}")


def _prepare_directory(directory, config, overwrite):
    """Clears (overwrite) or checks the search directory; returns True when resuming."""
    marker = directory / SEARCH_JSON
    _refuse_foreign(directory)
    if overwrite and directory.exists():
        shutil.rmtree(directory)
    if marker.exists():
        _changed_settings(directory, json.loads(marker.read_text()), config,
                          "use another --directory or --overwrite")
        return True
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(config, indent=1))
    return False


def _join_directory(directory, config):
    """A worker's ``_prepare_directory``: checks or creates, never deletes (the chief's
    directory may be this one)."""
    marker = directory / SEARCH_JSON
    _refuse_foreign(directory)
    if marker.exists():
        _changed_settings(directory, json.loads(marker.read_text()), config,
                          "a worker never deletes a search: give it the chief's settings or "
                          "another --directory")
        return
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{SEARCH_JSON}.{os.getpid()}"
    partial.write_text(json.dumps(config, indent=1))
    os.replace(partial, marker)  # other workers sharing the directory see all or nothing


def _adopt_oracle_state(directory, tuner_id):
    """Lets a tuner id reload an oracle another tuner id saved (a single-process search
    resumed by a chief, or the reverse): KerasTuner reloads only when
    ``<tuner_id>.json`` exists, and a tuner's own state is empty."""
    project = directory / PROJECT
    if (project / "oracle.json").exists() and not (project / f"{tuner_id}.json").exists():
        (project / f"{tuner_id}.json").write_text("{}")


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")


def _check_arguments(tuner, points, max_trials, epochs, subset, final_epochs, distribute,
                     max_retries, worker_timeout):
    if tuner not in TUNERS and not (tuner == "sweep" and points):
        raise ValueError(f"`tuner` must be one of {list(TUNERS)}. Received: tuner={tuner!r}")
    if tuner == "bayesian" and importlib.util.find_spec("sklearn") is None:
        raise ValueError("`tuner='bayesian'` needs scikit-learn (pip install scikit-learn). "
                         "Received: tuner='bayesian'")
    _check_count("max_trials", max_trials)
    _check_count("epochs", epochs)
    if subset is not None:
        _check_count("subset", subset)
    _check_count("final_epochs", final_epochs, 0)
    _check_count("max_retries", max_retries, 0)
    if isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float)) \
            or not worker_timeout > 0:
        raise ValueError("`worker_timeout` must be a positive number of seconds. "
                         f"Received: worker_timeout={worker_timeout!r}")
    if distribute not in ("auto", "none", "mirrored"):
        raise ValueError("`distribute` must be one of ['auto', 'none', 'mirrored'] for a "
                         f"search. Received: distribute={distribute!r}")


def _check_source(dataset, data):
    """Returns the dataset's spec and the checked local source (``dataset`` canonical)."""
    from keras_newton.data import DATASETS
    from keras_newton.data.image_folder import check_source

    spec = DATASETS[dataset]
    if spec.get("streaming"):
        raise ValueError(f"Searches need an in-memory dataset; {dataset!r} is streamed. "
                         f"Received: dataset={dataset!r}")
    if data is not None:
        data = check_source(data)
    elif spec["tfds"] is None:
        raise ValueError(f"Dataset {dataset!r} needs a local folder or archive of "
                         "split/<class>/<image> files. Received: data=None")
    return spec, data


def _load(dataset, spec, data, recipe, subset, seed, cache_dir, hypermodel_args, dist):
    """Reads the split; returns ``(train, val, preprocessing, hypermodel)``."""
    from keras_newton.data import normalization
    from keras_newton.training.trainer import _split_data

    (x_train, y_train), (x_val, y_val), class_names = _split_data(
        dataset, data, recipe, subset, seed, cache_dir)
    preprocessing = {
        **normalization(spec["normalization"], x_train),
        "formula": "(x - mean) / std on RGB pixels x in [0, 255], NHWC float32",
        "image_size": list(x_train.shape[1:3]),
        "class_names": class_names,
    }
    hypermodel = CGNetHyperModel(
        **hypermodel_args, classes=len(class_names), input_shape=(*x_train.shape[1:3], 3),
        mean=preprocessing["mean"], std=preprocessing["std"], recipe=recipe, seed=seed,
        num_replicas=dist.num_replicas)
    too_big = [b for b in hypermodel.values("batch_size") if b > len(y_train)]
    if too_big:
        raise ValueError(f"`batch_size` is larger than the {len(y_train)} training images. "
                         f"Received: batch_size={too_big[0]}")
    return (x_train, y_train), (x_val, y_val), preprocessing, hypermodel


def _announce(search_tuner, role, directory, resuming, overwrite, max_trials):
    if role.kind == "worker":
        print(f"Worker {role.tuner_id}: joined the search of the chief at {role.address} "
              f"(trials in {directory}).", flush=True)
        return
    finished = sum(t.status == "COMPLETED" for t in search_tuner.oracle.trials.values())
    chief = f" as chief ({role.tuner_id}, {role.address})" if role.kind == "chief" else ""
    if resuming:
        print(f"Resuming the search in {directory}{chief}: {finished} trial(s) finished, "
              f"budget {max_trials} (--overwrite starts over).", flush=True)
    else:
        how = "overwrite=True: a previous search there was deleted" if overwrite \
            else "overwrite=False"
        print(f"New search in {directory}{chief} ({how}).", flush=True)


def _run(search_tuner, role, train, val, epochs, callbacks, verbose, worker_timeout):
    """Runs the trials (single, worker) or serves the oracle (chief).

    Returns the trial ids that ended in this call, and the chief's lost workers.
    """
    fit = dict(validation_data=val, epochs=epochs, callbacks=list(callbacks), verbose=verbose)
    if role.kind == "worker":
        distributed.use_worker_client(search_tuner, distributed.heartbeat_seconds(worker_timeout))
    if role.kind != "chief":
        search_tuner.search(*train, **fit)
        return list(search_tuner.trials_run), []
    oracle = search_tuner.oracle
    distributed.tidy_retry_queue(oracle)
    if distributed.search_is_over(oracle):
        print("Chief: the search is over (no trial left to run); reporting.", flush=True)
        return [], []
    oracle.verbose = verbose  # as KerasTuner's chief does in Tuner.search
    search_tuner.save()
    servicer = distributed.serve(oracle, role.address, worker_timeout)
    search_tuner.save()
    return servicer.ended, servicer.lost


def _write_report(search_tuner, directory, preprocessing, title):
    """Writes the table, plot, best hyperparameters and preprocessing; returns
    ``(rows, best_hp, best_values, best_row)``."""
    rows = results_table(search_tuner)
    write_table(rows, directory / RESULTS_CSV)
    plot_results(rows, directory / RESULTS_PNG, title)
    best_hp = search_tuner.get_best_hyperparameters(1)
    if not best_hp or best_hp[0] is None or not any(r["val_accuracy"] is not None
                                                    for r in rows):
        raise RuntimeError(f"No trial of the search in {directory} completed; see "
                           f"{directory / PROJECT} for their errors.")
    best_hp = best_hp[0]
    best_values = {k: v for k, v in best_hp.values.items() if not k.startswith("tuner/")
                   and best_hp.is_active(k)}
    best_row = max((r for r in rows if r["val_accuracy"] is not None),
                   key=lambda r: r["val_accuracy"])
    (directory / BEST_HP_JSON).write_text(json.dumps(best_values, indent=1))
    (directory / PREPROCESSING_JSON).write_text(json.dumps(preprocessing, indent=1))
    return rows, best_hp, best_values, best_row


def search(
    family="newton_cgnet",
    dataset="cifar10",
    data=None,
    tuner="random",
    max_trials=10,
    epochs=3,
    directory="runs/tune",
    overwrite=False,
    space=None,
    subset=None,
    val_size=None,
    augment=False,
    final_epochs=None,
    distribute="auto",
    seed=0,
    verbose="auto",
    callbacks=(),
    cache_dir=None,
    stages=None,
    points=None,
    preset=None,
    max_retries=0,
    worker_timeout=60,
):
    """Runs (or resumes) a hyperparameter search and reports it.

    Rerunning the same call continues the search in ``directory``: finished trials are
    reloaded, not redone; an interrupted trial is run again from its start. A rerun
    with other settings is refused unless ``overwrite=True`` (which deletes the
    previous search). ``max_trials`` may be raised on a rerun to extend a search.

    With KerasTuner's environment variables set (``KERASTUNER_TUNER_ID``,
    ``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``) the same call is the chief
    (it serves the oracle, then writes the report and the best model) or a worker (it
    runs trials and writes only their folders); see ``keras_newton.tuning.distributed``.

    Args:
        family: ``"newton_cgnet"``, ``"resnet"`` or ``"both"`` (one budget for both).
        dataset: a name of ``keras_newton.data.DATASETS``.
        data: optional local folder or archive (offline).
        tuner: ``"bayesian"``, ``"hyperband"`` or ``"random"``.
        max_trials: trial budget (Hyperband: a cap on its brackets' trials).
        epochs: epochs per trial (Hyperband: the maximum).
        directory: the search's own directory.
        overwrite: delete a previous search in ``directory`` first (never on a worker).
        space: overrides of the family's default space (see ``hypermodel``).
        subset: use only this many training images (and at most this many validation
            images), class-balanced.
        val_size: held-out validation images (recipe default: 5000 on CIFAR).
        augment: the "+" augmentation (and recipe).
        final_epochs: epochs to retrain the best hyperparameters for ``best_model.keras``
            (default ``epochs``; 0 skips the retraining).
        distribute: ``"auto"``, ``"none"`` or ``"mirrored"``; a TensorFlow strategy is
            passed to the tuner as ``distribution_strategy`` (per worker when distributed).
        seed: seed of the split, subset, tuner, weight initialisation and shuffling.
        verbose: ``fit`` verbosity.
        callbacks: extra Keras callbacks for every trial.
        cache_dir: cache root for local sources.
        stages: fix Newton-CGNet's ``(N1, N2, N3)``.
        points: a fixed list of hyperparameter values to run (``tuner="sweep"``).
        preset: name recorded in ``search.json`` (e.g. ``"figure4"``).
        max_retries: KerasTuner's ``max_retries_per_trial``: reruns of a trial that
            raised or whose worker was lost before it is marked failed.
        worker_timeout: seconds without news from a worker after which the chief gives
            its trial up (workers send heartbeats every ``min(10, worker_timeout / 6)`` s).

    Returns:
        The summary dict (also in ``directory/summary.json``): ``rows`` (the results
        table), ``best_hyperparameters``, ``best_val_accuracy``, ``trials_run`` (this
        call; on the chief, the trials its workers ended), ``final_val_accuracy``, the
        paths written, ``role`` and, on the chief, ``workers_lost``. A worker returns
        only ``role``, ``tuner_id``, ``trials_run``, ``directory``, ``distribute`` and
        ``replicas``.
    """
    from keras_newton.data import canonical_dataset
    from keras_newton.data.image_folder import source_key
    from keras_newton.training import get_distribution, get_recipe

    role = distributed.role()
    final_epochs = epochs if final_epochs is None else final_epochs
    _check_arguments(tuner, points, max_trials, epochs, subset, final_epochs, distribute,
                     max_retries, worker_timeout)
    dataset = canonical_dataset(dataset)
    recipe = get_recipe(dataset, augment, val_size=val_size, epochs=epochs)
    hypermodel_args = dict(family=family, space=space, augment=augment, stages=stages)
    space_used = CGNetHyperModel(family, space, recipe=recipe, stages=stages).space  # checks it
    spec, data = _check_source(dataset, data)

    dist = get_distribution(distribute)  # before other TensorFlow work
    directory = Path(directory)
    config = json.loads(json.dumps({  # tuples -> lists, as read back
        "family": family, "dataset": dataset,
        "data": str(data.resolve()) if data is not None else None,
        "data_key": source_key(data) if data is not None else None,
        "tuner": tuner, "epochs": epochs, "subset": subset, "val_size": recipe["val_size"],
        "augment": augment, "seed": seed, "stages": list(stages) if stages else None,
        "space": describe_space(space_used), "points": points, "preset": preset,
    }))
    resuming = None
    if role.kind != "worker":
        resuming = _prepare_directory(directory, config, overwrite)
        _adopt_oracle_state(directory, role.tuner_id)
    train, val, preprocessing, hypermodel = _load(dataset, spec, data, recipe, subset, seed,
                                                  cache_dir, hypermodel_args, dist)
    if role.kind == "worker":
        distributed.wait_for_chief(role.address)
        _join_directory(directory, config)

    # A JAX DataParallel distribution is a scope; a tf.distribute strategy goes to the tuner.
    outer = dist.scope() if dist.strategy is None else contextlib.nullcontext()
    with outer:
        search_tuner = make_tuner(tuner, hypermodel, max_trials=max_trials, epochs=epochs,
                                  directory=directory, seed=seed,
                                  distribution_strategy=dist.strategy, points=points,
                                  max_retries=max_retries)
        _announce(search_tuner, role, directory, resuming, overwrite, max_trials)
        started = time.time()
        trials_run, lost = _run(search_tuner, role, train, val, epochs, callbacks, verbose,
                                worker_timeout)
        seconds = time.time() - started
        if role.kind == "worker":
            return {"role": "worker", "tuner_id": role.tuner_id, "trials_run": trials_run,
                    "directory": str(directory), "distribute": dist.kind,
                    "replicas": dist.num_replicas,
                    "search_seconds_this_session": round(seconds, 1)}
        title = (f"{family} on {dataset} ({tuner}, {len(train[1])} training / {len(val[1])} "
                 f"validation images, {epochs} epoch(s))")
        rows, best_hp, best_values, best_row = _write_report(search_tuner, directory,
                                                             preprocessing, title)
        final = None
        if final_epochs:
            final = _train_best(search_tuner, best_hp, directory, dist, final_epochs,
                                train, val, verbose)

    summary = {
        "family": family, "dataset": dataset, "tuner": tuner, "preset": preset,
        "max_trials": max_trials, "epochs": epochs,
        "train_images": int(len(train[1])), "val_images": int(len(val[1])),
        "trials_completed": sum(r["status"] == "COMPLETED" for r in rows),
        "trials_run": trials_run,
        "search_seconds_this_session": round(seconds, 1),
        "best_trial": best_row["trial"],
        "best_hyperparameters": best_values,
        "best_val_accuracy": best_row["val_accuracy"],
        "final_epochs": final_epochs,
        "final_val_accuracy": final,
        "best_model": str(directory / BEST_MODEL) if final_epochs else None,
        "results_csv": str(directory / RESULTS_CSV),
        "results_png": str(directory / RESULTS_PNG),
        "distribute": dist.kind, "replicas": dist.num_replicas,
        "backend": keras.backend.backend(),
        "parameter_importance": parameter_importance(rows),
        "role": role.kind,
    }
    if role.kind == "chief":
        summary["workers_lost"] = lost
    (directory / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    summary["rows"] = rows
    return summary


def _train_best(search_tuner, best_hp, directory, dist, epochs, train, val, verbose):
    """Rebuilds the best hyperparameters, trains them, keeps the best epoch, saves .keras."""
    keras.backend.clear_session()
    weights = directory / "best_model.weights.h5"
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(weights), monitor=OBJECTIVE, mode="max", save_best_only=True,
        save_weights_only=True)
    hypermodel = search_tuner.hypermodel
    with dist.scope():
        model = hypermodel.build(best_hp)
        history = hypermodel.fit(best_hp, model, *train, validation_data=val, epochs=epochs,
                                 callbacks=[checkpoint], verbose=verbose)
        model.load_weights(weights)
    weights.unlink()
    model.save(directory / BEST_MODEL)
    scores = [s for s in history.history[OBJECTIVE] if not math.isnan(s)]
    return round(float(max(scores)), 4) if scores else None

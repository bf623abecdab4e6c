"""``train``: one resumable training run with the paper's recipe."""

import importlib.util
import inspect
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import keras

from keras_newton.data import (
    DATASETS,
    available_splits,
    balanced_subset,
    canonical_dataset,
    holdout_split,
    load_dataset,
    normalization,
)
from keras_newton.data.image_folder import check_source, source_key
from keras_newton.data.pipeline import batches
from keras_newton.data.splits import epoch_seed
from keras_newton.models import MODELS, TEXT_MODELS, canonical_name
from keras_newton.training import callbacks as cb
from keras_newton.training import light_state, swa
from keras_newton.training.distribute import fix_multiworker_build, get_distribution
from keras_newton.training.losses import SparseCategoricalCrossentropyWithSmoothing
from keras_newton.training.recipes import get_recipe, recorded_recipe
from keras_newton.training.schedules import RecipeSchedule

CONFIG_JSON = "config.json"
PREPROCESSING_JSON = "preprocessing.json"
SUMMARY_JSON = "summary.json"
MODEL_KERAS = "model.keras"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
# Everything a run writes in its output folder (what `overwrite=True` removes).
RUN_FILES = (CONFIG_JSON, PREPROCESSING_JSON, SUMMARY_JSON, MODEL_KERAS, BACKUP_DIR, LOG_DIR,
             cb.HISTORY_CSV, cb.BEST_WEIGHTS, cb.BEST_JSON, cb.CURVES_PNG, cb.BUDGET_JSON,
             light_state.LAST_WEIGHTS, light_state.STATE_JSON, light_state.LEGS_JSON,
             light_state.SUMS, light_state.INIT_WEIGHTS, light_state.SWA_NPZ, "backup.old",
             "workers")
# config.json keys that may differ between the calls (legs) of one run: where the data
# lies (its content, data_key, may not change) and the precision of the machine.
EXECUTION_KEYS = ("data", "mixed_precision")


def compile_for_recipe(model, recipe, steps_per_epoch, per_epoch_lr=False,
                       steps_per_execution=1):
    """Compiles ``model`` with the recipe's SGD, learning-rate schedule, loss and accuracy.

    The paper's step schedule: ``lr`` times ``lr_factor`` for each milestone passed; the
    milestones are fractions of the ``epochs * steps_per_epoch`` training steps. The
    ``warmup_epochs`` first epochs (if any) train at ``lr * lr_factor`` (``warmup=
    "linear"``: ramp to ``lr``); ``schedule="cosine"`` decays from ``lr`` to zero instead
    (`schedules.RecipeSchedule`), ``"constant"`` keeps ``lr``. With ``per_epoch_lr`` the
    learning rate is a plain variable, which a callback sets each epoch
    (`callbacks.TimeBudget`). The loss is the cross-entropy, with ``label_smoothing`` when
    the recipe sets it. Weight decay is not added here: it is the builders'
    ``weight_decay`` (an L2 term).
    """
    custom = recipe.get("schedule", "step") != "step" or (
        recipe.get("warmup", "constant") == "linear" and recipe.get("warmup_epochs", 0))
    if per_epoch_lr:
        schedule = recipe["lr"]
    elif custom:
        schedule = RecipeSchedule.from_recipe(recipe, steps_per_epoch)
    else:
        total = recipe["epochs"] * steps_per_epoch
        # PiecewiseConstantDecay switches after step b, i.e. from step b + 1 on.
        boundaries = [int(m * total) - 1 for m in recipe["lr_milestones"]]
        values = [recipe["lr"] * recipe["lr_factor"] ** i for i in range(len(boundaries) + 1)]
        warmup_steps = recipe.get("warmup_epochs", 0) * steps_per_epoch
        if warmup_steps:
            boundaries = [warmup_steps - 1, *boundaries]
            values = [recipe["lr"] * recipe["lr_factor"], *values]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    smoothing = recipe.get("label_smoothing", 0.0)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=recipe["momentum"],
                                       nesterov=recipe["nesterov"]),
        loss=(SparseCategoricalCrossentropyWithSmoothing(smoothing) if smoothing
              else keras.losses.SparseCategoricalCrossentropy()),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
    )
    return model


def _tensorboard(log_dir):
    missing = [p for p in ("tensorboard", "tensorflow") if importlib.util.find_spec(p) is None]
    if missing:  # Keras writes TensorBoard logs with tf.summary
        warnings.warn(f"TensorBoard logs are skipped: {' and '.join(missing)} not installed "
                      f"(pip install {' '.join(missing)}).", stacklevel=3)
        return []
    return [keras.callbacks.TensorBoard(str(log_dir))]


def _run_folder(dist, recipe, out):
    """Checks the global batch against the replicas; ``out``, or this worker's folder in it."""
    if recipe["batch_size"] % dist.num_replicas:
        raise ValueError(
            f"`batch_size` (the global batch) must be divisible by the {dist.num_replicas} "
            f"replicas. Received: batch_size={recipe['batch_size']}"
        )
    return out if dist.is_chief else out / "workers" / f"worker{dist.worker_index}"


def _fit_best(net, train_ds, val_ds, recipe, run_out, title, callbacks, resuming, verbose,
              lr_callback=None, initial_epoch=0, stop_after=None, steps_per_epoch=None,
              on_device=None, epochs_done=0):
    """Fits with the run's callbacks (``lr_callback``, log, light state, backup, NaN stop,
    ``stop_after``, the weight average of ``swa_epochs``, TensorBoard, ``callbacks``) and
    loads the best weights, unless ``stop_after`` paused the run. ``lr_callback`` (one that
    sets the learning rate each epoch, e.g. `callbacks.TimeBudget`) runs first, so the log
    has its value.
    ``on_device``: the arguments of `on_device.fit_on_device` (``train_ds`` and ``val_ds``
    are then ``(images, labels)`` arrays), else ``Model.fit``.

    Returns:
        ``(history rows, best.json, start time)``.
    """
    run_callbacks = [
        *([lr_callback] if lr_callback is not None else []),
        cb.RunLogger(run_out, monitor="val_accuracy", title=title),
        light_state.LightState(run_out, steps_per_epoch),
        cb.Backup(str(run_out / BACKUP_DIR), stop_after, double_checkpoint=True),
        cb.StopOnNaN(
            hint="Try a lower learning rate or warm-up epochs at lr * lr_factor (--lr, "
                 f"--warmup-epochs; received: lr={recipe['lr']}, warmup_epochs="
                 f"{recipe['warmup_epochs']}) in a new --out; the last "
                 f"finished epoch is backed up in {run_out / BACKUP_DIR} and the best "
                 f"weights are in {run_out / cb.BEST_WEIGHTS}."
        ),
        *([stop_after] if stop_after is not None else []),
        *([swa.WeightAverage(run_out, recipe["epochs"], recipe["swa_epochs"], epochs_done)]
          if recipe.get("swa_epochs") else []),
        *_tensorboard(run_out / LOG_DIR),
        *callbacks,
    ]
    if resuming == "light":
        print(f"Resuming the run in {run_out} after epoch {initial_epoch} from its light "
              "state (weights and schedule position; the optimizer's momentum restarts "
              "from zero).")
    elif resuming:
        print(f"Resuming the run in {run_out} from its last finished epoch.")
    started = time.time()
    if on_device is not None:
        from keras_newton.training.on_device import fit_on_device

        fit_on_device(net, train_ds, val_ds, epochs=recipe["epochs"], callbacks=run_callbacks,
                      verbose=verbose, initial_epoch=initial_epoch, **on_device)
    else:
        net.fit(train_ds, validation_data=val_ds, epochs=recipe["epochs"],
                callbacks=run_callbacks, verbose=verbose, shuffle=False,
                initial_epoch=initial_epoch)
    rows = cb.read_history(run_out)
    best = json.loads((run_out / cb.BEST_JSON).read_text())
    if stop_after is None or not stop_after.paused:
        light_state.load_model_weights(net, run_out / cb.BEST_WEIGHTS)
    return rows, best, started


def default_out(model, dataset, augment):
    """``runs/<model>_<dataset>[+]``, e.g. ``runs/newton_cgnet56_cifar10+``."""
    return Path("runs") / f"{model}_{dataset}{'+' if augment else ''}"


def _check_out(out, config, overwrite):
    """Refuses to mix runs in one folder; returns how the run resumes: ``"backup"``,
    ``"light"`` (`light_state.resume_kind`) or None (a new run)."""
    config_path = out / CONFIG_JSON
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return None
    if not config_path.exists():
        return None
    old = json.loads(config_path.read_text())
    # The source may move; its content (data_key) must not change.
    changed = sorted(k for k in set(old) | set(config)
                     if k not in EXECUTION_KEYS and old.get(k) != config.get(k))
    if changed:
        raise ValueError(
            f"The output folder holds a run with other settings ({', '.join(changed)}); use "
            f"another --out or --overwrite. Received: out={str(out)!r}, "
            + ", ".join(f"{k}={config.get(k)!r}" for k in changed)
        )
    summary = out / SUMMARY_JSON
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        raise ValueError(
            "The output folder holds a completed run of these settings; use another --out "
            f"or --overwrite to train again. Received: out={str(out)!r}"
        )
    return light_state.resume_kind(out)


def _split_data(dataset, data, recipe, limit, seed, cache_dir):
    source = load_dataset(dataset, data, recipe["train_split"], cache_dir)
    val_size = recipe["val_size"]
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not (
        1 <= val_size < len(source)
    ):
        raise ValueError(f"`val_size` must be an int in [1, {len(source)}) (the training "
                         f"images). Received: val_size={val_size!r}")
    train_idx, val_idx = holdout_split(source.labels, val_size, seed)
    if limit is not None:
        train_idx = balanced_subset(source.labels, train_idx, min(limit, len(train_idx)), seed)
        val_idx = balanced_subset(source.labels, val_idx, min(val_size, limit), seed)
    train = (source.images[train_idx], source.labels[train_idx])
    val = (source.images[val_idx], source.labels[val_idx])
    return train, val, source.class_names


def _streaming_pipelines(data, recipe, limit, seed, first_epoch=0):
    """ImageNet: streamed training and validation pipelines (keras_newton.data.imagenet)."""
    from keras_newton.data import imagenet

    batch = recipe["batch_size"]
    train_ds, n_train, class_names = imagenet.imagenet_dataset(
        "train", data, batch, seed=seed, limit=limit, first_epoch=first_epoch)
    val_ds, n_val, _ = imagenet.imagenet_dataset("val", data, batch, limit=limit)
    preprocessing = {"mode": "imagenet", "mean": list(imagenet.IMAGENET_MEAN),
                     "std": list(imagenet.IMAGENET_STD)}
    size = imagenet.IMAGE_SIZE
    return train_ds, val_ds, n_train, n_val, class_names, preprocessing, (size, size)


def _in_memory_pipelines(dataset, data, recipe, limit, seed, cache_dir, norm_mode,
                         arrays=False, first_epoch=0):
    """The training and validation pipelines (the training one draws from ``(seed,
    first_epoch)``, `splits.epoch_seed`); with ``arrays``, the uint8 ``(images,
    labels)`` themselves (`on_device.fit_on_device`)."""
    (x_train, y_train), (x_val, y_val), class_names = _split_data(
        dataset, data, recipe, limit, seed, cache_dir
    )
    preprocessing = normalization(norm_mode, x_train)
    if arrays:
        return ((x_train, y_train), (x_val, y_val), len(y_train), len(y_val), class_names,
                preprocessing, tuple(x_train.shape[1:3]))
    batch = recipe["batch_size"]
    train_ds = batches(x_train, y_train, batch, preprocessing["mean"], preprocessing["std"],
                       training=True, augment=recipe["augment"], seed=seed,
                       first_epoch=first_epoch)
    val_ds = batches(x_val, y_val, batch, preprocessing["mean"], preprocessing["std"],
                     training=False)
    return (train_ds, val_ds, len(y_train), len(y_val), class_names, preprocessing,
            tuple(x_train.shape[1:3]))


def _test_split(dataset, data, cache_dir):
    if DATASETS[dataset].get("streaming"):
        return None
    if data is None or "test" in available_splits(dataset, data, cache_dir):
        return load_dataset(dataset, data, "test", cache_dir)
    return None


def _resume_position(net, run_out, resuming, steps_per_epoch):
    """``(epochs done, light state or None)``; loads a light state's weights into ``net``
    (built, not compiled: set ``optimizer.iterations`` to its ``iterations`` after
    compiling)."""
    if resuming == "light":
        restored = light_state.restore(net, run_out)
        if restored["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"The light state was written with {restored['steps_per_epoch']} steps per "
                f"epoch, this run has {steps_per_epoch}. Received: out={str(run_out)!r}")
        return restored["epochs_done"], restored
    return light_state.epochs_done(run_out, resuming), None


def _device_name():
    """``"gpu"``, ``"tpu"`` or ``"cpu"``: where this process trains."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.default_backend()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return "cpu"


def _check_positive(name, value, kind=(int, float)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                              or not value > 0):
        noun = "integer" if kind is int else "number of seconds"
        raise ValueError(f"`{name}` must be a positive {noun} or None. "
                         f"Received: {name}={value!r}")


def _settings(model, dataset, augment, limit, time_budget, overrides):
    """Checks the run's settings; ``(model name, dataset, builder, has dropout, recipe)``."""
    model_name = canonical_name(model)
    if model_name in TEXT_MODELS:
        raise ValueError(f"{model_name} is a text model: train it with "
                         "keras_newton.training.text.train_text (or `keras-newton train` with "
                         f"a text dataset). Received: model={model!r}")
    dataset = canonical_dataset(dataset)
    builder = MODELS[model_name]
    has_dropout = "dropout_rate" in inspect.signature(builder).parameters
    if not has_dropout and overrides.get("dropout") is not None:
        raise ValueError(f"{model_name} has no dropout layers. "
                         f"Received: dropout={overrides['dropout']!r}")
    recipe = get_recipe(dataset, augment, **overrides)
    if not has_dropout:
        recipe["dropout"] = None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer. Received: limit={limit!r}")
    _check_positive("time_budget", time_budget)
    if time_budget is not None and recipe["schedule"] == "cosine":
        raise ValueError("`time_budget` plans the run's length again after each epoch, "
                         "which would change the lr of the cosine schedule's past epochs: "
                         "give the cosine schedule its --epochs (and --stop-after to pause "
                         f"a call). Received: time_budget={time_budget!r}, schedule='cosine'")
    if time_budget is not None and recipe["swa_epochs"]:
        raise ValueError("`time_budget` sets the run's length after its first epochs; "
                         "`swa_epochs` averages the last epochs of a known length: give "
                         "--epochs (and --stop-after to pause a call). Received: "
                         f"time_budget={time_budget!r}, swa_epochs={recipe['swa_epochs']}")
    return model_name, dataset, builder, has_dropout, recipe


def _source(data, dataset):
    if data is not None:
        return check_source(data)
    if DATASETS[dataset]["tfds"] is None:
        raise ValueError(f"Dataset {dataset!r} needs a local folder or archive of "
                         "split/<class>/<image> files. Received: data=None")
    return None


def _config(model_name, dataset, data, limit, seed, recipe, time_budget, init_weights=None):
    return {
        "model": model_name, "dataset": dataset,
        # The source by name and content, not by this machine's path.
        "data": data.name if data is not None else None,
        "data_key": source_key(data) if data is not None else None,
        "limit": limit, "seed": seed, **recorded_recipe(recipe),
        # Only when set, so that runs from before the option still resume.
        **({"time_budget": time_budget} if time_budget is not None else {}),
        **({"init_weights": init_weights} if init_weights is not None else {}),
    }


_INIT_HELP = ("`init_weights` (--init-weights) must be a registered zoo name ({keys}; "
              "`keras-newton zoo list`) or the path of an existing `.weights.h5` file")


def init_weights_record(init_weights, model_name):
    """``(record, file)`` of a run's ``init_weights`` (``--init-weights``), or ``(None, None)``.

    A registered zoo key (``"newton_cgnet10.cifar10"``, of ``model_name``) gives the record
    ``{"zoo": key, "sha256": ...}``; the path of a ``.weights.h5`` file ``{"file": its
    name, "sha256": ...}`` and the file (the run folder gets a copy, ``init.weights.h5``);
    a record (a run's config.json, on ``--resume``) is checked and kept, with no file.
    config.json keeps the record: no path of this machine.
    """
    from keras_newton import zoo

    if init_weights is None:
        return None, None
    keys = ", ".join(zoo.available()) or "none registered"
    if isinstance(init_weights, dict):
        kind = next((k for k in ("zoo", "file") if k in init_weights), None)
        if (kind is None or set(init_weights) != {kind, "sha256"}
                or not all(isinstance(v, str) for v in init_weights.values())
                or "/" in init_weights[kind] or "\\" in init_weights[kind]
                or (kind == "zoo" and "." not in init_weights[kind])):
            raise ValueError("A recorded `init_weights` must be {\"zoo\": name, \"sha256\": ...} "
                             "or {\"file\": file name, \"sha256\": ...}. "
                             f"Received: init_weights={init_weights!r}")
        record, path = dict(init_weights), None
    elif isinstance(init_weights, str | os.PathLike):
        name = os.fspath(init_weights)
        if isinstance(init_weights, str) and name in zoo.REGISTRY:
            record, path = {"zoo": name, "sha256": zoo.REGISTRY[name]["sha256"]}, None
        elif name.endswith(".weights.h5") and os.path.isfile(name):
            path = Path(name)
            record = {"file": path.name, "sha256": light_state.file_sha256(path)}
        else:
            raise ValueError(f"{_INIT_HELP.format(keys=keys)}. Received: init_weights={name!r}")
    else:
        raise ValueError(f"{_INIT_HELP.format(keys=keys)}. "
                         f"Received: init_weights={init_weights!r}")
    if "zoo" in record and record["zoo"].split(".", 1)[0] != model_name:
        raise ValueError(f"`init_weights` (--init-weights) {record['zoo']!r} are weights of "
                         f"{record['zoo'].split('.', 1)[0]}, not of the run's model "
                         f"{model_name}. Received: init_weights={record['zoo']!r}, "
                         f"model={model_name!r}")
    return record, path


def _copy_init_weights(path, folder):
    """Copies the ``--init-weights`` file into the run folder (once)."""
    target = Path(folder) / light_state.INIT_WEIGHTS
    if path is None or target.exists():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)


def _h5_weight_count(path):
    import h5py

    count = 0

    def visit(name, item):
        nonlocal count
        count += isinstance(item, h5py.Dataset) and not name.startswith("optimizer/")

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return count


def load_init_weights(net, record, folder):
    """Loads a run's ``init_weights`` (the record of `init_weights_record`) into the built
    ``net``: the zoo's file, or ``folder/init.weights.h5``, its sha256 checked against the
    record first; ValueError when it does not match or does not fit the model."""
    from keras_newton import zoo

    given = f"init_weights={record}"
    if "zoo" in record:
        arch, tag = record["zoo"].split(".", 1)
        entry = zoo.get_entry(arch, tag)
        if entry["sha256"] != record["sha256"]:
            raise ValueError(
                f"The zoo entry {record['zoo']} now holds other weights (sha256 "
                f"{entry['sha256']}) than the run's config.json records for `init_weights`: "
                f"start a new run with --init-weights {record['zoo']}. Received: {given}")
        if entry["classes"] != net.output_shape[-1]:
            raise ValueError(
                f"`init_weights` (--init-weights) {record['zoo']} has {entry['classes']} "
                f"classes, the run's model {net.output_shape[-1]}. Received: {given}")
        path, source = zoo.weights_path(arch, tag), f"zoo weights {record['zoo']}"
    else:
        path = Path(folder) / light_state.INIT_WEIGHTS
        source = f"{path} (a copy of {record['file']})"
        if not path.is_file():
            raise ValueError(
                f"The run starts from `init_weights` {record['file']}, whose copy {path} is "
                "missing: put the file there as init.weights.h5 (or start a new run with "
                f"--init-weights FILE). Received: {given}")
        digest = light_state.file_sha256(path)
        if digest != record["sha256"]:
            raise ValueError(
                f"{path} is not the `init_weights` file the run's config.json records: "
                f"sha256 {digest}, expected {record['sha256']} ({record['file']}). "
                f"Received: {given}")
    found, expected = _h5_weight_count(path), len(net.weights)
    try:
        if found != expected:
            raise ValueError(f"the file holds {found} weight arrays, the model {expected}")
        light_state.load_model_weights(net, path)
    except ValueError as e:
        detail = " ".join(str(e).split("Target variable:")[0].split())[:400]
        raise ValueError(
            f"`init_weights` (--init-weights) {source} do not fit the run's model {net.name} "
            f"with {net.output_shape[-1]} classes: {detail}. Received: {given}") from e
    print(f"Initialised the model from {source} (sha256 {record['sha256'][:12]}).")


def new_run_config(out, model, dataset, data=None, augment=False, limit=None, seed=0,
                   time_budget=None, init_weights=None, **overrides):
    """Writes the ``config.json`` of a new run into ``out`` and returns it, training
    nothing: a run prepared here to start elsewhere (``keras-newton train --resume``).
    Arguments as in `train`; ``out`` must not hold a run yet. An ``init_weights`` file is
    copied into ``out`` (``init.weights.h5``)."""
    model_name, dataset, _, _, recipe = _settings(model, dataset, augment, limit, time_budget,
                                                  overrides)
    init_record, init_file = init_weights_record(init_weights, model_name)
    config = _config(model_name, dataset, _source(data, dataset), limit, seed, recipe,
                     time_budget, init_record)
    out = Path(out)
    if (out / CONFIG_JSON).exists():
        raise ValueError(f"The output folder holds a run already. Received: out={str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    _copy_init_weights(init_file, out)
    (out / CONFIG_JSON).write_text(json.dumps(config, indent=1))
    return config


def train(
    model="newton_cgnet56",
    dataset="cifar10",
    data=None,
    out=None,
    augment=False,
    distribute="auto",
    limit=None,
    seed=0,
    verbose="auto",
    overwrite=False,
    evaluate_test=True,
    callbacks=(),
    command=None,
    cache_dir=None,
    mixed_precision=False,
    time_budget=None,
    on_device=False,
    steps_per_execution=1,
    stop_after=None,
    init_weights=None,
    **overrides,
):
    """Trains a registered model on a dataset with the paper's recipe, resumably.

    Rerunning the same call after an interruption resumes at the next epoch with the
    weights and optimizer state of the last finished one (``BackupAndRestore`` in
    ``out/backup``); the position inside the interrupted epoch is not restored, that
    epoch is run again (freshly shuffled). A run folder without a backup but with a
    light state (``last.weights.h5``, ``state.json``: written after every epoch, see
    `light_state`; e.g. copied from another machine) resumes from it: the weights and
    the schedule's position, the optimizer's momentum restarting from zero. The output
    folder receives ``config.json``, ``preprocessing.json`` (mean/std, class names),
    ``history.csv``, ``best.weights.h5`` (lowest validation error), ``best.json``,
    ``curves.png``, the light state and ``legs.json`` (one entry per call), TensorBoard
    ``logs/``, and at the end ``model.keras`` (best weights) and ``summary.json``. In a
    multi-worker run only the chief writes there; the other workers write under
    ``out/workers/worker<i>``.

    Args:
        model: a name of ``keras_newton.models.MODELS`` (``"newton_cgnet_56"`` works).
        dataset: a name of ``keras_newton.data.DATASETS``.
        data: optional local folder or archive (offline; see ``load_dataset``).
        out: output folder; default ``runs/<model>_<dataset>[+]``.
        augment: use the "+" augmentation (and the "+" recipe).
        distribute: ``"auto"``, ``"none"``, ``"mirrored"`` or ``"multiworker"``.
        limit: use only this many training images (and at most this many validation
            images), for smoke tests.
        seed: seed of the hold-out split, shuffling, augmentation and initialisation.
        verbose: ``fit`` verbosity.
        overwrite: delete a previous run's files in ``out`` first.
        evaluate_test: evaluate the best weights on the test split when there is one.
        callbacks: extra Keras callbacks (after the run's own).
        command: the command line, recorded in the summary.
        cache_dir: cache root for local sources.
        mixed_precision: build the model with the ``"mixed_bfloat16"`` policy (bf16
            compute, float32 variables and classifier), for GPUs. It may differ between
            the calls of one run (recorded per call in ``legs.json``).
        time_budget: seconds this call may take (data loading included): the epochs that
            fit (planned after epoch 2 and again until the first milestone, at most
            ``epochs``) set the run's length and lr milestones (`callbacks.TimeBudget`;
            kept when resumed). Not with ``schedule="cosine"``.
        on_device: JAX: the uint8 training and validation images on the device, the
            augmentation and normalisation inside the compiled step
            (`on_device.fit_on_device`); one device, in-memory datasets.
        steps_per_execution: training steps per compiled call (``Model.compile``'s; on
            the device path see `on_device.execution_length`).
        stop_after: seconds this call may take (data loading included): the run pauses
            after the last epoch that fits (`callbacks.StopAfter`), keeping its backup and
            light state, without changing its length or schedule; the same call continues
            it. Returns a summary with ``status="paused"`` and writes no ``summary.json``.
        init_weights: a warm start: a registered zoo key (``"newton_cgnet10.cifar10"``)
            or the path of a ``.weights.h5`` file (copied into ``out`` as
            ``init.weights.h5``), loaded into the built model when the run starts (epoch
            0), its sha256 checked; config.json records ``{"zoo"|"file": name,
            "sha256"}``, which may also be given (a resumed run's). Resumes after an epoch
            continue from the run's own state.
        **overrides: recipe values (``lr``, ``batch_size``, ``epochs``,
            ``weight_decay``, ``dropout``, ``momentum``, ``nesterov``, ``lr_milestones``,
            ``lr_factor``, ``warmup_epochs``, ``warmup``, ``schedule``,
            ``label_smoothing``, ``swa_epochs``, ``val_size``, ``train_split``). With
            ``swa_epochs`` the run's result (``best.weights.h5``, ``best.json``) is the
            average of the weights of its last epochs (`swa`; ``swa.npz`` holds it
            meanwhile).

    Returns:
        The run summary (also written to ``out/summary.json``).

    Raises:
        ValueError: for bad arguments or data.
        LossDivergedError: when the loss becomes NaN or Inf.
    """
    called = time.monotonic()
    model_name, dataset, builder, has_dropout, recipe = _settings(
        model, dataset, augment, limit, time_budget, overrides)
    spec = DATASETS[dataset]
    _check_positive("stop_after", stop_after)
    _check_positive("steps_per_execution", steps_per_execution, int)
    if time_budget is not None and distribute == "multiworker":
        raise ValueError("`time_budget` needs one process: each worker would time its own "
                         "epochs and pick its own run length. Received: time_budget="
                         f"{time_budget!r}, distribute='multiworker'")
    if on_device and keras.backend.backend() != "jax":
        raise ValueError("`on_device` (data on the accelerator, augmentation in the compiled "
                         "step) needs the JAX backend (KERAS_BACKEND=jax). Received: "
                         f"on_device=True, backend={keras.backend.backend()!r}")
    if on_device and spec.get("streaming"):
        raise ValueError(f"`on_device` needs an in-memory dataset; {dataset} is streamed. "
                         f"Received: on_device=True, dataset={dataset!r}")

    data = _source(data, dataset)
    init_record, init_file = init_weights_record(init_weights, model_name)

    # First, before any other TensorFlow op (MultiWorkerMirroredStrategy requires it).
    dist = get_distribution(distribute)
    if on_device and dist.num_replicas > 1:
        raise ValueError(f"`on_device` trains on one device; this distribution has "
                         f"{dist.num_replicas} replicas: use one model per device "
                         "(--distribute none). Received: on_device=True, "
                         f"distribute={distribute!r}")
    folder = Path(out) if out is not None else default_out(model_name, dataset, augment)
    run_out = _run_folder(dist, recipe, folder)
    config = _config(model_name, dataset, data, limit, seed, recipe, time_budget, init_record)
    resuming = _check_out(run_out, config, overwrite)

    # A resumed call draws its shuffles, augmentation and dropout anew, not its first call's.
    first_epoch = light_state.epochs_done(run_out, resuming)
    keras.utils.set_random_seed(epoch_seed(seed, first_epoch))
    if spec.get("streaming"):
        pipelines = _streaming_pipelines(data, recipe, limit, seed, first_epoch)
    else:
        pipelines = _in_memory_pipelines(dataset, data, recipe, limit, seed, cache_dir,
                                         spec["normalization"], arrays=on_device,
                                         first_epoch=first_epoch)
    train_ds, val_ds, n_train, n_val, class_names, norm, image_size = pipelines
    steps_per_epoch = n_train // recipe["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(f"`batch_size` is larger than the {n_train} training images. "
                         f"Received: batch_size={recipe['batch_size']}")
    preprocessing = {
        **norm,
        "formula": "(x - mean) / std on RGB pixels x in [0, 255], NHWC float32",
        "image_size": list(image_size),
        "class_names": class_names,
    }
    run_out.mkdir(parents=True, exist_ok=True)
    _copy_init_weights(init_file, folder)
    (run_out / CONFIG_JSON).write_text(json.dumps(config, indent=1))
    (run_out / PREPROCESSING_JSON).write_text(json.dumps(preprocessing, indent=1))

    mean, std = preprocessing["mean"], preprocessing["std"]
    batch = recipe["batch_size"]

    with dist.scope():
        kwargs = {"dropout_rate": recipe["dropout"]} if has_dropout else {}
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if mixed_precision else "float32")
        try:
            net = builder(classes=len(class_names), input_shape=(*image_size, 3),
                          weight_decay=recipe["weight_decay"], **kwargs)
        finally:
            keras.config.set_dtype_policy(policy)
        initial_epoch, restored = _resume_position(net, run_out, resuming, steps_per_epoch)
        if init_record is not None and initial_epoch == 0:  # a warm start; later: own state
            load_init_weights(net, init_record, folder)
        compile_for_recipe(net, recipe, steps_per_epoch, per_epoch_lr=time_budget is not None,
                           steps_per_execution=1 if on_device else steps_per_execution)
        if restored is not None:
            net.optimizer.iterations.assign(restored["iterations"])
        if dist.kind == "multiworker":
            fix_multiworker_build(net)
        if dist.is_chief:
            light_state.append_leg(run_out, {
                "first_epoch": initial_epoch + 1, "resumed_from": resuming or "start",
                "backend": keras.backend.backend(), "device": _device_name(),
                "mixed_precision": bool(mixed_precision), "on_device": bool(on_device)})
        pause = cb.StopAfter(stop_after, start=called) if stop_after else None
        rows, best, started = _fit_best(
            net, train_ds, val_ds, recipe, run_out, f"{model_name} on {dataset} "
            f"({recipe['recipe']})", callbacks, resuming, verbose,
            cb.TimeBudget(recipe, time_budget, run_out, start=called) if time_budget else None,
            initial_epoch=0 if resuming == "backup" else initial_epoch, stop_after=pause,
            steps_per_epoch=steps_per_epoch, epochs_done=initial_epoch,
            on_device={"mean": mean, "std": std, "batch_size": batch,
                       "augment": recipe["augment"], "seed": seed,
                       "steps_per_execution": steps_per_execution} if on_device else None)
        if pause is not None and pause.paused:
            return {"status": "paused", "model": model_name, "epochs": len(rows),
                    "planned_epochs": recipe["epochs"], "best_val_accuracy": best["value"],
                    "best_epoch": best["epoch"], "out": str(run_out)}
        if recipe["swa_epochs"]:
            if on_device:  # the arrays: host pipelines for the BatchNormalization pass
                (x_train, y_train), (x_val, y_val) = train_ds, val_ds
                train_ds = batches(x_train, y_train, batch, mean, std, training=True,
                                   augment=recipe["augment"], seed=seed)
                val_ds = batches(x_val, y_val, batch, mean, std, training=False)
            best = swa.finish(net, run_out, train_ds, val_ds) or best
        test_accuracy = None
        test = _test_split(dataset, data, cache_dir) if evaluate_test else None
        if test is not None:
            test_ds = batches(test.images, test.labels, batch, mean, std, training=False)
            test_accuracy = float(net.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
        net.save(run_out / MODEL_KERAS)

    seconds = [r["seconds"] for r in rows]
    summary = {
        "status": "completed",
        "model": model_name,
        "dataset": dataset,
        "data": config["data"] or f"tfds:{spec['tfds']}",
        "data_key": config["data_key"],
        "recipe": recipe,
        "limit": limit,
        "seed": seed,
        "train_images": int(n_train),
        "val_images": int(n_val),
        "steps_per_epoch": steps_per_epoch,
        "preprocessing": preprocessing,
        "best_val_accuracy": best["value"],
        "best_epoch": best["epoch"],
        "test_accuracy": test_accuracy,
        "epochs": len(rows),
        "val_accuracy_per_epoch": [r.get("val_accuracy") for r in rows],
        "seconds_per_epoch": sum(seconds) / len(seconds),
        "epoch_seconds": seconds,
        "wall_seconds_this_session": round(time.time() - started, 1),
        "params": int(net.count_params()),
        "mixed_precision": bool(mixed_precision),
        "on_device": bool(on_device),
        "time_budget": time_budget,
        "distribute": dist.kind,
        "replicas": dist.num_replicas,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "command": command,
        "legs": light_state.read_legs(run_out),
    }
    (run_out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    return summary

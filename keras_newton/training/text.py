"""``train_text``: one resumable training run of a text model (Section 4.2 recipe)."""

import json
import time
from pathlib import Path

import keras

from keras_newton.data.splits import epoch_seed
from keras_newton.data.text import (
    TEXT_DATASETS,
    CharTokenizer,
    canonical_text_dataset,
    load_text_dataset,
    make_text_dataset,
    stratified_split,
)
from keras_newton.models import canonical_name
from keras_newton.models.text import SEQUENCE_LENGTH, TEXT_MODELS
from keras_newton.training import light_state
from keras_newton.training.distribute import get_distribution
from keras_newton.training.recipes import get_recipe, recorded_recipe
from keras_newton.training.trainer import (
    CONFIG_JSON,
    MODEL_KERAS,
    PREPROCESSING_JSON,
    SUMMARY_JSON,
    _check_out,
    _fit_best,
    _resume_position,
    _run_folder,
    compile_for_recipe,
)


def canonical_text_model(name):
    """``"NewtonCGNet-Text"``, ``"VDCNN-17"`` -> ``"newton_cgnet_text"``, ``"vdcnn17"``."""
    try:
        key = canonical_name(name)  # the registry's spelling rules
    except ValueError:
        key = None
    if key not in TEXT_MODELS:
        raise ValueError(f"Unknown text model. Valid names: {sorted(TEXT_MODELS)}. "
                         f"Received: model={name!r}")
    return key


def is_text_model(name):
    try:
        canonical_text_model(name)
    except ValueError:
        return False
    return True


def _take(labels, indices, size, seed):
    """``size`` of ``indices``, stratified and seeded (all of them if ``size`` >= their number)."""
    if size >= len(indices):
        return indices
    return indices[stratified_split(labels[indices], size, seed)[1]]


def _split(dataset, data, recipe, limit, seed):
    source = load_text_dataset(dataset, data, recipe["train_split"])
    train_idx, val_idx = stratified_split(source.labels, recipe["val_size"], seed)
    if limit is not None:
        train_idx = _take(source.labels, train_idx, limit, seed)
        val_idx = _take(source.labels, val_idx, limit, seed)
    test = None
    if data is None:  # tfds: the test split is the paper's test set
        test = load_text_dataset(dataset, None, "test")
    return source, train_idx, val_idx, test


def train_text(
    model="newton_cgnet_text",
    dataset="ag_news",
    data=None,
    out=None,
    distribute="auto",
    limit=None,
    seed=0,
    verbose="auto",
    overwrite=False,
    evaluate_test=True,
    callbacks=(),
    command=None,
    sequence_length=SEQUENCE_LENGTH,
    hidden_units=None,
    **overrides,
):
    """Trains a text model of ``TEXT_MODELS`` with the recipe of Section 4.2, resumably.

    Same run folder and resume behaviour as ``keras_newton.training.train`` (config,
    history, best weights, curves, backup, ``model.keras``, ``summary.json``);
    ``preprocessing.json`` records the tokenizer. With ``data`` (a CSV file) the file
    is split seeded and stratified into training and ``val_size`` validation items
    (no test split); with tensorflow-datasets the validation items come from
    ``train`` and the best weights are evaluated on ``test``.

    Args:
        model: a name of ``keras_newton.models.text.TEXT_MODELS``.
        dataset: a name of ``keras_newton.data.text.TEXT_DATASETS``.
        data: optional CSV file (offline).
        out: output folder; default ``runs/<model>_<dataset>``.
        distribute, limit, seed, verbose, overwrite, evaluate_test, callbacks, command:
            as in ``train``.
        sequence_length: characters per text (1024 in the paper; shorter is faster).
        hidden_units: width of the hidden FC layers (default: the builder's, 2048).
        **overrides: recipe values (``lr``, ``batch_size``, ``epochs``, ...).

    Returns:
        The run summary (also written to ``out/summary.json``).
    """
    model_name = canonical_text_model(model)
    dataset = canonical_text_dataset(dataset)
    builder = TEXT_MODELS[model_name]
    recipe = get_recipe(dataset, False, **overrides)
    if recipe["swa_epochs"]:
        raise ValueError("`swa_epochs` (weight averaging) is for the image models; the "
                         f"text trainer keeps the best epoch. Received: swa_epochs="
                         f"{recipe['swa_epochs']}")
    if model_name != "newton_cgnet_text":
        if overrides.get("dropout") is not None:
            raise ValueError(f"{model_name} has no dropout layers. "
                             f"Received: dropout={overrides['dropout']!r}")
        recipe["dropout"] = None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ValueError(f"`limit` must be an integer >= 2. Received: limit={limit!r}")
    if data is None and TEXT_DATASETS[dataset]["tfds"] is None:
        raise ValueError(f"Dataset {dataset!r} needs its CSV file (--data). Received: data=None")
    data = str(Path(data).expanduser().resolve()) if data is not None else None

    dist = get_distribution(distribute)
    run_out = _run_folder(dist, recipe, Path(out) if out is not None
                          else Path("runs") / f"{model_name}_{dataset}")
    model_kwargs = {"sequence_length": sequence_length}
    if hidden_units is not None:
        model_kwargs["hidden_units"] = hidden_units
    config = {"model": model_name, "dataset": dataset, "data": data, "limit": limit,
              "seed": seed, **model_kwargs, **recorded_recipe(recipe)}
    resuming = _check_out(run_out, config, overwrite)

    first_epoch = light_state.epochs_done(run_out, resuming)  # a resumed call draws anew
    keras.utils.set_random_seed(epoch_seed(seed, first_epoch))
    source, train_idx, val_idx, test = _split(dataset, data, recipe, limit, seed)
    batch = recipe["batch_size"]
    steps_per_epoch = len(train_idx) // batch
    if steps_per_epoch < 1:
        raise ValueError(f"`batch_size` is larger than the {len(train_idx)} training items. "
                         f"Received: batch_size={batch}")
    tokenizer = CharTokenizer(sequence_length=sequence_length)
    preprocessing = {"tokenizer": tokenizer.get_config() | {"name": "CharTokenizer"},
                     "class_names": source.class_names}
    run_out.mkdir(parents=True, exist_ok=True)
    (run_out / CONFIG_JSON).write_text(json.dumps(config, indent=1))
    (run_out / PREPROCESSING_JSON).write_text(json.dumps(preprocessing, indent=1))
    train_ds = make_text_dataset(source.texts[train_idx], source.labels[train_idx], batch,
                                 tokenizer, training=True, seed=seed, first_epoch=first_epoch)
    val_ds = make_text_dataset(source.texts[val_idx], source.labels[val_idx], batch, tokenizer)

    with dist.scope():
        kwargs = {"dropout_rate": recipe["dropout"]} if recipe["dropout"] is not None else {}
        net = builder(classes=len(source.class_names), weight_decay=recipe["weight_decay"],
                      **model_kwargs, **kwargs)
        initial_epoch, restored = _resume_position(net, run_out, resuming, steps_per_epoch)
        compile_for_recipe(net, recipe, steps_per_epoch)
        if restored is not None:
            net.optimizer.iterations.assign(restored["iterations"])
        rows, best, started = _fit_best(
            net, train_ds, val_ds, recipe, run_out, f"{model_name} on {dataset} "
            f"({recipe['recipe']})", callbacks, resuming, verbose,
            initial_epoch=0 if resuming == "backup" else initial_epoch,
            steps_per_epoch=steps_per_epoch)
        test_accuracy = None
        if evaluate_test and test is not None:
            test_ds = make_text_dataset(test.texts, test.labels, batch, tokenizer)
            test_accuracy = float(net.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"])
        net.save(run_out / MODEL_KERAS)

    seconds = [r["seconds"] for r in rows]
    summary = {
        "status": "completed", "model": model_name, "dataset": dataset,
        "data": data or f"tfds:{TEXT_DATASETS[dataset]['tfds']}", "recipe": recipe,
        "limit": limit, "seed": seed, **model_kwargs,
        "train_items": int(len(train_idx)), "val_items": int(len(val_idx)),
        "steps_per_epoch": steps_per_epoch, "preprocessing": preprocessing,
        "best_val_accuracy": best["value"], "best_epoch": best["epoch"],
        "test_accuracy": test_accuracy, "epochs": len(rows),
        "val_accuracy_per_epoch": [r.get("val_accuracy") for r in rows],
        "seconds_per_epoch": sum(seconds) / len(seconds), "epoch_seconds": seconds,
        "wall_seconds_this_session": round(time.time() - started, 1),
        "params": int(net.count_params()), "distribute": dist.kind,
        "replicas": dist.num_replicas, "backend": keras.backend.backend(),
        "keras_version": keras.__version__, "command": command,
    }
    (run_out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    return summary


def run_text_cli(args, overrides, command):
    """``keras-newton train`` for text models/datasets; None when neither is text."""
    import sys

    from keras_newton.data.text import is_text_dataset
    from keras_newton.training.callbacks import LossDivergedError

    text = is_text_model(args.model) or is_text_dataset(args.dataset)
    if not text:
        for flag in ("sequence_length", "hidden_units"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} applies to text models only. "
                                 f"Received: model={args.model!r}")
        return None
    if (getattr(args, "augment", False) or getattr(args, "mixed_precision", False)
            or getattr(args, "time_budget", None) is not None
            or getattr(args, "init_weights", None) is not None):
        raise ValueError("--augment, --mixed-precision, --time-budget and --init-weights "
                         "apply to image models only. "
                         f"Received: model={args.model!r}, dataset={args.dataset!r}")
    try:
        summary = train_text(
            model=args.model, dataset=args.dataset, data=args.data, out=args.out,
            distribute=args.distribute, limit=args.limit, seed=args.seed, verbose=args.verbose,
            overwrite=args.overwrite, evaluate_test=args.evaluate_test, command=command,
            sequence_length=args.sequence_length or SEQUENCE_LENGTH,
            hidden_units=args.hidden_units, **overrides,
        )
    except LossDivergedError as e:
        print(f"keras-newton train: error: {e}", file=sys.stderr)
        return 1
    test = summary["test_accuracy"]
    print(f"best validation accuracy {summary['best_val_accuracy']:.4f} at epoch "
          f"{summary['best_epoch']}/{summary['epochs']}"
          + (f", test accuracy {test:.4f}" if test is not None else "")
          + f"; {summary['seconds_per_epoch']:.1f} s/epoch")
    return 0

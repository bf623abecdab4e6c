"""``keras-newton zoo``: list, add a training run to the registry, regenerate model cards,
snapshot a run's light state (to commit it, or to bring it back from another machine)."""

HELP = ("Pretrained weights: list entries, add a finished training run, write model cards, "
        "snapshot a run in progress.")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="print the registry")
    sub.add_parser("cards", help="regenerate zoo/*.md from the registry")
    add = sub.add_parser("add", help="register the best weights of a `keras-newton train` run")
    add.add_argument("--run", required=True, help="the run's --out folder")
    add.add_argument("--tag", required=True, help="e.g. cifar10")
    add.add_argument("--dataset-label", default="CIFAR-10 (JPEG-75 re-encoding)")
    add.add_argument("--commit", help="commit the run started at (default: HEAD)")
    add.add_argument("--data", help="the run's training source, where it is now (checked by "
                                    "content; needed when its config.json names the source "
                                    "by file name, as runs do since 2026-12-03)")
    add.add_argument("--notes", default="")
    snap = sub.add_parser(
        "snapshot", help="copy a run's light state (last weights without the optimizer's "
                         "momentum, schedule position, history, best weights, config) with "
                         "SHA256SUMS into a folder, e.g. zoo/in_progress/NAME, to commit it")
    snap.add_argument("--run", required=True, help="the run's --out folder")
    snap.add_argument("--to", required=True, help="the folder to write (light-state files in it "
                                                  "are replaced)")


def write_cards():
    from keras_newton import zoo

    for key in zoo.REGISTRY:
        (zoo.REPO_ZOO / f"{key}.md").write_text(zoo.model_card(key))


def golden_logits(arch, tag):
    """First 10 logits of the seeded input used by tests/test_zoo.py."""
    import keras
    import numpy as np

    from keras_newton import models, zoo

    classes = zoo.get_entry(arch, tag)["classes"]
    model = models.get_model(arch, weights=tag, classes=classes, classifier_activation=None)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    return [round(float(v), 6) for v in keras.ops.convert_to_numpy(model(x)).ravel()[:10]]


def _legs_text(legs, epochs, seconds=None):
    """The calls of a run that changed machine or resumed without momentum, in words, with
    the median epoch time of each kind when ``seconds`` (per epoch) is given; '' for a run
    of one kind of call that never resumed from a light state."""
    import statistics

    kept = []
    for leg in legs:  # a call killed before its first epoch was run again
        if kept and kept[-1]["first_epoch"] == leg["first_epoch"]:
            kept.pop()
        kept.append(leg)

    def kind(leg):
        return (f"{leg['backend']} {'bf16' if leg['mixed_precision'] else 'float32'} on "
                f"{leg['device']}" + (", data on the device" if leg.get("on_device") else ""))

    light = [leg["first_epoch"] for leg in kept if leg["resumed_from"] == "light"]
    if len({kind(leg) for leg in kept}) <= 1 and not light:
        return ""
    spans = []
    for i, leg in enumerate(kept):
        last = kept[i + 1]["first_epoch"] - 1 if i + 1 < len(kept) else epochs
        if spans and spans[-1][0] == kind(leg):
            spans[-1][2] = last
        else:
            spans.append([kind(leg), leg["first_epoch"], last])
    def span(k, a, b):
        if not seconds or len(seconds) < b:
            return f"{k} (epochs {a}-{b})"
        median = statistics.median(seconds[a - 1:b])
        return f"{k} (epochs {a}-{b}, median {median:.1f} s per epoch)"

    text = "; ".join(span(*s) for s in spans)
    if light:
        text += ("; resumed at epoch" + ("s " if len(light) > 1 else " ")
                 + ", ".join(map(str, light)) + " from the last epoch's weights and schedule "
                 "position without the optimizer's momentum (SGD rebuilt it from zero)")
    return text


def _trained_with(summary, data=None, init=None):
    """E.g. 'jax, bf16 mixed precision, time budget 310 s (12.3 s per epoch)', or the legs
    of a run trained across machines (`_legs_text`), then the data source by name and
    sha256, then the warm start (``init``: config.json's ``init_weights``)."""
    parts = [summary.get("backend", "tensorflow"),
             "bf16 mixed precision" if summary.get("mixed_precision") else "float32"]
    if summary.get("time_budget"):
        parts.append(f"time budget {summary['time_budget']:g} s")
    seconds = summary.get("epoch_seconds")
    legs = _legs_text(summary.get("legs") or [], summary["epochs"], seconds)
    if legs:  # an average over machines would mean nothing: the legs' medians, the total
        text = legs + (f"; {sum(seconds) / 3600:.1f} h of epochs in all" if seconds else "")
    else:
        text = ", ".join(parts) + f" ({summary['seconds_per_epoch']:.1f} s per epoch)"
    if data:
        text += "; data " + ", ".join(f"{k} `{v}`" for k, v in data.items())
    if init:
        text += (f"; initialised from {init.get('zoo') or init['file']} "
                 f"(sha256 {init['sha256'][:12]})")
    return text


def portable_data(data, repo=None):
    """The ``--data`` of a recorded command: the source's path relative to the repository
    when it lies beside it (``../shared/datasets/...``), else ``PATH/<file name>``."""
    import os
    from pathlib import Path

    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    source = Path(data).resolve()
    if source.is_relative_to(repo.parent):
        return os.path.relpath(source, repo)
    return f"PATH/{source.name}"


def data_record(config):
    """``{"file", "sha256"}`` (``"fingerprint"`` for a folder) of the run's source."""
    kind, _, digest = (config.get("data_key") or "").partition("-")
    name = (config.get("data") or "").replace("\\", "/").rsplit("/", 1)[-1] or None
    return {"file": name, "sha256" if kind == "sha256" else "fingerprint": digest}


def _run_source(config, data):
    """The run's local source: ``data`` (it must hold the same content) or the config's
    path (runs from before 2026-12-03 recorded one; later ones its file name only)."""
    from pathlib import Path

    from keras_newton.data.image_folder import check_source, source_key

    if data is None:
        if config.get("data") and Path(config["data"]).is_absolute():
            return config["data"]
        record = data_record(config)
        raise ValueError(
            "Pass --data, the run's source: its config.json names it by file name and "
            "content only (" + ", ".join(f"{k} {v}" for k, v in record.items())
            + "). Received: data=None")
    data = check_source(data)
    if config.get("data_key") and source_key(data) != config["data_key"]:
        raise ValueError(f"`--data` is not the source this run was trained on (its content "
                         f"differs from {config['data']!r}). Received: data={str(data)!r}")
    return str(data)


def _warm_start(init):
    """The registry's record of the zoo weights a warm-started run began from (its epochs,
    accuracy and recipe, which the new entry keeps: registering may replace them), or None
    (no warm start, a file, or an entry that now holds other weights)."""
    from keras_newton import zoo

    prior = zoo.REGISTRY.get(init["zoo"]) if init and "zoo" in init else None
    if prior is None or prior["sha256"] != init["sha256"]:
        return None
    return {"zoo": init["zoo"], "sha256": init["sha256"], "epochs": prior["epochs"],
            "val_top1": prior["metrics"]["val_top1"], "recipe": prior["recipe"]}


def add(args):
    import datetime
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from keras_newton import models, zoo
    from keras_newton.commands.evaluate import evaluate_model, load_split
    from keras_newton.data import load_dataset
    from keras_newton.files import read_json
    from keras_newton.training.cli import command_from_config
    from keras_newton.training.light_state import LAST_WEIGHTS

    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"`--run` must be the --out folder of a `keras-newton train` run. "
                         f"Received: run={args.run!r}")
    config = read_json(run / "config.json", "run's config")
    summary = read_json(run / "summary.json", "run's summary")
    prep = read_json(run / "preprocessing.json", "run's preprocessing card")
    arch = models.canonical_name(config["model"])
    key = f"{arch}.{args.tag}"
    zoo.REPO_ZOO.mkdir(exist_ok=True)
    target = zoo.REPO_ZOO / f"{key}.weights.h5"
    best = run / "best.weights.h5"
    if not best.exists() and (run / LAST_WEIGHTS).exists():
        best = run / LAST_WEIGHTS  # a light state leaves them out when best = last epoch
    try:
        zoo.strip_optimizer(best, target)
    except OSError as e:  # h5py: missing, truncated or not HDF5
        raise ValueError(f"Could not read the run's weights {str(best)!r} ({e}); expected the "
                         "`.weights.h5` file `keras-newton train` writes.") from e
    for name, suffix in (("history.csv", "history.csv"), ("curves.png", "curves.png")):
        shutil.copyfile(run / name, zoo.REPO_ZOO / f"{key}.{suffix}")
    data = _run_source(config, args.data)
    images, labels, class_names = load_split(config["dataset"], data, "val",
                                             config["val_size"], config["seed"])
    n_train = len(load_dataset(config["dataset"], data, "train")) - len(labels)
    metrics = evaluate_model(arch, str(target), images, labels, prep, len(class_names))
    warm_start = _warm_start(config.get("init_weights"))
    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    zoo.REGISTRY[key] = {
        "file": target.name,
        "sha256": zoo.file_sha256(target),
        "num_params": models.get_model(arch, classes=len(class_names)).count_params(),
        "classes": len(class_names),
        "dataset": args.dataset_label,
        "split": f"{n_train} train / {len(labels)} validation images: a seeded "
                 f"(seed {config['seed']}), class-balanced hold-out of the training split",
        "metrics": {"val_top1": round(metrics["top1"], 4),
                    "val_images": metrics["num_images"],
                    "val_per_class": dict(zip(class_names, metrics["per_class_accuracy"],
                                              strict=True))},
        "eval": {"split": "val", "val_size": config["val_size"], "seed": config["seed"]},
        # Trained (a time budget may stop before --epochs), with a warm start's own.
        "epochs": summary["epochs"] + (warm_start["epochs"] if warm_start else 0),
        "recipe": {"command": command_from_config(config, portable_data(data),
                                                  out=f"runs/{run.resolve().name}"),
                   "data": data_record(config), "commit": commit,
                   "trained_with": _trained_with(summary, data_record(config),
                                                 config.get("init_weights")),
                   "notes": args.notes,
                   **({"warm_start": warm_start} if warm_start else {})},
        "preprocessing": {"mean": prep["mean"], "std": prep["std"]},
        "class_names": class_names,
        "date": datetime.date.today().isoformat(),
        "license": "Apache-2.0",
        "paper": zoo.PAPER,
    }
    zoo.REGISTRY_FILE.write_text(json.dumps(zoo.REGISTRY, indent=1) + "\n")
    golden_file = zoo.REPO_ZOO / "golden.json"
    golden = json.loads(golden_file.read_text()) if golden_file.exists() else {}
    golden[key] = golden_logits(arch, args.tag)
    golden_file.write_text(json.dumps(golden, indent=1) + "\n")
    write_cards()
    print(f"registered {key}: val top-1 {100 * metrics['top1']:.2f}% "
          f"({metrics['num_images']} images), sha256 {zoo.REGISTRY[key]['sha256'][:12]}...")
    return 0


def snapshot(args):
    from pathlib import Path

    from keras_newton.training.light_state import read_state
    from keras_newton.training.light_state import snapshot as write_snapshot

    names = write_snapshot(args.run, args.to)
    state = read_state(args.to)
    to = Path(args.to)
    print(f"light state of {args.run} after epoch {state['epochs_done']} (step "
          f"{state['iterations']}) written to {to}:")
    for name in names:
        print(f"  {name:20s} {(to / name).stat().st_size / 1e6:8.2f} MB")
    print(f"check it with (cd {to} && sha256sum -c {names[-1]}); `keras-newton train --resume "
          f"--out <a copy of it> --data ...` continues the run")
    return 0


def run(args):
    from keras_newton import zoo

    if args.action == "add":
        return add(args)
    if args.action == "snapshot":
        return snapshot(args)
    if args.action == "cards":
        write_cards()
        print(f"wrote {len(zoo.REGISTRY)} cards to {zoo.REPO_ZOO}")
        return 0
    for key, e in sorted(zoo.REGISTRY.items()):
        print(f"{key:28s} val top-1 {100 * e['metrics']['val_top1']:.2f}%  {e['epochs']} epochs"
              f"  {e['dataset']}  {e['file']}")
    return 0

"""``keras-newton zoo``: list, add a training run to the registry, regenerate model cards."""

HELP = "Pretrained weights: list entries, add a finished training run, write model cards."


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="print the registry")
    sub.add_parser("cards", help="regenerate zoo/*.md from the registry")
    add = sub.add_parser("add", help="register the best weights of a `keras-newton train` run")
    add.add_argument("--run", required=True, help="the run's --out folder")
    add.add_argument("--tag", required=True, help="e.g. cifar10")
    add.add_argument("--dataset-label", default="CIFAR-10 (JPEG-75 re-encoding)")
    add.add_argument("--commit", help="commit the run started at (default: HEAD)")
    add.add_argument("--data", help="the run's training source, where it is now (default: "
                                    "the path in its config.json; checked by content)")
    add.add_argument("--notes", default="")


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


def _trained_with(summary):
    """E.g. 'jax, bf16 mixed precision, time budget 310 s (12.3 s per epoch)'."""
    parts = [summary.get("backend", "tensorflow"),
             "bf16 mixed precision" if summary.get("mixed_precision") else "float32"]
    if summary.get("time_budget"):
        parts.append(f"time budget {summary['time_budget']:g} s")
    return ", ".join(parts) + f" ({summary['seconds_per_epoch']:.1f} s per epoch)"


def _run_source(config, data):
    """The run's local source: ``data`` (it must hold the same content) or the config's."""
    from keras_newton.data.image_folder import check_source, source_key

    if data is None:
        return config["data"]
    data = check_source(data)
    if config.get("data_key") and source_key(data) != config["data_key"]:
        raise ValueError(f"`--data` is not the source this run was trained on (its content "
                         f"differs from {config['data']!r}). Received: data={str(data)!r}")
    return str(data)


def add(args):
    import datetime
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from keras_newton import models, zoo
    from keras_newton.commands.evaluate import evaluate_model, load_split
    from keras_newton.data import load_dataset

    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    prep = json.loads((run / "preprocessing.json").read_text())
    arch = models.canonical_name(config["model"])
    key = f"{arch}.{args.tag}"
    zoo.REPO_ZOO.mkdir(exist_ok=True)
    target = zoo.REPO_ZOO / f"{key}.weights.h5"
    zoo.strip_optimizer(run / "best.weights.h5", target)
    for name, suffix in (("history.csv", "history.csv"), ("curves.png", "curves.png")):
        shutil.copyfile(run / name, zoo.REPO_ZOO / f"{key}.{suffix}")
    data = _run_source(config, args.data)
    images, labels, class_names = load_split(config["dataset"], data, "val",
                                             config["val_size"], config["seed"])
    n_train = len(load_dataset(config["dataset"], data, "train")) - len(labels)
    metrics = evaluate_model(arch, str(target), images, labels, prep, len(class_names))
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
        "epochs": summary["epochs"],  # trained; a time budget may stop before --epochs
        "recipe": {"command": summary.get("command") or "", "commit": commit,
                   "trained_with": _trained_with(summary), "notes": args.notes},
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


def run(args):
    from keras_newton import zoo

    if args.action == "add":
        return add(args)
    if args.action == "cards":
        write_cards()
        print(f"wrote {len(zoo.REGISTRY)} cards to {zoo.REPO_ZOO}")
        return 0
    for key, e in sorted(zoo.REGISTRY.items()):
        print(f"{key:28s} val top-1 {100 * e['metrics']['val_top1']:.2f}%  {e['epochs']} epochs"
              f"  {e['dataset']}  {e['file']}")
    return 0

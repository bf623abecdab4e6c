"""``keras-newton evaluate``: top-1, per-class accuracy and a confusion matrix PNG."""

HELP = "Evaluate a model (pretrained tag or weights file) on a dataset split."


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="registered model, e.g. newton_cgnet10")
    parser.add_argument("--weights", required=True, help="pretrained tag or .weights.h5 path")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data", help="local folder/archive (offline); default: tfds")
    parser.add_argument("--split", default="val",
                        help="'val' (the seeded hold-out of the training split) or a split name")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    parser.add_argument("--preprocessing",
                        help="JSON with mean/std (default: the tag's, or preprocessing.json "
                             "next to the weights file)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", help="folder for metrics.json and confusion.png")


def load_split(dataset, data, split, val_size, seed):
    """``(images, labels, class_names)`` of ``split``; 'val' is the training hold-out."""
    from keras_newton.data import holdout_split, load_dataset

    if split != "val":
        d = load_dataset(dataset, data, split)
        return d.images, d.labels, d.class_names
    d = load_dataset(dataset, data, "train")
    _, val_idx = holdout_split(d.labels, val_size, seed)
    return d.images[val_idx], d.labels[val_idx], d.class_names


def preprocessing_for(model, weights, path=None):
    """The mean/std dict that belongs to ``weights`` (a tag or a file)."""
    import json
    import os
    from pathlib import Path

    from keras_newton import models, zoo

    if path:
        return json.loads(Path(path).read_text())
    if not os.path.exists(weights):
        return zoo.get_entry(models.canonical_name(model), weights)["preprocessing"]
    beside = Path(weights).with_name("preprocessing.json")
    if beside.exists():
        return json.loads(beside.read_text())
    raise ValueError(
        "No preprocessing for this weights file: pass --preprocessing JSON (mean/std). "
        f"Received: weights={weights!r}"
    )


def evaluate_model(model, weights, images, labels, preprocessing, classes, batch_size=250):
    """Returns metrics (top1, per-class accuracy, confusion matrix) of ``weights``."""
    import numpy as np

    from keras_newton import models

    net = models.get_model(model, weights=weights, classes=classes)
    mean = np.asarray(preprocessing["mean"], "float32")
    std = np.asarray(preprocessing["std"], "float32")
    preds = []
    for start in range(0, len(images), batch_size):
        x = (images[start:start + batch_size].astype("float32") - mean) / std
        preds.append(np.asarray(net.predict_on_batch(x)).argmax(axis=1))
    preds = np.concatenate(preds)
    k = net.output_shape[-1]
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, preds), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {"top1": float((preds == labels).mean()), "num_images": int(len(labels)),
            "per_class_accuracy": per_class.round(4).tolist(), "confusion": confusion.tolist()}


def plot_confusion(confusion, class_names, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > confusion.max() / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    import json
    from pathlib import Path

    prep = preprocessing_for(args.model, args.weights, args.preprocessing)
    images, labels, class_names = load_split(args.dataset, args.data, args.split,
                                             args.val_size, args.seed)
    metrics = evaluate_model(args.model, args.weights, images, labels, prep, len(class_names),
                             args.batch_size)
    print(f"{args.model} weights={args.weights} {args.dataset}/{args.split}: "
          f"top-1 {100 * metrics['top1']:.2f}% on {metrics['num_images']} images")
    for name, acc in zip(class_names, metrics["per_class_accuracy"], strict=True):
        print(f"  {name:12s} {100 * acc:6.2f}%")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot_confusion(metrics["confusion"], class_names, out / "confusion.png",
                       f"{args.model} ({args.weights}) on {args.dataset}/{args.split}")
        print(f"wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0

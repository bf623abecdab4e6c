"""``keras-newton evaluate``: top-1, per-class accuracy and a confusion matrix PNG.

``--onnx FILE`` evaluates an exported ONNX file (fp32 or int8) with ONNX Runtime and its
sidecar's preprocessing, without Keras or TensorFlow (with ``--data``; the default tfds
source needs TensorFlow).
"""

HELP = ("Evaluate a model (pretrained tag or weights file), or an exported ONNX file "
        "(--onnx), on a dataset split.")


def add_arguments(parser):
    parser.add_argument("--model", help="registered model, e.g. newton_cgnet10 (not with --onnx)")
    parser.add_argument("--weights", help="pretrained tag or .weights.h5 path (not with --onnx)")
    parser.add_argument("--onnx",
                        help="an exported .onnx file (fp32 or int8, sidecar next to it) or a "
                             "zoo key (newton_cgnet10.cifar10, newton_cgnet10.cifar10.int8), "
                             "run with ONNX Runtime instead of --model/--weights")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (--onnx)")
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
    """The mean/std dict that belongs to ``weights`` (a tag or a file): the registry
    entry's (a tag, or a file with an entry's sha256), else ``preprocessing.json`` next to
    the file; ``path`` (a JSON file) overrides both."""
    from keras_newton import models, zoo
    from keras_newton.files import read_json

    if path:
        return read_json(path, "--preprocessing file")
    card = zoo.weights_card(zoo.resolve_weights(models.canonical_name(model), weights))
    if card is None:
        raise ValueError(
            "No preprocessing for this weights file (no registry entry with its sha256, no "
            f"preprocessing.json next to it): pass --preprocessing JSON (mean/std). "
            f"Received: weights={weights!r}"
        )
    return card["preprocessing"]


def evaluate_model(model, weights, images, labels, preprocessing, classes, batch_size=250):
    """Returns metrics (top1, per-class accuracy, confusion matrix) of ``weights``."""
    import numpy as np

    from keras_newton import models
    from keras_newton.preprocessing import normalize

    net = models.get_model(model, weights=weights, classes=classes)
    preds = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size], preprocessing["mean"],
                      preprocessing["std"], "channels_last")
        preds.append(np.asarray(net.predict_on_batch(x)).argmax(axis=1))
    return metrics(np.concatenate(preds), labels, net.output_shape[-1])


def metrics(preds, labels, k):
    """top1, per-class accuracy and confusion matrix of predicted class indices."""
    import numpy as np

    preds, labels = np.asarray(preds), np.asarray(labels)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, preds), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {"top1": float((preds == labels).mean()), "num_images": int(len(labels)),
            "per_class_accuracy": per_class.round(4).tolist(), "confusion": confusion.tolist()}


def evaluate_onnx(classifier, images, labels, batch_size=250):
    """`metrics` of an `OnnxClassifier` on uint8 ``images`` (its sidecar's preprocessing)."""
    import numpy as np

    preds = [classifier.run(classifier.preprocess(images[start:start + batch_size])).argmax(1)
             for start in range(0, len(images), batch_size)]
    return metrics(np.concatenate(preds), labels, int(classifier.session.get_outputs()[0]
                                                      .shape[-1]))


def _run_onnx(args):
    """``--onnx``: ONNX Runtime on the split; the metrics name the file (and its quantization)."""
    from pathlib import Path

    from keras_newton.export.runtime import OnnxClassifier, is_zoo_key

    if args.model or args.weights or args.preprocessing:
        raise ValueError("--onnx takes its model and preprocessing from the file's sidecar: "
                         "leave out --model, --weights and --preprocessing. Received: "
                         f"model={args.model!r}, weights={args.weights!r}, "
                         f"preprocessing={args.preprocessing!r}")
    classifier = (OnnxClassifier.from_zoo(args.onnx, threads=args.threads)
                  if is_zoo_key(args.onnx) else OnnxClassifier(args.onnx, threads=args.threads))
    card = classifier.metadata or {}
    images, labels, class_names = load_split(args.dataset, args.data, args.split,
                                             args.val_size, args.seed)
    if classifier.class_names and list(classifier.class_names) != list(class_names):
        raise ValueError(f"The file's classes {classifier.class_names} are not the dataset's "
                         f"{class_names}. Received: onnx={args.onnx!r}, data={args.data!r}")
    result = evaluate_onnx(classifier, images, labels, args.batch_size)
    quant = card.get("quantization")
    result = {"onnx": str(classifier.path), "model": card.get("model"),
              "weights_sha256": (card.get("weights") or {}).get("sha256"),
              "quantization": quant["dtype"] if quant else None, **result}
    kind = f"{quant['dtype']} ONNX" if quant else "ONNX"
    return result, class_names, f"{Path(args.onnx).name} ({kind}, ONNX Runtime)"


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

    if args.onnx:
        result, class_names, what = _run_onnx(args)
    else:
        if not (args.model and args.weights):
            raise ValueError("Give --model and --weights, or --onnx FILE. Received: "
                             f"model={args.model!r}, weights={args.weights!r}")
        prep = preprocessing_for(args.model, args.weights, args.preprocessing)
        images, labels, class_names = load_split(args.dataset, args.data, args.split,
                                                 args.val_size, args.seed)
        result = evaluate_model(args.model, args.weights, images, labels, prep,
                                len(class_names), args.batch_size)
        what = f"{args.model} weights={args.weights}"
    print(f"{what} {args.dataset}/{args.split}: "
          f"top-1 {100 * result['top1']:.2f}% on {result['num_images']} images")
    for name, acc in zip(class_names, result["per_class_accuracy"], strict=True):
        print(f"  {name:12s} {100 * acc:6.2f}%")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        plot_confusion(result["confusion"], class_names, out / "confusion.png",
                       f"{what} on {args.dataset}/{args.split}")
        print(f"wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0

"""``keras-newton demo``: every pretrained zoo model on the sample images of the package.

For each entry of the weights registry (``keras_newton/zoo_registry.json``) the demo
classifies the ten sample images in Keras and prints their top-3, exports the model to
ONNX (`keras_newton.export.export_model`, into the output folder), runs the file in
ONNX Runtime on the same images, and prints the parity (max abs logit difference, top-1
agreement) and the images/s of both. ``demo.png`` shows the images with the predictions.

The samples (``keras_newton/samples/<class>.jpg``, one per CIFAR-10 class) are the
unchanged JPEG files of validation images: the seeded hold-out (5,000 images, seed 0)
on which the zoo's CIFAR-10 weights were selected and never trained. ``samples.json``
names their archive members; `write_samples` regenerates them from the archive.
"""

import json
from pathlib import Path

HELP = ("Classify the packaged sample images with every pretrained model, in Keras and "
        "exported to ONNX Runtime (parity, images/s); writes demo.png.")
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"
SAMPLES_JSON = "samples.json"


def add_arguments(parser):
    parser.add_argument("--out", default="demo",
                        help="output folder: demo.png and one ONNX export per model "
                             "(default demo/)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="batch of the images/s measurement: the samples repeated "
                             "(default 256)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per engine after one warm-up; the median counts "
                             "(default 5)")


def write_samples(archive, folder=SAMPLES_DIR, val_size=5000, seed=0):
    """Copies one held-out image per class of a ``train/<class>/<image>`` archive.

    The images are indexed in name order, as the offline loader and `keras-newton train`
    index them, and split with ``keras_newton.data.holdout_split(labels, val_size, seed)``
    (the zoo's CIFAR-10 weights: 5,000 images, seed 0). Of each class the first
    validation image in name order is copied byte for byte to ``folder/<class><suffix>``;
    ``folder/samples.json`` records the archive members, the split and the sha256s.

    Example: ``write_samples("../shared/datasets/cifar10-jpeg/train.tar.xz")``.

    Returns:
        The ``samples.json`` dict.
    """
    import tarfile
    from pathlib import PurePosixPath

    import numpy as np

    from keras_newton.data import holdout_split
    from keras_newton.data.image_folder import IMAGE_EXTENSIONS, file_sha256

    data = {}
    with tarfile.open(archive, "r|*") as tar:  # streamed, nothing extracted
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if (member.isfile() and len(parts) == 3 and parts[0] == "train"
                    and not parts[2].startswith(".")
                    and parts[2].lower().endswith(IMAGE_EXTENSIONS)):
                data[member.name] = tar.extractfile(member).read()
    if not data:
        raise ValueError("No train/<class>/<image> files in the archive. "
                         f"Received: archive={str(archive)!r}")
    names = sorted(data)
    class_of = [PurePosixPath(n).parts[1] for n in names]
    class_names = sorted(set(class_of))
    labels = np.array([class_names.index(c) for c in class_of])
    _, val_idx = holdout_split(labels, val_size, seed)
    first = {}
    for i in val_idx:  # sorted, so the first of each class in name order
        first.setdefault(int(labels[i]), int(i))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for label, i in sorted(first.items()):
        file = class_names[label] + PurePosixPath(names[i]).suffix.lower()
        (folder / file).write_bytes(data[names[i]])
        samples.append({"file": file, "class": class_names[label], "label": label,
                        "member": names[i], "index": i, "sha256": file_sha256(folder / file)})
    manifest = {
        "about": ("One image per class, the first in name order of each class among the "
                  "validation images of keras_newton.data.holdout_split(labels, val_size, "
                  "seed) over the archive's training images (the split the zoo's CIFAR-10 "
                  "weights were selected on, never trained on); JPEG bytes unchanged. "
                  "Regenerate: python -c \"from keras_newton.commands.demo import "
                  "write_samples; write_samples('ARCHIVE')\""),
        "dataset": "CIFAR-10 (JPEG-75 re-encoding), training split",
        "archive": Path(archive).name,
        "archive_sha256": file_sha256(archive),
        "val_size": val_size,
        "seed": seed,
        "class_names": class_names,
        "samples": samples,
    }
    (folder / SAMPLES_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_samples(folder=SAMPLES_DIR):
    """``(images uint8 [N, H, W, 3], manifest)`` of the packaged samples."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    manifest = json.loads((folder / SAMPLES_JSON).read_text())
    images = []
    for sample in manifest["samples"]:
        with Image.open(folder / sample["file"]) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return np.stack(images), manifest


def images_per_second(fn, x, repeats):
    """``len(x)`` over the median time of ``repeats`` calls of ``fn(x)``, after a warm-up."""
    import time

    import numpy as np

    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


def _softmax(logits):
    import numpy as np

    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _marks():
    """(right, wrong) marks the terminal can print."""
    import sys

    try:
        "\u2713\u2717".encode(getattr(sys.stdout, "encoding", None) or "ascii")
        return "\u2713", "\u2717"
    except (UnicodeEncodeError, LookupError):
        return "+", "x"


def run_entry(key, images, manifest, out, batch_size, repeats):
    """Classifies ``images`` with the zoo entry ``key`` (Keras, then ONNX Runtime).

    Prints the top-3 of every image, the ONNX Runtime parity and images/s; returns
    ``{"key", "top3", "truth", "right", "parity"}`` for the picture, or None when the
    entry's classes are not those of the samples.
    """
    import keras
    import numpy as np

    import keras_newton as kn
    from keras_newton import models, zoo

    arch, tag = key.split(".", 1)
    entry = zoo.REGISTRY[key]
    if list(entry["class_names"]) != list(manifest["class_names"]):
        print(f"{key}: skipped (its classes are not the samples' {manifest['dataset']})")
        return None
    right_mark, wrong_mark = _marks()
    model = models.get_model(arch, weights=tag, classifier_activation=None)  # logits
    x = kn.preprocess_input(images, weights=key)  # the mean/std stored with the weights
    logits = np.asarray(model.predict_on_batch(x))
    top3 = kn.decode_predictions(_softmax(logits), top=3, weights=key)
    truth = [s["class"] for s in manifest["samples"]]
    held_out = entry.get("eval", {}) == {"split": "val", "val_size": manifest["val_size"],
                                         "seed": manifest["seed"]}
    val = entry["metrics"].get("val_top1")
    print(f"{key}: {model.count_params():,} parameters"
          + (f", validation top-1 {100 * val:.2f}%" if val is not None else ""))
    print("  sample        top-3 (Keras, " + ("held-out images" if held_out else
                                               "images possibly seen in training") + ")")
    for true, row in zip(truth, top3, strict=True):
        mark = right_mark if row[0][1] == true else wrong_mark
        print(f"  {mark} {true:<11s} -> " + ", ".join(f"{name} {p:.3f}" for _, name, p in row))
    right = sum(row[0][1] == true for true, row in zip(truth, top3, strict=True))
    print(f"  {right} of {len(truth)} right")

    batch = np.resize(x, (batch_size, *x.shape[1:]))  # the samples, repeated
    keras_speed = images_per_second(model.predict_on_batch, batch, repeats)
    result = {"key": key, "top3": top3, "truth": truth, "right": right, "parity": None}
    if keras.backend.backend() != "tensorflow":
        print(f"  ONNX Runtime: skipped (the export needs the TensorFlow backend; this is "
              f"{keras.backend.backend()})")
        print(f"  images/s (batch {batch_size}): Keras {keras_speed:,.0f}")
        return result

    from keras_newton.export import OnnxClassifier, export_model, parity

    folder = Path(out) / key
    export_model(arch, tag, folder, format="onnx", overwrite=True, parity_images=images,
                 parity_source=f"the {len(images)} demo samples")
    session = OnnxClassifier(folder / "model.onnx")
    ort_logits = session.run(session.preprocess(images))
    check = parity(logits, ort_logits)
    agree = len(images) - check["top1_mismatches"]
    print(f"  ONNX Runtime ({folder / 'model.onnx'}): max |logit diff| "
          f"{check['max_abs_logit_diff']:.1e} vs Keras, top-1 agreement {agree}/{len(images)}")
    ort_speed = images_per_second(session.run, batch, repeats)
    print(f"  images/s (batch {batch_size}, median of {repeats}): Keras {keras_speed:,.0f}, "
          f"ONNX Runtime {ort_speed:,.0f} ({ort_speed / keras_speed:.1f}x)")
    result["parity"] = check
    return result


def plot_predictions(images, results, path):
    """A grid of the samples with each model's top-1 (green right, red wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    right_mark, wrong_mark = "\u2713", "\u2717"  # DejaVu Sans has both
    cols = 5
    rows = -(-len(images) // cols)
    fig = plt.figure(figsize=(2.1 * cols, (2.5 * rows + 0.4) * len(results)),
                     layout="constrained")
    for subfig, result in zip(np.atleast_1d(fig.subfigures(len(results), 1)), results,
                              strict=True):
        subfig.suptitle(f"{result['key']}: {result['right']} of {len(images)} right "
                        "(top-1 and its probability)", fontsize=12, fontweight="bold")
        for i, ax in enumerate(subfig.subplots(rows, cols, squeeze=False).flat):
            ax.axis("off")
            if i >= len(images):
                continue
            ax.imshow(images[i], interpolation="nearest")
            _, name, p = result["top3"][i][0]
            ok = name == result["truth"][i]
            ax.set_title(f"{right_mark if ok else wrong_mark} {name} {p:.2f}\n"
                         f"true: {result['truth'][i]}", fontsize=11,
                         color="#1a7f37" if ok else "#cf222e")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args):
    import time

    start = time.perf_counter()
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError("`batch_size` and `repeats` must be >= 1. Received: "
                         f"batch_size={args.batch_size}, repeats={args.repeats}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out` must be a folder. Received: out={str(out)!r}")
    from keras_newton import zoo

    images, manifest = load_samples()
    keys = zoo.available()
    print(f"{len(images)} sample images ({SAMPLES_DIR}), one per class: validation images "
          f"of {manifest['dataset']} (hold-out of {manifest['val_size']:,}, seed "
          f"{manifest['seed']})")
    print(f"{len(keys)} pretrained model(s) in the zoo: {', '.join(keys) or 'none'}\n")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for key in keys:
        result = run_entry(key, images, manifest, out, args.batch_size, args.repeats)
        if result is not None:
            results.append(result)
        print()
    if results:
        path = plot_predictions(images, results, out / "demo.png")
        print(f"picture: {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0

"""Pretrained weights: one registry keyed ``arch.tag``, hash-checked loading, model cards.

``REGISTRY`` is plain data. Weights files are looked up, in order, in
``$KERAS_NEWTON_ZOO``, the repository's ``zoo/`` folder,
``<sys.prefix>/share/keras-newton/zoo`` (where a wheel installs them) and
``$KERAS_NEWTON_HOME/models`` (default ``$KERAS_HOME/keras_newton/models``, i.e.
``~/.keras/keras_newton/models``); an entry with
a ``url`` is downloaded there with ``keras.utils.get_file``. The sha256 is checked
before every load.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

from keras_newton.data.datasets import CIFAR10_CLASSES
from keras_newton.data.image_folder import file_sha256, keras_newton_home

PAPER = ("Shen et al., Newton design: designing CNNs with the family of Newton's methods, "
         "Sci China Inf Sci 66(6):162101, 2023")
REPO_ZOO = Path(__file__).resolve().parents[1] / "zoo"
INSTALLED_ZOO = Path(sys.prefix) / "share" / "keras-newton" / "zoo"  # setup.cfg data_files
REGISTRY_FILE = Path(__file__).with_name("zoo_registry.json")

# Filled from zoo_registry.json (written by `keras-newton zoo add`, never by hand).
REGISTRY = json.loads(REGISTRY_FILE.read_text()) if REGISTRY_FILE.exists() else {}
REQUIRED_FIELDS = ("file", "sha256", "num_params", "classes", "dataset", "split", "metrics",
                   "epochs", "recipe", "preprocessing", "class_names", "date", "license",
                   "paper")


def available(arch=None):
    """Registered ``arch.tag`` keys, optionally only those of ``arch``."""
    return sorted(k for k in REGISTRY if arch is None or k.split(".", 1)[0] == arch)


def get_entry(arch, tag):
    """The registry entry of ``arch.tag``; ValueError listing the available tags otherwise."""
    key = f"{arch}.{tag}"
    if key not in REGISTRY:
        tags = [k.split(".", 1)[1] for k in available(arch)]
        raise ValueError(
            f"No pretrained weights {key!r}. Available for {arch}: {tags or 'none'}; all "
            f"entries: {available()}. Received: weights={tag!r}"
        )
    return REGISTRY[key]


def verify(path, expected):
    """Raises a ValueError naming the file unless its sha256 is ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"Weights file {path} is corrupted or truncated: sha256 {actual}, expected "
            f"{expected}. Delete it and restore it from the repository's zoo/ folder "
            "(git checkout zoo/) or let keras-newton download it again."
        )
    return path


def weights_path(arch, tag):
    """Local, hash-verified path of the weights ``arch.tag``."""
    entry = get_entry(arch, tag)
    folders = [Path(p) for p in [os.environ.get("KERAS_NEWTON_ZOO")] if p]
    folders += [REPO_ZOO, INSTALLED_ZOO, keras_newton_home() / "models"]
    for folder in folders:
        candidate = folder / entry["file"]
        if candidate.exists():
            return verify(candidate, entry["sha256"])
    if entry.get("url"):
        import keras

        path = keras.utils.get_file(entry["file"], entry["url"], file_hash=entry["sha256"],
                                    cache_dir=str(keras_newton_home()), cache_subdir="models")
        return verify(path, entry["sha256"])
    raise ValueError(
        f"Weights file {entry['file']} of {arch}.{tag} not found in {[str(f) for f in folders]} "
        "and the entry has no download URL. Set KERAS_NEWTON_ZOO to the folder that holds it."
    )


def preprocess_input(x, arch="newton_cgnet10", tag="cifar10"):
    """Normalises uint8/float images in [0, 255] with the mean/std stored with the weights."""
    prep = get_entry(arch, tag)["preprocessing"]
    x = np.asarray(x, dtype="float32")
    return (x - np.asarray(prep["mean"], "float32")) / np.asarray(prep["std"], "float32")


def decode_predictions(preds, top=5, class_names=CIFAR10_CLASSES):
    """``[[(class_index, class_name, score), ...], ...]`` for each row of ``preds``."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != len(class_names):
        raise ValueError(
            f"`preds` must have shape (batch, {len(class_names)}). Received: "
            f"preds.shape={preds.shape}"
        )
    order = np.argsort(-preds, axis=1)[:, :top]
    return [[(int(i), class_names[i], float(p[i])) for i in row]
            for row, p in zip(order, preds, strict=True)]


def model_card(key):
    """Markdown model card generated from the registry entry ``key``."""
    e = REGISTRY[key]
    metrics = "\n".join(f"| {k} | {v} |" for k, v in e["metrics"].items())
    prep = e["preprocessing"]
    trained_with = (f"trained with {e['recipe']['trained_with']}. "
                    if "trained_with" in e["recipe"] else "")
    return f"""# {key}

Generated from `keras_newton/zoo_registry.json` by `keras-newton zoo cards`; do not edit.

| field | value |
|---|---|
| architecture | `{key.split('.')[0]}` ({e['num_params']:,} parameters) |
| weights file | `{e['file']}` |
| sha256 | `{e['sha256']}` |
| dataset | {e['dataset']} |
| split | {e['split']} |
| epochs | {e['epochs']} |
| date | {e['date']} |
| license | {e['license']} |
| paper | {e['paper']} |

## Metrics (as measured by `keras-newton evaluate`)

| metric | value |
|---|---|
{metrics}

## Preprocessing

`(image_uint8 - mean) / std` per channel (RGB), mean = {prep['mean']}, std = {prep['std']}.
Classes: {', '.join(e['class_names'])}.

## Recipe

```
{e['recipe']['command']}
```
commit `{e['recipe']['commit']}`; {trained_with}{e['recipe'].get('notes', '')}
"""


def strip_optimizer(src, dst):
    """Copies a ``.weights.h5`` file without the optimizer's state (momentum buffers).

    ``Model.save_weights`` on a compiled model also writes the optimizer's variables;
    released weights carry the layers alone (half the size, and nothing for an
    optimizer to load when a user fine-tunes).
    """
    import h5py

    with h5py.File(src, "r") as source, h5py.File(dst, "w") as target:
        for key in source:
            if key != "optimizer":
                source.copy(key, target)

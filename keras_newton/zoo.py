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

from keras_newton.data.datasets import CIFAR10_CLASSES
from keras_newton.data.image_folder import file_sha256, keras_newton_home
from keras_newton.files import read_json

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


def _entry_with_sha256(digest, arch=None):
    """The registry key whose file has sha256 ``digest`` (of ``arch`` if given), or None."""
    return next((k for k, e in REGISTRY.items() if e.get("sha256") == digest
                 and (arch is None or k.split(".", 1)[0] == arch)), None)


def resolve_weights(arch, weights):
    """Interprets a ``weights`` argument: the one place for builders, export and evaluate.

    In order: a registered tag of ``arch`` (``"cifar10"``, or the full key
    ``"newton_cgnet10.cifar10"``), then the path of an existing file. A file whose sha256
    is that of a registry entry is that entry: its classes, preprocessing and class names
    apply as for the tag.

    Args:
        arch: registry name of the model (``"newton_cgnet10"``), or None for any
            architecture (then tags must be full ``"arch.tag"`` keys).
        weights: a tag, a key, or a path (str or ``os.PathLike``).

    Returns:
        ``{"key", "tag", "path", "file", "sha256", "entry"}``: ``path`` is None for a tag
        (`weights_path` finds, downloads and checks it), ``key``/``tag``/``entry`` are None
        for a file of no registry entry.

    Raises:
        ValueError naming the available tags unless ``weights`` is one of them or an
        existing file.
    """
    if isinstance(weights, bool) or not isinstance(weights, str | os.PathLike) or not str(
            weights):
        raise ValueError(
            "`weights` must be None, a pretrained tag (see keras_newton.zoo.available()) or "
            f"the path of a `.weights.h5` file. Received: weights={weights!r}"
        )
    name = os.fspath(weights)
    key = name if arch is None or name.startswith(f"{arch}.") else f"{arch}.{name}"
    if isinstance(weights, str) and key in REGISTRY:
        entry = REGISTRY[key]
        return {"key": key, "tag": key.split(".", 1)[1], "path": None, "file": entry["file"],
                "sha256": entry["sha256"], "entry": entry}
    if os.path.exists(name):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"`weights` must be a file, not a folder. Received: weights={name!r}")
        digest = file_sha256(path)
        key = _entry_with_sha256(digest, arch)
        return {"key": key, "tag": key and key.split(".", 1)[1], "path": str(path),
                "file": path.name, "sha256": digest, "entry": REGISTRY.get(key)}
    looks_like_file = os.sep in name or "/" in name or name.endswith((".h5", ".keras"))
    what = "No such weights file" if looks_like_file else f"No pretrained weights {key!r}"
    if arch is None:
        allowed = f"Registered keys: {available() or 'none'}"
    else:
        tags = [k.split(".", 1)[1] for k in available(arch)]
        allowed = f"Available for {arch}: {tags or 'none'}; all entries: {available()}"
    raise ValueError(
        f"{what}. {allowed}. `weights` must be None, one of these tags or the path of an "
        f"existing `.weights.h5` file. Received: weights={name!r}"
    )


def weights_card(info):
    """``{"preprocessing": {"mean", "std"}, "class_names", "source"}`` of resolved weights.

    From the registry entry, else from the ``preprocessing.json`` that training writes
    next to its weights files; None when neither exists.
    """
    if info["entry"] is not None:
        entry = info["entry"]
        return {"preprocessing": entry["preprocessing"], "class_names": entry["class_names"],
                "source": f"zoo registry entry {info['key']!r}"}
    if info["path"] is not None:
        sidecar = Path(info["path"]).with_name("preprocessing.json")
        if sidecar.is_file():
            card = read_json(sidecar, "preprocessing card")
            if "mean" in card and "std" in card:
                return {"preprocessing": {"mean": card["mean"], "std": card["std"]},
                        "class_names": card.get("class_names"), "source": str(sidecar)}
    return None


def preprocess_input(x, arch="newton_cgnet10", tag="cifar10", data_format=None):
    """Alias of ``keras_newton.preprocess_input(x, data_format, weights=f"{arch}.{tag}")``."""
    from keras_newton.preprocessing import preprocess_input as _preprocess_input

    return _preprocess_input(x, data_format, weights=f"{arch}.{tag}")


def decode_predictions(preds, top=5, class_names=CIFAR10_CLASSES):
    """``[[(class_index, class_name, score), ...], ...]`` for each row of ``preds``; see
    ``keras_newton.decode_predictions`` (class names from the weights' registry entry)."""
    from keras_newton.preprocessing import decode

    return decode(preds, class_names, top)


def model_card(key):
    """Markdown model card generated from the registry entry ``key``."""
    e = REGISTRY[key]
    metrics = "\n".join(f"| {k} | {v} |" for k, v in e["metrics"].items())
    prep = e["preprocessing"]
    warm = e["recipe"].get("warm_start")
    epochs = (f"{e['epochs']} ({warm['epochs']} of the warm start, then "
              f"{e['epochs'] - warm['epochs']})" if warm else e["epochs"])
    return f"""# {key}

Generated from `keras_newton/zoo_registry.json` by `keras-newton zoo cards`; do not edit.

| field | value |
|---|---|
| architecture | `{key.split('.')[0]}` ({e['num_params']:,} parameters) |
| weights file | `{e['file']}` |
| sha256 | `{e['sha256']}` |
| dataset | {e['dataset']} |
| split | {e['split']} |
| epochs | {epochs} |
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

{_recipe_text(e['recipe'])}"""


def _recipe_text(recipe):
    """The card's recipe: the command, commit, machines and notes; then, for a warm start,
    the recipe of the weights it began from (recursively)."""
    trained_with = (f"trained with {recipe['trained_with']}. "
                    if "trained_with" in recipe else "")
    text = (f"```\n{recipe['command']}\n```\ncommit `{recipe['commit']}`; {trained_with}"
            f"{recipe.get('notes', '')}\n")
    warm = recipe.get("warm_start")
    if warm:
        text += (f"\nWarm start: the run began from `{warm['zoo']}` (sha256 "
                 f"`{warm['sha256'][:12]}`, {warm['epochs']} epochs, val top-1 "
                 f"{100 * warm['val_top1']:.2f}%), trained with:\n\n"
                 + _recipe_text(warm["recipe"]))
    return text


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

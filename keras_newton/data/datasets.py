"""Datasets by name: tensorflow-datasets online, a local folder or archive offline."""

import dataclasses
import re
from pathlib import Path

import numpy as np

from keras_newton.data.image_folder import load_image_source

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# name -> how to get it and how the paper preprocesses it (Section 4.1.1).
# normalization: "meanstd" = per-channel mean/std of the training part, "scale" = x / 255.
DATASETS = {
    "cifar10": {"tfds": "cifar10", "classes": 10, "class_names": CIFAR10_CLASSES,
                "image_size": (32, 32), "normalization": "meanstd"},
    "cifar100": {"tfds": "cifar100", "classes": 100, "class_names": None,
                 "image_size": (32, 32), "normalization": "meanstd"},
    "svhn": {"tfds": "svhn_cropped", "classes": 10, "class_names": tuple("0123456789"),
             "image_size": (32, 32), "normalization": "scale"},
    # ILSVRC 2012, streamed from files (keras_newton.data.imagenet), never held in memory.
    "imagenet": {"tfds": "imagenet2012", "classes": 1000, "class_names": None,
                 "image_size": None, "normalization": "imagenet", "streaming": True},
    # The user's own images: needs `data`, any number of classes and any (common) size.
    "folder": {"tfds": None, "classes": None, "class_names": None,
               "image_size": None, "normalization": "meanstd"},
}
_ALIASES = {"imagenet2012": "imagenet", "ilsvrc2012": "imagenet",
            "svhn_cropped": "svhn", "c10": "cifar10", "c100": "cifar100", "images": "folder",
            "image_folder": "folder"}


@dataclasses.dataclass
class ImageData:
    """Labelled images of one split.

    Attributes:
        images: uint8 array ``(n, height, width, 3)``.
        labels: int32 array ``(n,)``, indices into ``class_names``.
        class_names: list of class names, label order.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list

    def __len__(self):
        return len(self.labels)


def canonical_dataset(name):
    """``"CIFAR-10"``, ``"svhn_cropped"`` -> ``"cifar10"``, ``"svhn"``; ValueError if unknown."""
    key = re.sub(r"[-\s]", "", str(name).strip().lower())
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"Unknown dataset. Valid names: {sorted(DATASETS)}. Received: dataset={name!r}"
        )
    return key


def _split_names(split):
    names = [s.strip() for s in str(split).split("+")]
    if not all(names):
        raise ValueError(f"`split` must look like 'train' or 'train+extra'. Received: "
                         f"split={split!r}")
    return names


def _load_local(name, data, split, cache_dir):
    spec = DATASETS[name]
    splits, class_names = load_image_source(data, spec["image_size"], cache_dir)
    missing = [s for s in _split_names(split) if s not in splits]
    if missing:
        raise ValueError(
            f"The source has no split {missing[0]!r} (it has {sorted(splits)}). "
            f"Received: split={split!r}, data={str(data)!r}"
        )
    if spec["classes"] is not None and len(class_names) != spec["classes"]:
        raise ValueError(
            f"{name} has {spec['classes']} classes but the source has {len(class_names)} "
            f"class folders. Received: data={str(data)!r}"
        )
    if spec["class_names"] is not None and tuple(class_names) != tuple(spec["class_names"]):
        raise ValueError(
            f"The class folders must be {list(spec['class_names'])} (label order) for {name}. "
            f"Received: class folders={class_names}"
        )
    parts = [splits[s] for s in _split_names(split)]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ImageData(images, labels, list(class_names))


def _load_tfds(name, split):
    import tensorflow_datasets as tfds

    arrays, info = tfds.load(DATASETS[name]["tfds"], split=split, as_supervised=True,
                             batch_size=-1, with_info=True)
    images, labels = tfds.as_numpy(arrays)
    return ImageData(images.astype(np.uint8), labels.astype(np.int32),
                     list(info.features["label"].names))


def available_splits(name, data=None, cache_dir=None):
    """Returns the split names a local source holds, or the tfds splits of ``name``."""
    name = canonical_dataset(name)
    if data is not None:
        return sorted(load_image_source(data, DATASETS[name]["image_size"], cache_dir)[0])
    return {"svhn": ["extra", "test", "train"]}.get(name, ["test", "train"])


def load_dataset(name, data=None, split="train", cache_dir=None):
    """Loads one split of a dataset as uint8 images and int32 labels.

    Without ``data`` this uses tensorflow-datasets (``cifar10``, ``cifar100``,
    ``svhn_cropped``), which downloads on first use. With ``data`` (a folder or a
    tar/zip archive of ``split/<class>/<image>`` files) it is fully offline: the
    source is decoded once and cached (see ``load_image_source``); tfds is not
    imported at all.

    Args:
        name: one of ``DATASETS`` (``"cifar10"``, ``"cifar100"``, ``"svhn"``, or
            ``"folder"`` for your own images, which needs ``data``).
        data: optional local folder or archive path.
        split: split name, or several joined with ``+`` (``"train+extra"``).
        cache_dir: cache root for local sources; default ``keras_newton_home() / "datasets"``.

    Returns:
        An ``ImageData``.

    Example:
    >>> train = load_dataset("cifar10", data="cifar10-jpeg/train.tar.xz")  # doctest: +SKIP
    >>> train.images.shape, train.class_names[:2]
    ((50000, 32, 32, 3), ['airplane', 'automobile'])
    """
    name = canonical_dataset(name)
    if DATASETS[name].get("streaming"):
        raise ValueError(f"{name} is too large to load into memory; stream it with "
                         "keras_newton.data.imagenet.imagenet_dataset. "
                         f"Received: dataset={name!r}")
    if data is not None:
        return _load_local(name, Path(data).expanduser(), split, cache_dir)
    if DATASETS[name]["tfds"] is None:
        raise ValueError(
            "Dataset 'folder' needs a local folder or archive of split/<class>/<image> "
            "files. Received: data=None"
        )
    return _load_tfds(name, split)

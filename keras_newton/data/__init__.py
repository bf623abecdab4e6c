"""Datasets by name and the paper's preprocessing (Section 4.1.1) as ``tf.data``.

Online, ``load_dataset`` uses tensorflow-datasets; offline, a folder or tar/zip
archive of ``split/<class>/<image>`` files, decoded once and cached by content hash.
"""

from keras_newton.data.datasets import (
    CIFAR10_CLASSES,
    DATASETS,
    ImageData,
    available_splits,
    canonical_dataset,
    load_dataset,
)
from keras_newton.data.image_folder import decode_source, keras_newton_home, load_image_source
from keras_newton.data.pipeline import (
    ArrayBatches,
    balanced_subset,
    batches,
    channel_stats,
    holdout_split,
    make_dataset,
    normalization,
)

__all__ = [
    "ArrayBatches", "batches", "CIFAR10_CLASSES", "DATASETS", "ImageData", "available_splits",
    "balanced_subset",
    "canonical_dataset", "channel_stats", "decode_source", "holdout_split",
    "keras_newton_home", "load_dataset", "load_image_source", "make_dataset", "normalization",
]

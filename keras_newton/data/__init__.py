"""Datasets by name and the paper's preprocessing (Section 4.1.1) as ``tf.data``.

Online, ``load_dataset`` uses tensorflow-datasets; offline, a folder or tar/zip
archive of ``split/<class>/<image>`` files, decoded once and cached by content hash.
The names below are imported on first use: reading images (``image_folder``) needs
neither Keras nor TensorFlow.
"""

from keras_newton._lazy import lazy_attributes

_EXPORTS = {
    "keras_newton.data.datasets": [
        "CIFAR10_CLASSES", "DATASETS", "ImageData", "available_splits", "canonical_dataset",
        "load_dataset",
    ],
    "keras_newton.data.image_folder": [
        "archive_sample", "decode_source", "keras_newton_home", "load_image",
        "load_image_source",
    ],
    "keras_newton.data.pipeline": [
        "ArrayBatches", "batches", "channel_stats", "make_dataset", "normalization",
    ],
    "keras_newton.data.splits": ["balanced_subset", "epoch_seed", "holdout_split"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

"""ImageNet (ILSVRC 2012) input pipeline of Section 4.1.5, streamed with ``tf.data``.

Training: a random-resized crop to 224x224 (area 8%-100% of the image, aspect ratio
3/4-4/3, as in He et al. 2016 / torchvision) and a random horizontal flip.
Evaluation: resize the shorter side to 256 (bilinear), then the central 224x224 crop.
Both normalise with the usual ImageNet channel mean/std (pixel units, RGB).

Sources: tensorflow-datasets ``imagenet2012`` (its archives must be downloaded by hand
into ``manual_dir``, see the tfds catalog), or an image folder ``DATA/<split>/<class>/
<image>`` (``train``, ``val``), class folders in sorted order = labels.
"""

from pathlib import Path

import numpy as np

from keras_newton.data.image_folder import IMAGE_EXTENSIONS
from keras_newton.data.pipeline import balanced_subset
from keras_newton.data.splits import epoch_seed
from keras_newton.preprocessing import normalize

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_SIZE = 224
RESIZE_SIZE = 256


def list_image_folder(root, split):
    """Returns ``(paths, labels, class_names)`` of ``root/split/<class>/<image>``."""
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise ValueError(f"The image folder has no split {split!r}: {folder} is not a folder. "
                         f"Received: data={str(root)!r}, split={split!r}")
    class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (folder / name).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"No images under {folder}/<class>/ (extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}). Received: data={str(root)!r}")
    return paths, labels, class_names


def center_crop(image, size=IMAGE_SIZE, resize=RESIZE_SIZE):
    """Evaluation view: shorter side resized to ``resize``, then the central ``size`` crop."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return image[top:top + size, left:left + size]


def random_resized_crop(image, size=IMAGE_SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        seed=None):
    """Training view: a random crop of ``scale`` area and ``ratio`` aspect, resized."""
    import tensorflow as tf

    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True, seed=seed)
    image = tf.slice(image, begin, crop_size)
    return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def _source(split, data, manual_dir, limit, seed):
    import tensorflow as tf

    if data is not None:
        paths, labels, class_names = list_image_folder(data, split)
        if limit is not None and limit < len(paths):
            keep = balanced_subset(labels, np.arange(len(paths)), limit, seed)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]

        def decode(path, label):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False)
            return image, label

        ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
        return ds, decode, len(paths), class_names
    import tensorflow_datasets as tfds

    tfds_split = {"val": "validation"}.get(split, split)
    builder = tfds.builder("imagenet2012")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
    ds = builder.as_dataset(split=tfds_split, as_supervised=True, shuffle_files=True)
    count = builder.info.splits[tfds_split].num_examples
    if limit is not None and limit < count:
        ds, count = ds.take(limit), limit
    return ds, None, count, list(builder.info.features["label"].names)


def imagenet_dataset(split="train", data=None, batch_size=256, training=None, seed=0,
                     manual_dir=None, image_size=IMAGE_SIZE, limit=None, first_epoch=0):
    """Builds the batched ImageNet pipeline of one split.

    Args:
        split: ``"train"`` or ``"val"``.
        data: image folder root (``data/<split>/<class>/<image>``); None uses tfds
            ``imagenet2012`` with ``manual_dir``.
        batch_size: global batch size (256 in the paper).
        training: random-resized crop + flip, shuffled, drop remainder; default
            ``split == "train"``. Otherwise resize 256 + center crop.
        seed: shuffle and augmentation seed.
        manual_dir: where the ILSVRC 2012 archives are, for tfds.
        image_size: crop size (224).
        limit: use only this many images (class-balanced for a folder), for smoke tests.
        first_epoch: epochs the run has done (a resumed run): shuffles and augmentation
            then come from `splits.epoch_seed` ``(seed, first_epoch)``.

    Returns:
        ``(dataset, num_images, class_names)``; the dataset yields normalised float32
        NHWC batches and int32 labels.
    """
    import tensorflow as tf

    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val'. Received: split={split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. "
                         f"Received: batch_size={batch_size!r}")
    training = split == "train" if training is None else bool(training)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"`limit` must be a positive integer. Received: limit={limit!r}")
    ds, decode, count, class_names = _source(split, data, manual_dir, limit, seed)
    seed = epoch_seed(seed, first_epoch)  # the subset above keeps the run's seed

    def view(image, label):
        if training:
            image = random_resized_crop(image, image_size, seed=seed)
            image = tf.image.random_flip_left_right(image, seed=seed)
        else:
            image = center_crop(image, image_size, round(image_size * RESIZE_SIZE / IMAGE_SIZE))
        image = tf.ensure_shape(tf.cast(image, tf.float32), (image_size, image_size, 3))
        image = normalize(image, IMAGENET_MEAN, IMAGENET_STD, "channels_last")
        return image, tf.cast(label, tf.int32)

    if training:
        ds = ds.shuffle(min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
    if decode is not None:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)
    return ds, count, class_names

"""The paper's preprocessing as ``tf.data`` pipelines (Section 4.1.1).

Normalisation is ``(x - mean) / std`` per channel in pixel units: the training part's
channel mean/std for CIFAR, ``mean=0, std=255`` (x / 255) for SVHN. The "+" augmentation
(4-pixel shift by zero-pad-and-crop, horizontal flip) runs here on the fly, never in the
model, so it cannot reach an exported graph.
"""

import keras
import numpy as np

from keras_newton.data.splits import balanced_subset, epoch_seed, holdout_split  # noqa: F401
from keras_newton.preprocessing import normalize


def channel_stats(images, chunk=4096):
    """Returns per-channel ``(mean, std)`` of uint8 images, in pixel units (float64)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += part.sum(0)
        total_sq += (part ** 2).sum(0)
    count = len(images) * images.shape[1] * images.shape[2]
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))


def normalization(mode, train_images=None):
    """Returns ``{"mode", "mean", "std"}`` (pixel units) for ``"meanstd"`` or ``"scale"``.

    A std below 1 (a constant channel) is raised to 1, so it never divides by zero.
    """
    if mode == "scale":
        return {"mode": "scale", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]}
    if mode == "meanstd":
        mean, std = channel_stats(train_images)
        std = np.maximum(std, 1.0)
        return {"mode": "meanstd", "mean": mean.round(4).tolist(), "std": std.round(4).tolist()}
    raise ValueError(f"`mode` must be 'meanstd' or 'scale'. Received: mode={mode!r}")


def _options(tf):
    options = tf.data.Options()
    # In-memory data: shard by element across workers (MultiWorkerMirroredStrategy).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def make_dataset(images, labels, batch_size, mean, std, *, training, augment=False, seed=0,
                 shift=4, first_epoch=0):
    """Builds the ``tf.data`` pipeline of one split.

    Training: reshuffled every epoch (seeded), optional "+" augmentation, and
    ``drop_remainder=True``: every step sees exactly ``batch_size`` images, so the
    global batch splits evenly across replicas; the last ``n % batch_size`` images of
    each (reshuffled) epoch are skipped. Evaluation keeps every image (a smaller last
    batch).

    Args:
        images: uint8 ``(n, h, w, 3)``; labels: int ``(n,)``.
        batch_size: global batch size.
        mean, std: per-channel normalisation in pixel units.
        training: training (shuffle, augment, drop remainder) or evaluation pipeline.
        augment: pad ``shift`` zero pixels on each side, random crop back, random flip.
        seed: shuffle and augmentation seed.
        shift: maximal shift in pixels of the augmentation.
        first_epoch: epochs the run has done (a resumed run): shuffles and augmentation
            then come from `epoch_seed` ``(seed, first_epoch)``.

    Returns:
        A ``tf.data.Dataset`` of ``(float32 images, int32 labels)`` batches.
    """
    import tensorflow as tf

    height, width = images.shape[1:3]
    seed = epoch_seed(seed, first_epoch)

    def augment_fn(x, y):
        x = tf.pad(x, [[shift, shift], [shift, shift], [0, 0]])
        x = tf.image.random_crop(x, [height, width, 3], seed=seed)
        return tf.image.random_flip_left_right(x, seed=seed), y

    def normalize_fn(x, y):
        return normalize(x, mean, std, "channels_last"), y

    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if training:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if augment:
            ds = ds.map(augment_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(normalize_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))



class ArrayBatches(keras.utils.PyDataset):
    """The pipeline of `make_dataset` in NumPy, as a ``keras.utils.PyDataset``.

    Needs no TensorFlow: the JAX backend (e.g. a GPU machine without TensorFlow) trains
    from it. Training batches follow a fresh seeded permutation each epoch, the last
    ``n % batch_size`` images skipped; evaluation keeps every image. The augmentation
    pads ``shift`` zero pixels, crops back at a random offset and flips half of the
    images, per image. Arguments as in `make_dataset`.
    """

    def __init__(self, images, labels, batch_size, mean, std, *, training, augment=False,
                 seed=0, shift=4, first_epoch=0):
        super().__init__()
        self.images, self.labels = images, np.asarray(labels, np.int32)
        self.batch_size, self.training, self.augment, self.shift = (
            batch_size, training, augment, shift)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.rng = np.random.default_rng(epoch_seed(seed, first_epoch))
        self.order = np.arange(len(self.labels))
        self.on_epoch_end()

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.training else -(-n // self.batch_size)

    def on_epoch_end(self):
        if self.training:
            self.order = self.rng.permutation(len(self.labels))

    def __getitem__(self, index):
        take = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.images[take]
        if self.training and self.augment:
            x = _shift_and_flip(x, self.shift, self.rng)
        return normalize(x, self.mean, self.std, "channels_last"), self.labels[take]

def _shift_and_flip(x, shift, rng):
    n, height, width = x.shape[:3]
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    rows = rng.integers(0, 2 * shift + 1, n)
    cols = rng.integers(0, 2 * shift + 1, n)
    flips = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, rows[i]:rows[i] + height, cols[i]:cols[i] + width]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def batches(images, labels, batch_size, mean, std, *, training, augment=False, seed=0,
            first_epoch=0):
    """`make_dataset` (``tf.data``) on the TensorFlow backend, else `ArrayBatches`."""
    make = make_dataset if keras.backend.backend() == "tensorflow" else ArrayBatches
    return make(images, labels, batch_size, mean, std, training=training, augment=augment,
                seed=seed, first_epoch=first_epoch)

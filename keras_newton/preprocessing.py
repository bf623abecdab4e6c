"""``preprocess_input`` / ``decode_predictions`` as in ``keras.applications``, and `normalize`.

`normalize` is the single place where ``(x - mean) / std`` is computed: the training
pipelines (``tf.data`` and NumPy), ``evaluate``, the export parity check and the
SavedModel's uint8 signature all call it. It works on NumPy arrays (NumPy out), on
backend tensors through ``keras.ops`` (JAX arrays, TensorFlow tensors, symbolic Keras
tensors) and on ``tf.Tensor`` inside ``tf.data.Dataset.map`` on any backend.
"""

import os

import numpy as np

DEFAULT_WEIGHTS = "newton_cgnet10.cifar10"
_DATA_FORMATS = ("channels_last", "channels_first")


def _data_format(data_format):
    if data_format is None:
        import keras

        data_format = keras.config.image_data_format()
    if data_format not in _DATA_FORMATS:
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first'. "
            f"Received: data_format={data_format!r}"
        )
    return data_format


def _is_tf_tensor(x):
    return type(x).__module__.startswith("tensorflow")


def normalize(x, mean, std, data_format=None):
    """``(x - mean) / std`` per channel, as float32.

    Args:
        x: images in pixel units (uint8 or float, RGB): a NumPy array (or anything
            ``np.asarray`` takes), a backend tensor (JAX array, TensorFlow tensor,
            symbolic ``keras.Input``), or a ``tf.Tensor`` inside ``tf.data.Dataset.map``
            (whatever the Keras backend). A batch ``(N, H, W, C)`` / ``(N, C, H, W)`` or
            one image ``(H, W, C)`` / ``(C, H, W)``.
        mean, std: per-channel sequences (pixel units, one value per channel); ``std``
            must be positive.
        data_format: ``"channels_last"`` or ``"channels_first"`` (channel axis 1 of a
            batch, 0 of a single image); default ``keras.config.image_data_format()``.

    Returns:
        float32 images of the same shape and kind as ``x`` (NumPy in, NumPy out).
    """
    data_format = _data_format(data_format)
    mean = np.asarray(mean, "float32").reshape(-1)
    std = np.asarray(std, "float32").reshape(-1)
    if mean.size != std.size or mean.size == 0 or not (std > 0).all():
        raise ValueError("`mean` and `std` need one value per channel, `std` > 0. "
                         f"Received: mean={mean.tolist()}, std={std.tolist()}")
    numpy_in = not hasattr(x, "shape") or isinstance(x, np.ndarray | np.generic)
    if numpy_in:
        x = np.asarray(x)
    ndim = len(x.shape)
    if data_format == "channels_last":
        axis, shape = ndim - 1, (mean.size,)
    else:  # (C, H, W) or (N, C, H, W)
        axis = 0 if ndim == 3 else 1
        shape = (mean.size,) + (1,) * (ndim - axis - 1)
    channels = x.shape[axis] if ndim >= (1 if data_format == "channels_last" else 3) else -1
    if channels is not None and channels != mean.size:  # None: unknown in a traced graph
        raise ValueError(
            f"Expected images with {mean.size} channels on axis {axis} for "
            f"data_format={data_format!r}. Received: x.shape={tuple(x.shape)}"
        )
    mean, std = mean.reshape(shape), std.reshape(shape)
    if numpy_in:
        return (x.astype("float32") - mean) / std
    import keras

    if _is_tf_tensor(x) and keras.backend.backend() != "tensorflow":
        import tensorflow as tf  # a tf.data graph under another backend

        return (tf.cast(x, tf.float32) - mean) / std
    ops = keras.ops
    x = ops.cast(x, "float32")
    return ops.divide(ops.subtract(x, ops.convert_to_tensor(mean)), ops.convert_to_tensor(std))


def _card(weights):
    """``(card, description)`` of ``weights``; card = ``{"preprocessing", "class_names"}``."""
    from keras_newton import zoo

    weights = DEFAULT_WEIGHTS if weights is None else weights
    name = os.fspath(weights) if isinstance(weights, str | os.PathLike) else weights
    arch = name.split(".", 1)[0] if isinstance(name, str) and name in zoo.REGISTRY else None
    info = zoo.resolve_weights(arch, weights)
    card = zoo.weights_card(info)
    if card is None:
        raise ValueError(
            "No preprocessing is known for this weights file (no registry entry with its "
            "sha256, no preprocessing.json next to it); use "
            "keras_newton.preprocessing.normalize(x, mean, std). "
            f"Received: weights={name!r}"
        )
    return card, info["key"] or info["path"]


def preprocess_input(x, data_format=None, weights=None):
    """Preprocesses images for a pretrained keras-newton model, as ``keras.applications``.

    ``(x - mean) / std`` per RGB channel with the mean/std stored with the weights,
    written with ``keras.ops``: NumPy arrays give NumPy arrays, tensors give tensors
    (JAX arrays on JAX, ``tf.Tensor`` e.g. inside ``tf.data.Dataset.map``).

    Args:
        x: RGB images in [0, 255] (uint8 or float), a batch or a single image.
        data_format: ``"channels_last"`` (``(N, H, W, 3)``) or ``"channels_first"``
            (``(N, 3, H, W)``); default ``keras.config.image_data_format()``.
        weights: whose preprocessing: a registry key ``"arch.tag"`` (see
            ``keras_newton.zoo.available()``), or the path of a ``.weights.h5`` file that
            is registered (matched by sha256) or has the ``preprocessing.json`` of its
            training run next to it. Default ``"newton_cgnet10.cifar10"``.

    Returns:
        float32 preprocessed images, same shape as ``x``.

    Example:
    >>> import keras_newton as kn
    >>> model = kn.NewtonCGNet10(weights="cifar10")
    >>> probs = model.predict(kn.preprocess_input(images_uint8))
    >>> kn.decode_predictions(probs, top=3)[0]
    [(3, 'cat', 0.91...), (5, 'dog', 0.05...), (2, 'bird', 0.01...)]
    """
    data_format = _data_format(data_format)
    prep = _card(weights)[0]["preprocessing"]
    return normalize(x, prep["mean"], prep["std"], data_format)


def decode(preds, class_names, top=5):
    """``[[(class_index, class_name, score), ...], ...]``: the ``top`` classes per row."""
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ValueError(f"`top` must be a positive integer. Received: top={top!r}")
    if not isinstance(preds, np.ndarray):
        import keras

        preds = keras.ops.convert_to_numpy(preds)
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != len(class_names):
        raise ValueError(
            f"`preds` must have shape (batch, {len(class_names)}): one score per class. "
            f"Received: preds.shape={preds.shape}"
        )
    order = np.argsort(-preds, axis=1, kind="stable")[:, :int(top)]
    return [[(int(i), str(class_names[i]), float(p[i])) for i in row]
            for row, p in zip(order, preds, strict=True)]


def decode_predictions(preds, top=5, weights=None):
    """Decodes a batch of predictions, as ``keras.applications`` does.

    Args:
        preds: scores ``(batch, classes)`` (probabilities or logits): NumPy array or
            backend tensor (converted to NumPy).
        top: how many of the highest-scoring classes to return per row.
        weights: whose class names, as in `preprocess_input` (default
            ``"newton_cgnet10.cifar10"``).

    Returns:
        One list per row of ``(class_index, class_name, score)`` tuples, highest score
        first: the triples of ``keras.applications`` (whose first element is the
        ImageNet WordNet id; CIFAR classes have none, so it is the class index here).
    """
    card, source = _card(weights)
    names = card.get("class_names")
    if not names:
        raise ValueError(f"No class names are known for these weights. Received: "
                         f"weights={source!r}")
    return decode(preds, names, top)

"""The keras.applications-style wrapper shared by every image classifier builder."""

import os

import keras
import numpy as np

from keras_newton import zoo
from keras_newton.files import load_weights
from keras_newton.layers.common import (
    batch_norm,
    channel_axis,
    conv,
    standardize_data_format,
)

POOLINGS = (None, "avg", "max")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}. Received: {name}={value!r}")


def image_input(input_tensor, input_shape, default_size, min_size, data_format):
    """Returns ``(inputs, x)`` for the given ``input_tensor`` / ``input_shape``."""
    if input_shape is None:
        input_shape = (
            (default_size, default_size, 3)
            if data_format == "channels_last"
            else (3, default_size, default_size)
        )
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels) (channels first for "
            f"'channels_first'). Received: input_shape={input_shape}"
        )
    spatial = input_shape[:2] if data_format == "channels_last" else input_shape[1:]
    channels = input_shape[2] if data_format == "channels_last" else input_shape[0]
    if channels is None:
        raise ValueError(f"`input_shape` needs a known channel count. Received: {input_shape}")
    for size in spatial:
        if size is not None and size < min_size:
            raise ValueError(
                f"Input size must be at least {min_size}x{min_size}. "
                f"Received: input_shape={input_shape}"
            )
    if input_tensor is None:
        inputs = keras.Input(shape=input_shape, name="images")
        return inputs, inputs
    if not keras.utils.is_keras_tensor(input_tensor):
        inputs = keras.Input(tensor=input_tensor, shape=input_shape, name="images")
        return inputs, inputs
    return keras.utils.get_source_inputs(input_tensor), input_tensor


def classifier(
    *,
    backbone,
    name,
    arch=None,
    include_top,
    weights,
    input_tensor,
    input_shape,
    pooling,
    classes,
    classifier_activation,
    default_size,
    min_size,
    weight_decay=0.0,
    data_format=None,
):
    """Builds ``inputs -> backbone(x) -> [pooling | GAP + Dense]`` as a functional model.

    ``backbone(x, data_format, kernel_regularizer)`` must return the last feature map.
    ``weights`` is None, a tag of ``keras_newton.zoo`` for ``arch`` or a path, resolved by
    `keras_newton.zoo.resolve_weights`; registered weights (a tag, or a file with an
    entry's sha256) must fit: RGB input, the entry's ``classes`` with the top.
    """
    data_format = standardize_data_format(data_format)
    _check_choice("pooling", pooling, POOLINGS)
    if isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 1:
        raise ValueError(f"`classes` must be a positive integer. Received: classes={classes!r}")
    classes = int(classes)
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0. Received: weight_decay={weight_decay}")
    info = None
    if weights is not None:
        if arch is None and not (isinstance(weights, str | os.PathLike)
                                 and os.path.isfile(weights)):
            raise ValueError(
                "Pretrained weights exist only for the named architectures (e.g. "
                f"NewtonCGNet10); `weights` must be None or the path of an existing "
                f"`.weights.h5` file for model {name!r}. Received: weights={weights!r}"
            )
        info = zoo.resolve_weights(arch, weights)
    entry = info and info["entry"]
    if entry is not None:
        if include_top and classes != entry["classes"]:
            raise ValueError(
                f"Pretrained weights {info['key']} have {entry['classes']} classes; use "
                "include_top=False for another number of classes. "
                f"Received: classes={classes}"
            )
        if include_top and classifier_activation not in ("softmax", None):
            raise ValueError(
                "Only classifier_activation='softmax' or None fit pretrained weights. "
                f"Received: classifier_activation={classifier_activation!r}"
            )
    regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay else None

    inputs, x = image_input(input_tensor, input_shape, default_size, min_size, data_format)
    channels = x.shape[channel_axis(data_format)]
    if entry is not None and channels != 3:
        raise ValueError(
            f"Pretrained weights {info['key']} take RGB images (3 channels); build the model "
            f"without weights for {channels}-channel input. Received: weights={weights!r}, "
            f"input_shape={tuple(x.shape[1:])}"
        )
    x = backbone(x, data_format=data_format, kernel_regularizer=regularizer)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=data_format, name="avg_pool")(x)
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer="glorot_uniform",
            kernel_regularizer=regularizer,
            dtype="float32",  # float32 logits also under a mixed-precision policy
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(data_format=data_format, name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(data_format=data_format, name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if info is None:
        return model
    path = info["path"] or zoo.weights_path(arch, info["tag"])
    if entry is not None and not include_top:
        # The backbone of the full model's weights: copy layer by (stable) name.
        full = classifier(
            backbone=backbone, arch=arch, name=name, include_top=True, weights=None,
            input_tensor=None, input_shape=model.input_shape[1:], pooling=None,
            classes=entry["classes"], classifier_activation=None,
            default_size=default_size, min_size=min_size, data_format=data_format,
        )
        load_weights(full, path)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
    else:
        load_weights(model, path)
    return model


def stem(x, filters, data_format, kernel_regularizer):
    """3x3 convolution + BN + ReLU, the first layer of every CIFAR model."""
    x = conv(filters, 3, 1, "stem_conv", kernel_regularizer, data_format)(x)
    x = batch_norm("stem_bn", data_format)(x)
    return keras.layers.ReLU(name="stem_relu")(x)

"""The paper's CIFAR baselines: non-bottleneck ResNet (He et al. 2016) and PlainNet.

Same conventions as Newton-CGNet: 3x3 stem with 16 filters, three stages of n
basic blocks at 16/32/64 filters (stride 2 at stages 2 and 3), depth 6n+2, BN
after every convolution, He-normal convolutions, 1x1 convolution + BN projection
shortcuts where the shape changes. PlainNet is the same stack without shortcuts.
"""

import keras

from keras_newton.layers.common import batch_norm, conv
from keras_newton.models.applications import classifier, stem
from keras_newton.models.newton_cgnet import WIDTHS

RESNET_DEPTHS = (20, 32, 44, 56, 110, 164)


def basic_block(x, filters, strides, shortcut, name, data_format, regularizer, rank=2):
    """Two 3x3 conv + BN (ReLU between), the shortcut added before the last ReLU.

    ``rank=1``: temporal convolutions of size 3 (VDCNN's convolutional block).
    """
    in_channels = x.shape[-1 if data_format == "channels_last" else 1]
    y = conv(filters, 3, strides, f"{name}_conv1", regularizer, data_format, rank)(x)
    y = batch_norm(f"{name}_bn1", data_format)(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = conv(filters, 3, 1, f"{name}_conv2", regularizer, data_format, rank)(y)
    y = batch_norm(f"{name}_bn2", data_format)(y)
    if shortcut:
        if strides != 1 or in_channels != filters:
            x = conv(filters, 1, strides, f"{name}_proj_conv", regularizer, data_format,
                     rank)(x)
            x = batch_norm(f"{name}_proj_bn", data_format)(x)
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _stack(depth, shortcut, family, **kwargs):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"{family} depth must be 6n+2 with n >= 1 (e.g. {list(RESNET_DEPTHS)}). "
            f"Received: depth={depth!r}"
        )
    n = (depth - 2) // 6

    def backbone(x, data_format, kernel_regularizer):
        x = stem(x, WIDTHS[0], data_format, kernel_regularizer)
        for s, width in enumerate(WIDTHS):
            for b in range(n):
                strides = 2 if s > 0 and b == 0 else 1
                x = basic_block(x, width, strides, shortcut, f"stage{s + 1}_block{b + 1}",
                                 data_format, kernel_regularizer)
        return x

    arch = f"{family.lower()}{depth}"
    kwargs["name"] = kwargs.get("name") or arch
    return classifier(backbone=backbone, arch=arch, default_size=32, min_size=8, **kwargs)


def _signature_doc(family, what):
    return (
        f"Builds a CIFAR {family} of the given depth (6n+2): {what}.\n\n"
        "    Arguments as in ``keras.applications`` (default input 32x32x3; ``weights`` is\n"
        "    None, a zoo tag or a ``.weights.h5`` path), plus ``weight_decay`` (L2, as SGD weight\n"
        "    decay) and ``data_format`` (default ``keras.config.image_data_format()``).\n"
    )


def resnet(
    depth,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    weight_decay=0.0,
    data_format=None,
    name=None,
):
    return _stack(depth, True, "ResNet", include_top=include_top, weights=weights,
                  input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                  classes=classes, classifier_activation=classifier_activation,
                  weight_decay=weight_decay, data_format=data_format, name=name)


def plainnet(
    depth,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    weight_decay=0.0,
    data_format=None,
    name=None,
):
    return _stack(depth, False, "PlainNet", include_top=include_top, weights=weights,
                  input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                  classes=classes, classifier_activation=classifier_activation,
                  weight_decay=weight_decay, data_format=data_format, name=name)


resnet.__doc__ = _signature_doc("ResNet", "non-bottleneck basic blocks with shortcuts (eq. 9)")
plainnet.__doc__ = _signature_doc("PlainNet", "the ResNet stack without shortcuts (eq. 1)")


def _named(family_fn, depth, class_name):
    def builder(include_top=True, weights=None, input_tensor=None, input_shape=None,
                pooling=None, classes=10, classifier_activation="softmax", weight_decay=0.0,
                data_format=None, name=None):
        return family_fn(depth, include_top=include_top, weights=weights,
                         input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                         classes=classes, classifier_activation=classifier_activation,
                         weight_decay=weight_decay, data_format=data_format, name=name)

    builder.__name__ = builder.__qualname__ = f"{class_name}{depth}"
    builder.__doc__ = f"{class_name}-{depth} for CIFAR. Arguments as in `{family_fn.__name__}`."
    return builder


ResNet20, ResNet32, ResNet44, ResNet56, ResNet110, ResNet164 = (
    _named(resnet, d, "ResNet") for d in RESNET_DEPTHS
)
PlainNet20, PlainNet32, PlainNet44, PlainNet56, PlainNet110, PlainNet164 = (
    _named(plainnet, d, "PlainNet") for d in RESNET_DEPTHS
)

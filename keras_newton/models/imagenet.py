"""ImageNet models of Section 4.1.5: ResNet-34 and Newton-CGNet-34.

Both use the ResNet-34 layout of He et al. (2016): a 7x7/2 stem with 64 filters and
3x3/2 max pooling, four stages of 3, 4, 6, 3 basic blocks at 64, 128, 256, 512
filters (stride 2 at stages 2-4, 1x1 convolution + BN projection shortcuts), global
average pooling and a 1000-way classifier; BN after every convolution, He-normal
convolutions without bias.

Newton-CGNet-34 replaces the third stage (six basic blocks at 256 filters) by one
Newton-CG Block of six CG Blocks whose gradient is a concatenation (eq. 18):
``g_t = y_t + [g1, g2, g3]``. The paper's listing of the branch widths is garbled;
we read it as W1: 3x3 -> 64, W2: 3x3 -> 64, W3: 3x3 -> 256, W4: 3x3 256 -> 128
(64 + 64 + 128 = 256 channels), which has exactly the weights of the two 3x3
256 -> 256 convolutions it replaces. The count is then 21.7M, the paper's (Table 5).
"""

import keras

from keras_newton.layers import NewtonCGBlock
from keras_newton.layers.common import batch_norm, conv
from keras_newton.models.applications import classifier
from keras_newton.models.resnet import basic_block

WIDTHS = (64, 128, 256, 512)
BLOCKS = (3, 4, 6, 3)  # ResNet-34
BRANCH_FILTERS = (64, 64, 128)  # W1, W2, W4 of the Newton-CG stage (W3: 256)
DEFAULT_SIZE = 224
MIN_SIZE = 32  # five stride-2 reductions


def imagenet_stem(x, data_format, kernel_regularizer):
    """7x7/2 convolution (64) + BN + ReLU + 3x3/2 max pooling."""
    x = conv(WIDTHS[0], 7, 2, "stem_conv", kernel_regularizer, data_format)(x)
    x = batch_norm("stem_bn", data_format)(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    return keras.layers.MaxPooling2D(3, 2, padding="same", data_format=data_format,
                                     name="stem_pool")(x)


def _build(newton_stage, dropout_rate, arch, **kwargs):
    def backbone(x, data_format, kernel_regularizer):
        x = imagenet_stem(x, data_format, kernel_regularizer)
        for s, (n, width) in enumerate(zip(BLOCKS, WIDTHS, strict=True)):
            if s == newton_stage:
                x = NewtonCGBlock(
                    num_cg_blocks=n, filters=width, strides=2, dropout_rate=dropout_rate,
                    kernel_regularizer=kernel_regularizer, data_format=data_format,
                    branch_filters=BRANCH_FILTERS, name=f"stage{s + 1}",
                )(x)
                continue
            for b in range(n):
                strides = 2 if s > 0 and b == 0 else 1
                x = basic_block(x, width, strides, True, f"stage{s + 1}_block{b + 1}",
                                data_format, kernel_regularizer)
        return x

    return classifier(backbone=backbone, arch=arch, default_size=DEFAULT_SIZE,
                      min_size=MIN_SIZE, **kwargs)


def NewtonCGNet34(
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    dropout_rate=0.2,
    weight_decay=0.0,
    data_format=None,
    name="newton_cgnet34",
):
    """Newton-CGNet-34 for ImageNet (Section 4.1.5, Table 5: 21.7M parameters).

    ResNet-34 with its third stage replaced by a Newton-CG Block of six CG Blocks with
    concatenated branches (eq. 18); see the module docstring for the branch widths.

    Args:
        include_top, weights, input_tensor, input_shape, pooling, classes,
            classifier_activation: as in ``keras.applications`` (default input
            224x224x3, at least 32x32; ``weights`` is None, a zoo tag or a
            ``.weights.h5`` path).
        dropout_rate: float in [0, 1), the CG Blocks' dropout (0.2 in the paper).
        weight_decay: L2 coefficient as in SGD weight decay.
        data_format: ``"channels_last"`` or ``"channels_first"``; default
            ``keras.config.image_data_format()``.
        name: model name.

    Returns:
        A ``keras.Model``.
    """
    return _build(2, dropout_rate, "newton_cgnet34", name=name, include_top=include_top,
                  weights=weights, input_tensor=input_tensor, input_shape=input_shape,
                  pooling=pooling, classes=classes, classifier_activation=classifier_activation,
                  weight_decay=weight_decay, data_format=data_format)


def ResNet34(
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    weight_decay=0.0,
    data_format=None,
    name="resnet34",
):
    """ResNet-34 for ImageNet (He et al. 2016; Table 5: 21.8M parameters).

    Arguments as in `NewtonCGNet34` (no dropout).
    """
    return _build(None, 0.0, "resnet34", name=name, include_top=include_top, weights=weights,
                  input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                  classes=classes, classifier_activation=classifier_activation,
                  weight_decay=weight_decay, data_format=data_format)


IMAGENET_MODELS = {"newton_cgnet34": NewtonCGNet34, "resnet34": ResNet34}
IMAGENET_PAPER_PARAMS = {"newton_cgnet34": 21.7, "resnet34": 21.8}

"""The Newton-CG Block: one Newton step whose inner solve is N unrolled CG steps."""

import keras
from keras import ops

from keras_newton.layers.cg_block import CGBlock
from keras_newton.layers.common import (
    batch_norm,
    check_branch_filters,
    check_dropout_rate,
    check_image_shape,
    check_positive_int,
    check_rank,
    conv,
    standardize_data_format,
)


@keras.saving.register_keras_serializable(package="keras_newton")
class NewtonCGBlock(keras.layers.Layer):
    """A Newton-CG Block (Algorithm 2 of the paper): ``x -> ReLU(x + y_N)``.

    ``y_0 = x``; ``num_cg_blocks`` CG Blocks produce ``y_1 .. y_N`` (see
    `CGBlock`); the block returns ``ReLU(x + y_N)``. The first CG Block carries
    the stride; when the shape changes the outer skip reads ``x`` through a
    1x1 convolution + BN projection. The block holds N ``alpha`` and N-1 ``beta``
    scalars, all initialised to 1.0.

    Args:
        num_cg_blocks: int >= 1, the number N of CG Blocks (CG iterations).
        filters: int, output channels.
        strides: int, stride of the first CG Block.
        dropout_rate: float in [0, 1).
        kernel_regularizer: optional regularizer for the convolution kernels.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        fused: use the fused convolutions of `CGBlock` (same weights and outputs).
        branch_filters: None, or ``(f1, f2, f4)`` for concatenated branches (eq. 18;
            see `CGBlock`).
        rank: 2 (default) for images, 1 for sequences (temporal convolutions of
            size 3; the text model of Section 4.2); see `CGBlock`.
        **kwargs: standard layer arguments.

    Call arguments:
        inputs: rank-4 image tensor ``x_k``.
        training: bool, enables dropout and batch statistics.

    Example:
    >>> block = NewtonCGBlock(num_cg_blocks=3, filters=32, strides=2)
    >>> block(keras.ops.ones((2, 16, 16, 16))).shape
    (2, 8, 8, 32)

    Reference:
        Shen et al., "Newton design: designing CNNs with the family of Newton's
        methods", Sci China Inf Sci 66(6):162101, 2023.
    """

    def __init__(
        self,
        num_cg_blocks,
        filters,
        strides=1,
        dropout_rate=0.0,
        kernel_regularizer=None,
        data_format=None,
        fused=True,
        branch_filters=None,
        rank=2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fused = bool(fused)
        self.rank = check_rank(rank)
        self.num_cg_blocks = check_positive_int("num_cg_blocks", num_cg_blocks)
        self.filters = check_positive_int("filters", filters)
        self.branch_filters = check_branch_filters(branch_filters, self.filters)
        self.strides = check_positive_int("strides", strides)
        self.dropout_rate = check_dropout_rate(dropout_rate)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.data_format = standardize_data_format(data_format)
        self.cg_blocks = [
            CGBlock(
                filters,
                strides=strides if t == 0 else 1,
                dropout_rate=self.dropout_rate,
                first_step=t == 0,
                kernel_regularizer=self.kernel_regularizer,
                data_format=self.data_format,
                fused=self.fused,
                rank=self.rank,
                branch_filters=self.branch_filters,
                name=f"cg{t}",
            )
            for t in range(num_cg_blocks)
        ]
        self.proj_conv = conv(filters, 1, strides, "proj_conv", self.kernel_regularizer,
                              self.data_format, self.rank)
        self.proj_bn = batch_norm("proj_bn", self.data_format)
        self.use_projection = None

    def build(self, input_shape):
        in_channels = check_image_shape(input_shape, "NewtonCGBlock", self.data_format, self.rank)
        self.cg_blocks[0].build(input_shape)
        out_shape = self.cg_blocks[0].conv3.compute_output_shape(input_shape)
        for block in self.cg_blocks[1:]:
            block.build(out_shape, out_shape)
        self.use_projection = self.strides != 1 or in_channels != self.filters
        if self.use_projection:
            self.proj_conv.build(input_shape)
            self.proj_bn.build(out_shape)

    def call(self, inputs, training=None):
        y, d = inputs, None
        for block in self.cg_blocks:
            y, d = block(y, d, training=training)
        skip = self.proj_bn(self.proj_conv(inputs), training=training) if self.use_projection \
            else inputs
        return ops.relu(skip + y)

    def compute_output_shape(self, input_shape):
        return self.cg_blocks[0].conv3.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_cg_blocks": self.num_cg_blocks,
                "filters": self.filters,
                "strides": self.strides,
                "dropout_rate": self.dropout_rate,
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "data_format": self.data_format,
                "fused": self.fused,
                "rank": self.rank,
                "branch_filters": self.branch_filters,
            }
        )
        return config

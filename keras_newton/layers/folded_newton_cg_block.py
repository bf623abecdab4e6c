"""The inference-time Newton-CG Block of ``keras_newton.export.optimize_for_inference``.

It lives with the other layers so that importing ``keras_newton.layers`` registers every
layer a keras-newton ``.keras`` file can hold; the folding itself (BatchNormalization into
the convolutions, the reads of ``y`` merged) is `keras_newton.export.optimize`.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_newton")
class FoldedNewtonCGBlock(keras.layers.Layer):
    """Inference-only Newton-CG Block: BN folded, each CG Block's reads of ``y`` merged.

    Computes exactly what `NewtonCGBlock` computes with ``training=False``, with two
    3x3 convolutions per CG Block instead of four (plus projections). For CG Block
    ``t`` (``D`` is ``sigma_t * d_t``, ``sigma_t = alpha_t`` or 1 where alpha is 0)::

        [a | h | y_proj | skip] = merged_t(y)           # one conv, split on channels
        D = a + conv4_t(ReLU(h)) + c_t * D_prev         # c_t = sigma_t beta_t / sigma_{t-1}
        y = (y_proj or y) + r_t * D                     # r_t = alpha_t / sigma_t
    and returns ``ReLU((skip or x) + y)``. Built from a trained `NewtonCGBlock` by
    ``keras_newton.export.optimize_for_inference`` (`fold_newton_cg_block`).

    Args:
        num_cg_blocks: int, number of CG Blocks.
        filters: int, output channels.
        strides: int, stride of the first CG Block.
        cg_projection: bool, whether the first CG Block projects ``y`` (shape change).
        skip_projection: bool, whether the outer skip is a projection.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        **kwargs: standard layer arguments.
    """

    def __init__(self, num_cg_blocks, filters, strides=1, cg_projection=False,
                 skip_projection=False, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.num_cg_blocks = int(num_cg_blocks)
        self.filters = int(filters)
        self.strides = int(strides)
        self.cg_projection = bool(cg_projection)
        self.skip_projection = bool(skip_projection)
        self.data_format = data_format or keras.config.image_data_format()
        self.channel_axis = -1 if self.data_format == "channels_last" else 1
        self.merged = []
        self.conv4 = []
        for t in range(self.num_cg_blocks):
            self.merged.append(keras.layers.Conv2D(
                self.filters * self._parts(t), 3, strides=self.strides if t == 0 else 1,
                padding="same", data_format=self.data_format, name=f"cg{t}_merged"))
            self.conv4.append(keras.layers.Conv2D(
                self.filters, 3, padding="same", data_format=self.data_format,
                name=f"cg{t}_conv4"))

    def _parts(self, t):
        if t > 0:
            return 2
        return 2 + int(self.cg_projection) + int(self.skip_projection)

    def build(self, input_shape):
        out_shape = self.merged[0].compute_output_shape(input_shape)
        out_shape = list(out_shape)
        out_shape[self.channel_axis] = self.filters
        for t in range(self.num_cg_blocks):
            self.merged[t].build(input_shape if t == 0 else tuple(out_shape))
            self.conv4[t].build(tuple(out_shape))
        # Per CG Block: (c_t, r_t); c_0 is unused.
        self.coefficients = self.add_weight(name="coefficients", shape=(self.num_cg_blocks, 2),
                                            initializer="ones", trainable=False)

    def call(self, inputs):
        y, direction = inputs, None
        skip = inputs
        for t in range(self.num_cg_blocks):
            parts = ops.split(self.merged[t](y), self._parts(t), axis=self.channel_axis)
            a, h, rest = parts[0], parts[1], parts[2:]
            step = a + self.conv4[t](ops.relu(h))
            if t > 0:
                step = step + ops.cast(self.coefficients[t, 0], step.dtype) * direction
            direction = step
            y_base = y
            if t == 0 and self.cg_projection:
                y_base, rest = rest[0], rest[1:]
            if t == 0 and self.skip_projection:
                skip = rest[0]
            y = y_base + ops.cast(self.coefficients[t, 1], step.dtype) * direction
        return ops.relu(skip + y)

    def compute_output_shape(self, input_shape):
        shape = list(self.merged[0].compute_output_shape(input_shape))
        shape[self.channel_axis] = self.filters
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_cg_blocks": self.num_cg_blocks, "filters": self.filters,
            "strides": self.strides, "cg_projection": self.cg_projection,
            "skip_projection": self.skip_projection, "data_format": self.data_format,
        })
        return config

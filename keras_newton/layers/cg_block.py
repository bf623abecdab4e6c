"""The CG Block: one step of the conjugate-gradient method unrolled into layers."""

import logging

import keras
from keras import ops

from keras_newton.layers.common import (
    batch_norm,
    channel_axis,
    check_branch_filters,
    check_dropout_rate,
    check_image_shape,
    check_positive_int,
    check_rank,
    conv,
    standardize_data_format,
)


def _not_uint8_watch_warning(record):
    """False for TensorFlow's warning that remat watches `_dropout_conv`'s uint8 mask."""
    message = record.getMessage()
    return not (message.startswith("The dtype of the watched tensor must be floating")
                and message.endswith("tf.uint8"))


if keras.backend.backend() == "tensorflow":  # the warning is harmless: keep it out of logs
    logging.getLogger("tensorflow").addFilter(_not_uint8_watch_warning)


@keras.saving.register_keras_serializable(package="keras_newton")
class CGBlock(keras.layers.Layer):
    """One CG Block (Algorithm 2, lines 3-12 of the paper).

    Given the current iterate ``y_t`` (and the previous conjugate direction
    ``d_{t-1}`` unless this is the first step) it computes::

        g1 = Dropout(BN(W1 * y))
        g2 = BN(W2 * Dropout(y))
        g3 = BN(W4 * Dropout(ReLU(BN(W3 * y))))
        g  = y + g1 + g2 + g3
        d  = -g                      (first step)
        d  = -g + beta * d_prev      (later steps)
        y_next = y + alpha * d

    With ``branch_filters=(f1, f2, f4)`` (eq. 18, the ImageNet Newton-CGNet-34) the
    branches are narrower and concatenated instead of summed:
    ``g = y + [g1, g2, g3]`` with ``W1``, ``W2``, ``W4`` giving ``f1``, ``f2``, ``f4``
    channels (``f1 + f2 + f4 = filters``; ``W3`` keeps ``filters``). This is the sum
    form with some output channels of ``W1``, ``W2``, ``W4`` fixed to zero.

    ``alpha`` and (for later steps only) ``beta`` are learnable scalars
    initialised to 1.0. The ReLU after ``W3`` and a BatchNormalization after every
    convolution follow Section 4.1.2 of the paper. When ``strides > 1`` or the
    input has a channel count other than ``filters``, ``W1``..``W3`` are strided
    and each of the two additions that involve ``y`` (``y + g1 + ...`` and
    ``y + alpha * d``) reads ``y`` through its own 1x1 convolution + BN projection
    ("a linear projection ... whenever in need", Section 4.1.2).

    Args:
        filters: int, output channels of every convolution.
        strides: int, stride of ``W1``, ``W2``, ``W3`` and the projections.
        dropout_rate: float in [0, 1), rate of the three dropout layers.
        first_step: bool, True for ``t = 0`` (no ``beta``, no ``d_prev``).
        kernel_regularizer: optional regularizer for the convolution kernels.
        data_format: ``"channels_last"`` or ``"channels_first"``; defaults to
            ``keras.config.image_data_format()``.
        branch_filters: None (every branch has ``filters`` channels and they are
            summed) or three ints ``(f1, f2, f4)`` summing to ``filters`` (eq. 18).
        fused: compute ``W1*y`` and ``W3*y`` (and ``W2*y`` at inference) with one
            convolution of concatenated kernels; same weights and outputs as the
            plain path (``fused=False``); see benchmarks/README.md for its speed.
        rank: 2 (default) for images; 1 for sequences ``(batch, steps, channels)``
            with temporal convolutions of size 3 (and 1 for the projections), as in
            the text model of Section 4.2. Same algorithm, only the convolution rank
            changes, so the text model reuses this layer instead of a 1-D copy.
        **kwargs: standard layer arguments (``name``, ``dtype``, ...).

    Call arguments:
        y: image tensor ``y_t``.
        d_prev: previous direction ``d_{t-1}``; required iff ``first_step=False``.
        training: bool, enables dropout and batch statistics.

    Returns:
        Tuple ``(y_next, d)``.

    Example:
    >>> block = CGBlock(filters=16)
    >>> y, d = block(keras.ops.ones((2, 8, 8, 16)))

    Reference:
        Shen et al., "Newton design: designing CNNs with the family of Newton's
        methods", Sci China Inf Sci 66(6):162101, 2023.
    """

    def __init__(
        self,
        filters,
        strides=1,
        dropout_rate=0.0,
        first_step=True,
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
        self.filters = check_positive_int("filters", filters)
        self.branch_filters = check_branch_filters(branch_filters, self.filters)
        f1, f2, f4 = self.branch_filters or (filters, filters, filters)
        self.strides = check_positive_int("strides", strides)
        self.dropout_rate = check_dropout_rate(dropout_rate)
        self.first_step = bool(first_step)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.data_format = standardize_data_format(data_format)

        def _conv(k, s, name, width=filters):
            return conv(width, k, s, name, self.kernel_regularizer, self.data_format,
                        self.rank)

        def _bn(name):
            return batch_norm(name, self.data_format)

        self.conv1, self.bn1 = _conv(3, strides, "conv1", f1), _bn("bn1")
        self.conv2, self.bn2 = _conv(3, strides, "conv2", f2), _bn("bn2")
        self.conv3, self.bn3 = _conv(3, strides, "conv3"), _bn("bn3")
        self.conv4, self.bn4 = _conv(3, 1, "conv4", f4), _bn("bn4")
        self.dropout1 = keras.layers.Dropout(self.dropout_rate, name="dropout1")
        self.dropout2 = keras.layers.Dropout(self.dropout_rate, name="dropout2")
        self.dropout3 = keras.layers.Dropout(self.dropout_rate, name="dropout3")
        # Built (and used) only when the shape changes; see build().
        self.proj_g_conv, self.proj_g_bn = _conv(1, strides, "proj_g_conv"), _bn("proj_g_bn")
        self.proj_y_conv, self.proj_y_bn = _conv(1, strides, "proj_y_conv"), _bn("proj_y_bn")
        self.use_projection = None

    def _needs_projection(self, in_channels):
        return self.strides != 1 or in_channels != self.filters

    def build(self, y_shape, d_prev_shape=None):
        in_channels = check_image_shape(y_shape, "CGBlock", self.data_format, self.rank)
        if self.first_step != (d_prev_shape is None):
            raise ValueError(
                "CGBlock: `d_prev` must be given exactly when first_step=False. "
                f"Received: first_step={self.first_step}, d_prev={d_prev_shape}"
            )
        for layer in (self.conv1, self.conv2, self.conv3):
            layer.build(y_shape)
        out_shape = self.conv3.compute_output_shape(y_shape)
        self.conv4.build(out_shape)
        for c, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3),
                      (self.conv4, self.bn4)):
            bn.build(c.compute_output_shape(out_shape if c is self.conv4 else y_shape))
        self.use_projection = self._needs_projection(in_channels)
        if self.use_projection:
            for layer in (self.proj_g_conv, self.proj_y_conv):
                layer.build(y_shape)
            for layer in (self.proj_g_bn, self.proj_y_bn):
                layer.build(out_shape)
        self.alpha = self.add_weight(name="alpha", shape=(), initializer="ones")
        self.beta = (
            None
            if self.first_step
            else self.add_weight(name="beta", shape=(), initializer="ones")
        )

    def _convs_of_y(self, y, training):
        """``W1*y``, ``W3*y`` and, at inference, ``W2*y`` as one convolution.

        They read the same tensor (Dropout before ``W2`` is the identity at
        inference), so one convolution with concatenated kernels computes them all.
        The kernels stay separate variables: fused and plain paths share weights.
        """
        convs = [self.conv1, self.conv3] + ([self.conv2] if not training else [])
        kernel = ops.concatenate([ops.cast(c.kernel, y.dtype) for c in convs], axis=-1)
        out = ops.conv(y, kernel, strides=self.strides, padding="same",
                       data_format=self.data_format)
        widths = [c.filters for c in convs]
        ends = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
        parts = ops.split(out, ends, axis=channel_axis(self.data_format))
        return parts[0], parts[1], parts[2] if not training else None

    def _dropout_conv(self, x, dropout, conv, training):
        """``conv(dropout(x))`` that keeps only ``x`` and a uint8 mask for backward.

        Keras' Dropout followed by a convolution keeps a float mask and the dropped
        tensor (for the kernel gradient): two activations. Here the mask is drawn
        (from ``dropout``'s seed generator) as uint8 outside ``keras.remat``, which
        recomputes the dropped tensor in the backward pass; ``x`` is kept anyway.
        """
        if not training or self.dropout_rate == 0:
            return conv(x)
        noise = keras.random.uniform(ops.shape(x), seed=dropout.seed_generator)
        keep = ops.cast(noise >= self.dropout_rate, "uint8")
        scale, strides = 1.0 / (1.0 - self.dropout_rate), conv.strides

        # `keep` is an argument (TensorFlow warns that it watches a uint8 tensor: the
        # warning is filtered): closed over instead, it cost 180 MB more per NCG-56 step.
        def dropout_conv(x, keep, kernel):
            dropped = x * ops.cast(keep, x.dtype) * scale
            return ops.conv(dropped, kernel, strides=strides, padding="same",
                            data_format=self.data_format)

        return keras.remat(dropout_conv)(x, keep, ops.cast(conv.kernel, x.dtype))

    def call(self, y, d_prev=None, training=None):
        if self.fused:
            w1y, w3y, w2y = self._convs_of_y(y, training)
        else:
            w1y, w3y, w2y = self.conv1(y), self.conv3(y), None
        if w2y is None:
            w2y = self._dropout_conv(y, self.dropout2, self.conv2, training)
        g1 = self.dropout1(self.bn1(w1y, training=training), training=training)
        g2 = self.bn2(w2y, training=training)
        h3 = ops.relu(self.bn3(w3y, training=training))
        g3 = self.bn4(self._dropout_conv(h3, self.dropout3, self.conv4, training),
                      training=training)
        if self.use_projection:
            y_g = self.proj_g_bn(self.proj_g_conv(y), training=training)
            y_y = self.proj_y_bn(self.proj_y_conv(y), training=training)
        else:
            y_g = y_y = y
        if self.branch_filters is None:
            g = y_g + g1 + g2 + g3
        else:  # eq. 18
            g = y_g + ops.concatenate([g1, g2, g3], axis=channel_axis(self.data_format))
        d = -g if self.first_step else -g + ops.cast(self.beta, g.dtype) * d_prev
        y_next = y_y + ops.cast(self.alpha, d.dtype) * d
        return y_next, d

    def compute_output_shape(self, y_shape, d_prev_shape=None):
        out = self.conv3.compute_output_shape(y_shape)
        return out, out

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "dropout_rate": self.dropout_rate,
                "first_step": self.first_step,
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "data_format": self.data_format,
                "fused": self.fused,
                "rank": self.rank,
                "branch_filters": self.branch_filters,
            }
        )
        return config

"""The quasi-Newton Block: one step of the paper's quasi-Newton iteration (8) of order m."""

import keras
from keras import ops

from keras_newton.layers.common import (
    batch_norm,
    check_dropout_rate,
    check_image_shape,
    check_positive_int,
    conv,
    standardize_data_format,
)


def check_order(m):
    """The order m of ``H_k``: an int >= 0."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"`m` must be an integer >= 0. Received: m={m!r}")
    return m


@keras.saving.register_keras_serializable(package="keras_newton")
class QuasiNewtonBlock(keras.layers.Layer):
    """A quasi-Newton Block: eq. (8) of the paper with ``H_k A = sum_{n<=m} (D A)^n``.

    One step ``x_k -> x_{k+1} = ReLU[x_k + H_k A r]`` of the quasi-Newton method that
    the paper derives PlainNet (m = 0) and ResNet (m = 1) from, with every product with
    A a learnable convolution + BN and the order m kept (docs/newton_design.md)::

        z = BN(W0 * x)                     A x_k
        h = ReLU(z)                        ReLU(A x_k) = D A x_k (D: the mask z > 0)
        r = h - x                          r = ReLU(A x_k) - x_k
        t_0 = r;  t_n = D(BN(Wn * t_{n-1}))    (D A)^n r, n = 1..m
        x_next = ReLU(x + t_0 + ... + t_m)     eq. (8): ReLU[x_k + H_k A r]

    m = 0 is ``ReLU(BN(W0 * x))``, the PlainNet layer (eq. 1, 16). m = 1 is eq. (8)
    with H_k A = I + D A, from which the paper's non-bottleneck ResNet block (eq. 9)
    follows by making ``I - H_k A`` and ``H_k A`` independent (see the docs). The
    binary term D of the later products, ``D(v)``, is the exact mask ``z > 0``
    (``relu_mask=True``: the ReLU' of ``W0 * x``, free to compute), Dropout (the
    paper's translation of D in Newton-CGNet), both, or neither. ``W0`` carries the
    stride; when the shape changes ``x`` is read through a 1x1 convolution + BN
    projection (only for m >= 1: the PlainNet layer has no ``x`` term).

    Args:
        m: int >= 0, the order of ``H_k`` (the Neumann terms after the first).
        filters: int, output channels.
        strides: int, stride of ``W0`` and of the projection.
        relu_mask: bool, multiply each ``BN(Wn * t)`` (n >= 1) by the mask ``z > 0``.
        dropout_rate: float in [0, 1), rate of a Dropout after each ``D`` (n >= 1).
        kernel_size: int, size of ``W0 .. Wm`` (3; 1 with a 1x1 input makes each a dense map).
        use_batch_norm: bool, BN after every convolution; False leaves each product with A a
            plain linear map (no bias), the solver's form.
        kernel_regularizer: optional regularizer for the convolution kernels.
        data_format: ``"channels_last"`` or ``"channels_first"``.
        **kwargs: standard layer arguments.

    Call arguments:
        inputs: rank-4 image tensor ``x_k``.
        training: bool, enables dropout and batch statistics.

    Example:
    >>> block = QuasiNewtonBlock(m=2, filters=32, strides=2)
    >>> block(keras.ops.ones((2, 16, 16, 16))).shape
    (2, 8, 8, 32)

    Reference:
        Shen et al., "Newton design: designing CNNs with the family of Newton's
        methods", Sci China Inf Sci 66(6):162101, 2023, Section 3.1.
    """

    def __init__(
        self,
        m,
        filters,
        strides=1,
        relu_mask=True,
        dropout_rate=0.0,
        kernel_size=3,
        use_batch_norm=True,
        kernel_regularizer=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.m = check_order(m)
        self.filters = check_positive_int("filters", filters)
        self.strides = check_positive_int("strides", strides)
        self.relu_mask = bool(relu_mask)
        self.dropout_rate = check_dropout_rate(dropout_rate)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.use_batch_norm = bool(use_batch_norm)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.data_format = standardize_data_format(data_format)

        def _conv(k, s, name):
            return conv(filters, k, s, name, self.kernel_regularizer, self.data_format)

        def _bn(name):
            return batch_norm(name, self.data_format) if self.use_batch_norm else None

        # convs[n], bns[n]: the n-th product with A (n = 0: A x_k).
        self.convs = [_conv(kernel_size, strides if n == 0 else 1, f"conv{n}")
                      for n in range(self.m + 1)]
        self.bns = [_bn(f"bn{n}") for n in range(self.m + 1)]
        self.dropouts = [keras.layers.Dropout(self.dropout_rate, name=f"dropout{n}")
                         for n in range(1, self.m + 1)]
        # Built (and used) only when m >= 1 and the shape changes; see build().
        self.proj_conv, self.proj_bn = _conv(1, strides, "proj_conv"), _bn("proj_bn")
        self.use_projection = None

    def build(self, input_shape):
        in_channels = check_image_shape(input_shape, "QuasiNewtonBlock", self.data_format)
        out_shape = self.convs[0].compute_output_shape(input_shape)
        for n, (c, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            c.build(input_shape if n == 0 else out_shape)
            if bn is not None:
                bn.build(out_shape)
        self.use_projection = self.m >= 1 and (self.strides != 1 or in_channels != self.filters)
        if self.use_projection:
            self.proj_conv.build(input_shape)
            if self.proj_bn is not None:
                self.proj_bn.build(out_shape)

    def _product(self, n, v, training):
        """The n-th product with A: ``BN(Wn * v)`` (``Wn * v`` without BN)."""
        out = self.convs[n](v)
        return out if self.bns[n] is None else self.bns[n](out, training=training)

    def call(self, inputs, training=None):
        z = self._product(0, inputs, training)  # A x_k
        h = ops.relu(z)  # D A x_k
        if self.m == 0:
            return h  # eq. (16): ReLU(A x_k), the PlainNet layer
        x = inputs
        if self.use_projection:
            x = self.proj_conv(x)
            if self.proj_bn is not None:
                x = self.proj_bn(x, training=training)
        r = h - x  # ReLU(A x_k) - x_k
        term, step = r, r
        for n in range(1, self.m + 1):  # step = H_k A r = sum_{n<=m} (D A)^n r
            term = self._product(n, term, training)
            if self.relu_mask:
                term = ops.where(z > 0, term, ops.zeros_like(term))
            term = self.dropouts[n - 1](term, training=training)
            step = step + term
        return ops.relu(x + step)  # eq. (8): P_C[x_k + H_k A r]

    def compute_output_shape(self, input_shape):
        return self.convs[0].compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "m": self.m,
                "filters": self.filters,
                "strides": self.strides,
                "relu_mask": self.relu_mask,
                "dropout_rate": self.dropout_rate,
                "kernel_size": self.kernel_size,
                "use_batch_norm": self.use_batch_norm,
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "data_format": self.data_format,
            }
        )
        return config

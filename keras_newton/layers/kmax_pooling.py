"""K-max pooling over time (Kalchbrenner et al. 2014), as used by VDCNN."""

import keras
from keras import ops

from keras_newton.layers.common import check_positive_int


@keras.saving.register_keras_serializable(package="keras_newton")
class KMaxPooling(keras.layers.Layer):
    """Keeps the ``k`` largest values of every channel over time, in their time order.

    For each example and channel it selects the ``k`` largest of the ``steps``
    values (ties: the earlier step first) and returns them in the order in which
    they occur in the sequence, not sorted by value. Backend-agnostic
    (``keras.ops.top_k`` + ``take_along_axis``), differentiable like max pooling.

    Args:
        k: int >= 1, the number of values kept per channel.
        data_format: ``"channels_last"`` (default, input ``(batch, steps, channels)``)
            or ``"channels_first"`` (``(batch, channels, steps)``). Unlike the image
            layers it does not follow ``keras.config.image_data_format()``.
        **kwargs: standard layer arguments.

    Input shape:
        Rank-3 ``(batch, steps, channels)`` with ``steps >= k`` (checked when known).

    Output shape:
        ``(batch, k, channels)`` (``(batch, channels, k)`` for channels_first).

    Example:
    >>> x = keras.ops.convert_to_tensor([[[1.0], [5.0], [2.0], [4.0]]])
    >>> keras.ops.convert_to_numpy(KMaxPooling(k=2)(x))[0, :, 0]
    array([5., 4.], dtype=float32)
    """

    def __init__(self, k, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.k = check_positive_int("k", k)
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "`data_format` must be 'channels_last' or 'channels_first'. "
                f"Received: data_format={data_format!r}"
            )
        self.data_format = data_format
        self.input_spec = keras.layers.InputSpec(ndim=3)

    def _steps(self, input_shape):
        return input_shape[1] if self.data_format == "channels_last" else input_shape[2]

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                "KMaxPooling expects a rank-3 input (batch, steps, channels). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        steps = self._steps(input_shape)
        if steps is not None and steps < self.k:
            raise ValueError(
                f"KMaxPooling needs at least k={self.k} time steps. "
                f"Received: input_shape={tuple(input_shape)}"
            )

    def call(self, inputs):
        x = ops.transpose(inputs, (0, 2, 1)) if self.data_format == "channels_last" else inputs
        _, indices = ops.top_k(x, self.k, sorted=True)
        x = ops.take_along_axis(x, ops.sort(indices, axis=-1), axis=-1)
        return ops.transpose(x, (0, 2, 1)) if self.data_format == "channels_last" else x

    def compute_output_shape(self, input_shape):
        if self.data_format == "channels_last":
            return (input_shape[0], self.k, input_shape[2])
        return (input_shape[0], input_shape[1], self.k)

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k, "data_format": self.data_format})
        return config

"""Cross-entropy with integer labels and label smoothing (Keras' sparse loss has none)."""

import keras


@keras.saving.register_keras_serializable(package="keras_newton")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """``CategoricalCrossentropy(label_smoothing=s)`` on integer labels.

    The target of an image of class ``c`` is ``(1 - s) * one_hot(c) + s / classes``
    (Szegedy et al. 2016), the predictions probabilities (a softmax output), as
    ``keras.losses.SparseCategoricalCrossentropy`` takes them.

    Args:
        label_smoothing: ``s`` in ``[0, 1)``.
        name: the loss's name.
        **kwargs: ``keras.losses.Loss`` arguments (``reduction``, ``dtype``).

    Example:
    >>> loss = SparseCategoricalCrossentropyWithSmoothing(0.1)
    >>> loss([0], [[0.9, 0.05, 0.05]])  # -(0.9333 log 0.9 + 2 * 0.0333 log 0.05)
    """

    def __init__(self, label_smoothing=0.0, name="sparse_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError("`label_smoothing` must be in [0, 1). "
                             f"Received: label_smoothing={label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_pred = ops.convert_to_tensor(y_pred)
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}

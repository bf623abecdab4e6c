"""Small helpers shared by the layers: argument checks and conv/BN factories."""

import keras


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_dropout_rate(value, name="dropout_rate"):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def channel_axis(data_format):
    return -1 if data_format == "channels_last" else 1


def check_image_shape(input_shape, layer_name, data_format):
    """Validates a rank-4 image shape with known channels and returns the channel count."""
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer_name} expects a rank-4 input (batch, height, width, channels) for "
            f"data_format={data_format!r}. Received: input_shape={tuple(input_shape)}"
        )
    channels = input_shape[channel_axis(data_format)]
    if channels is None:
        raise ValueError(
            f"{layer_name} needs a known number of input channels. "
            f"Received: input_shape={tuple(input_shape)}"
        )
    return channels


def conv(filters, kernel_size, strides, name, kernel_regularizer, data_format):
    """He-normal, bias-free convolution (a BatchNormalization always follows)."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=kernel_regularizer,
        data_format=data_format,
        name=name,
    )


def batch_norm(name, data_format):
    return keras.layers.BatchNormalization(
        axis=channel_axis(data_format), momentum=0.9, epsilon=1e-5, name=name
    )


def standardize_data_format(data_format):
    data_format = data_format or keras.config.image_data_format()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first'. "
            f"Received: data_format={data_format!r}"
        )
    return data_format

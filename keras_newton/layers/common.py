"""Small helpers shared by the layers: argument checks and conv/BN factories."""

import keras


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_branch_filters(branch_filters, filters):
    """None, or three positive ints summing to ``filters`` (returned as a tuple)."""
    if branch_filters is None:
        return None
    values = tuple(branch_filters) if isinstance(branch_filters, (list, tuple)) else ()
    if (len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                for v in values) or sum(values) != filters):
        raise ValueError(
            "`branch_filters` must be None or three positive ints (f1, f2, f4) summing to "
            f"`filters`={filters}. Received: branch_filters={branch_filters!r}"
        )
    return values


def check_dropout_rate(value, name="dropout_rate"):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def channel_axis(data_format):
    return -1 if data_format == "channels_last" else 1


def check_rank(rank):
    """1 (temporal convolutions, text) or 2 (images)."""
    if rank not in (1, 2) or isinstance(rank, bool):
        raise ValueError(f"`rank` must be 1 (sequences) or 2 (images). Received: rank={rank!r}")
    return rank


def check_image_shape(input_shape, layer_name, data_format, rank=2):
    """Validates a rank-4 image (rank-3 sequence for ``rank=1``) shape with known channels
    and returns the channel count."""
    if len(input_shape) != rank + 2:
        dims = "(batch, height, width, channels)" if rank == 2 else "(batch, steps, channels)"
        raise ValueError(
            f"{layer_name} expects a rank-{rank + 2} input {dims} for "
            f"data_format={data_format!r}. Received: input_shape={tuple(input_shape)}"
        )
    channels = input_shape[channel_axis(data_format)]
    if channels is None:
        raise ValueError(
            f"{layer_name} needs a known number of input channels. "
            f"Received: input_shape={tuple(input_shape)}"
        )
    return channels


def conv(filters, kernel_size, strides, name, kernel_regularizer, data_format, rank=2):
    """He-normal, bias-free convolution (a BatchNormalization always follows);
    ``rank=1`` gives a temporal ``Conv1D``."""
    return (keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D)(
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


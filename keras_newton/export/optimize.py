"""Inference-time rewrite: BatchNormalization folded into convolutions, CG Blocks merged.

At inference Dropout is the identity and every BatchNormalization is a per-channel
affine map, so a CG Block (see `keras_newton.layers.CGBlock`) is, with ``y`` its input::

    g_lin = P_g(y) + BN1(W1 * y) + BN2(W2 * y)      # linear in y: ONE conv (kernels summed)
    h     = BN3(W3 * y)                            # reads y too
    g     = g_lin + BN4(W4 * ReLU(h))
    d     = -g + beta * d_prev
    y'    = P_y(y) + alpha * d

``P_g``/``P_y`` are the 1x1 projections (or the identity, a 3x3 kernel with only its
centre tap). Everything that reads ``y`` -- the summed kernel of ``g_lin``, ``W3``,
``P_y`` and, in the first CG Block, the Newton-CG Block's outer projection -- becomes
ONE 3x3 convolution with concatenated output channels, whose output is split.
``alpha`` is folded into the kernels by carrying the scaled direction ``D = alpha * d``.

A 1x1 convolution equals a 3x3 one with a single non-zero tap only where both see the
same input pixel. With "same" padding the 3x3 window of output ``i`` starts at
``i * s - pad_before(3)`` and the 1x1 reads ``i * s - pad_before(1)``, so the tap sits
at ``pad_before(3) - pad_before(1)``: the centre for stride 1, but for stride 2 the
top-left corner on even input sizes and the centre on odd ones. The tap is computed
from the static input size; a strided block with an unknown size is refused.

Outside the CG Blocks, every BatchNormalization that directly follows a linear
``Conv2D`` (and is its only consumer) is folded into it, and Dropout is removed. The
result is a functional Keras model made of standard layers plus the registered
inference layer `FoldedNewtonCGBlock` (only ``keras.ops``, any backend).
"""

import keras
import numpy as np
from keras import ops

from keras_newton.layers import NewtonCGBlock

__all__ = ["FoldedNewtonCGBlock", "fold_batch_norm", "optimize_for_inference", "tap_offset"]


def _same_pad_before(size, kernel, stride):
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


def tap_offset(size, stride, kernel=3):
    """Index in a ``kernel``-wide window of the pixel a 1x1 "same" conv reads.

    Both convolutions use "same" padding and the same stride on an axis of ``size``
    pixels. Raises ValueError if the 1x1 pixel lies outside the window (never for
    ``kernel=3, stride<=2``) or if ``size`` is unknown and the answer depends on it.
    """
    if size is None:
        if stride == 1:  # pad_before(k) = (k - 1) // 2 for any size
            return (kernel - 1) // 2
        raise ValueError(
            "Merging a strided 1x1 projection into a 3x3 convolution needs the static "
            "spatial size (the tap depends on its parity under 'same' padding). Build the "
            "model with a fixed input_shape. Received: size=None"
        )
    tap = _same_pad_before(size, kernel, stride) - _same_pad_before(size, 1, stride)
    if not 0 <= tap < kernel:
        raise ValueError(f"No exact {kernel}x{kernel} embedding of a 1x1 convolution. "
                         f"Received: size={size}, stride={stride}")
    return tap


def fold_batch_norm(conv, bn):
    """``(kernel, bias)`` (float64) of ``bn(conv(x))`` as one convolution with bias."""
    kernel = np.asarray(keras.ops.convert_to_numpy(conv.kernel), dtype="float64")
    bias = (np.asarray(keras.ops.convert_to_numpy(conv.bias), dtype="float64")
            if conv.use_bias else np.zeros(kernel.shape[-1]))
    n = kernel.shape[-1]

    def get(var, default):
        if var is None:
            return np.full(n, default)
        return np.asarray(keras.ops.convert_to_numpy(var), dtype="float64").reshape(-1)

    gamma = get(bn.gamma, 1.0)
    beta = get(bn.beta, 0.0)
    mean = get(bn.moving_mean, 0.0)
    var = get(bn.moving_variance, 1.0)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return kernel * scale, (bias - mean) * scale + beta


def _embed_1x1(kernel, taps, size=3):
    """Zero-pads a ``(1, 1, in, out)`` kernel to ``(size, size, in, out)`` at ``taps``."""
    out = np.zeros((size, size, *kernel.shape[2:]))
    out[taps[0], taps[1]] = kernel[0, 0]
    return out


def _scalar(var):
    return float(keras.ops.convert_to_numpy(var))


def _widen(kernel, bias, start, filters):
    """Places a branch's output channels at ``start`` of ``filters`` zero channels."""
    wide_k = np.zeros((*kernel.shape[:-1], filters))
    wide_b = np.zeros(filters)
    wide_k[..., start:start + kernel.shape[-1]] = kernel
    wide_b[start:start + kernel.shape[-1]] = bias
    return wide_k, wide_b


@keras.saving.register_keras_serializable(package="keras_newton")
class FoldedNewtonCGBlock(keras.layers.Layer):
    """Inference-only Newton-CG Block: BN folded, each CG Block's reads of ``y`` merged.

    Computes exactly what `NewtonCGBlock` computes with ``training=False``, with two
    3x3 convolutions per CG Block instead of four (plus projections). For CG Block
    ``t`` (``D`` is ``sigma_t * d_t``, ``sigma_t = alpha_t`` or 1 where alpha is 0)::

        [a | h | y_proj | skip] = merged_t(y)           # one conv, split on channels
        D = a + conv4_t(ReLU(h)) + c_t * D_prev         # c_t = sigma_t beta_t / sigma_{t-1}
        y = (y_proj or y) + r_t * D                     # r_t = alpha_t / sigma_t
    and returns ``ReLU((skip or x) + y)``. Build it with `from_block`.

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

    @classmethod
    def from_block(cls, block, input_shape, name=None):
        """A built `FoldedNewtonCGBlock` equal to ``block`` (a built `NewtonCGBlock`)."""
        if not block.built:
            raise ValueError(f"NewtonCGBlock {block.name!r} is not built. Received: block={block}")
        channels_last = block.data_format == "channels_last"
        spatial = input_shape[1:3] if channels_last else input_shape[2:4]
        first = block.cg_blocks[0]
        layer = cls(block.num_cg_blocks, block.filters, strides=block.strides,
                    cg_projection=first.use_projection, skip_projection=block.use_projection,
                    data_format=block.data_format, name=name or block.name,
                    dtype=block.dtype_policy)
        layer.build(tuple(input_shape))

        prev_sigma = None
        coefficients = np.ones((block.num_cg_blocks, 2))
        for t, cg in enumerate(block.cg_blocks):
            if t > 0 and (cg.use_projection or cg.strides != 1):
                raise ValueError("Only the first CG Block of a Newton-CG Block may change the "
                                 f"shape. Received: block={block.name!r}, cg_block={t}")
            stride = cg.strides
            taps = (tap_offset(spatial[0], stride), tap_offset(spatial[1], stride)) \
                if t == 0 else (1, 1)
            k1, b1 = fold_batch_norm(cg.conv1, cg.bn1)
            k2, b2 = fold_batch_norm(cg.conv2, cg.bn2)
            k3, b3 = fold_batch_norm(cg.conv3, cg.bn3)
            k4, b4 = fold_batch_norm(cg.conv4, cg.bn4)
            if cg.branch_filters is not None:  # eq. 18: [g1, g2, g3] = zero-padded sum
                f1, f2, _ = cg.branch_filters
                k1, b1 = _widen(k1, b1, 0, block.filters)
                k2, b2 = _widen(k2, b2, f1, block.filters)
                k4, b4 = _widen(k4, b4, f1 + f2, block.filters)
            if cg.use_projection:
                kg, bg = fold_batch_norm(cg.proj_g_conv, cg.proj_g_bn)
                kg = _embed_1x1(kg, taps)
            else:  # y itself: the centre tap of the identity (stride 1, same channels)
                kg = _embed_1x1(np.eye(block.filters)[None, None], (1, 1))
                bg = np.zeros(block.filters)
            alpha = _scalar(cg.alpha)
            sigma = alpha if alpha != 0.0 else 1.0
            kernels = [-sigma * (kg + k1 + k2), k3]
            biases = [-sigma * (bg + b1 + b2), b3]
            if t == 0 and cg.use_projection:
                ky, by = fold_batch_norm(cg.proj_y_conv, cg.proj_y_bn)
                kernels.append(_embed_1x1(ky, taps))
                biases.append(by)
            if t == 0 and block.use_projection:
                ks, bs = fold_batch_norm(block.proj_conv, block.proj_bn)
                kernels.append(_embed_1x1(ks, taps))
                biases.append(bs)
            if t > 0:
                coefficients[t, 0] = sigma * _scalar(cg.beta) / prev_sigma
            coefficients[t, 1] = alpha / sigma
            prev_sigma = sigma
            layer.merged[t].set_weights([np.concatenate(kernels, axis=-1).astype("float32"),
                                         np.concatenate(biases).astype("float32")])
            layer.conv4[t].set_weights([(-sigma * k4).astype("float32"),
                                        (-sigma * b4).astype("float32")])
        layer.coefficients.assign(coefficients.astype("float32"))
        return layer


def _foldable_pairs(model):
    """``{id(conv): bn}`` for each BN whose input is a linear Conv2D used only by it."""
    consumers = {}
    for layer in model.layers:
        try:
            inputs = keras.tree.flatten(layer.input)
        except (AttributeError, ValueError):  # input layer, or a layer called twice
            continue
        for tensor in inputs:
            consumers.setdefault(id(tensor), []).append(layer)
    outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
    pairs = {}
    for layer in model.layers:
        if type(layer) is not keras.layers.Conv2D:
            continue
        try:
            out = layer.output
        except (AttributeError, ValueError):
            continue
        users = consumers.get(id(out), [])
        if id(out) not in outputs and _foldable(layer, users):
            pairs[id(layer)] = users[0]
    return pairs


def _foldable(conv, users):
    if len(users) != 1 or type(users[0]) is not keras.layers.BatchNormalization:
        return False
    if conv.activation is not keras.activations.linear:
        return False
    axis = users[0].axis
    return axis in ((-1, 3) if conv.data_format == "channels_last" else (1, -3))


def optimize_for_inference(model):
    """Returns a new functional model computing ``model(x, training=False)`` faster.

    Folds every BatchNormalization that follows a linear ``Conv2D`` into it, removes
    Dropout, and replaces every `NewtonCGBlock` with a `FoldedNewtonCGBlock` (one
    merged 3x3 convolution plus ``W4`` per CG Block). The input model is not changed.
    Outputs agree with the original to float32 rounding (checked to 1e-4 in tests).

    Args:
        model: a functional ``keras.Model`` (e.g. from ``keras_newton.models.get_model``).

    Raises:
        ValueError: for a non-functional model, or a strided Newton-CG Block whose
            input size is not static.
    """
    if (not isinstance(model, keras.Model) or isinstance(model, keras.Sequential)
            or not hasattr(model, "_run_through_graph")):
        raise ValueError("optimize_for_inference needs a functional keras.Model. "
                         f"Received: model={type(model).__name__}")

    pairs = _foldable_pairs(model)
    folded_bns = {id(bn) for bn in pairs.values()}

    def call_function(layer, *args, **kwargs):
        kwargs.pop("training", None)
        if isinstance(layer, keras.layers.Dropout):
            return args[0]
        if id(layer) in folded_bns:  # its conv already returned the folded output
            return args[0]
        if id(layer) in pairs:
            config = layer.get_config()
            config["use_bias"] = True
            config.pop("kernel_regularizer", None)
            config.pop("bias_regularizer", None)
            new = keras.layers.Conv2D.from_config(config)
            out = new(*args, **kwargs)
            kernel, bias = fold_batch_norm(layer, pairs[id(layer)])
            new.set_weights([kernel.astype(layer.kernel.dtype), bias.astype(layer.kernel.dtype)])
            return out
        if isinstance(layer, NewtonCGBlock):
            new = FoldedNewtonCGBlock.from_block(layer, tuple(args[0].shape))
            return new(args[0])
        config = layer.get_config()
        for key in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
            if key in config:
                config[key] = None
        new = layer.__class__.from_config(config)
        out = new(*args, **kwargs)
        if layer.weights:
            new.set_weights(layer.get_weights())
        return out

    new_model = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                         call_function=call_function)
    return keras.Model(new_model.inputs, new_model.outputs, name=f"{model.name}_inference")

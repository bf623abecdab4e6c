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
inference layer `FoldedNewtonCGBlock` (``keras_newton.layers``; only ``keras.ops``, any
backend), built here by `fold_newton_cg_block`.
"""

import keras
import numpy as np

from keras_newton.layers import FoldedNewtonCGBlock, NewtonCGBlock

__all__ = ["FoldedNewtonCGBlock", "fold_batch_norm", "fold_newton_cg_block",
           "optimize_for_inference", "tap_offset"]


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


def fold_newton_cg_block(block, input_shape, name=None):
    """A built `FoldedNewtonCGBlock` equal to ``block`` (a built `NewtonCGBlock`).

    ``input_shape`` is the block's input shape with the batch dimension.
    """
    if not block.built:
        raise ValueError(f"NewtonCGBlock {block.name!r} is not built. Received: block={block}")
    channels_last = block.data_format == "channels_last"
    spatial = input_shape[1:3] if channels_last else input_shape[2:4]
    first = block.cg_blocks[0]
    layer = FoldedNewtonCGBlock(
        block.num_cg_blocks, block.filters, strides=block.strides,
        cg_projection=first.use_projection, skip_projection=block.use_projection,
        data_format=block.data_format, name=name or block.name, dtype=block.dtype_policy)
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
            new = fold_newton_cg_block(layer, tuple(args[0].shape))
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

"""Quasi-Newton nets for CIFAR: the ResNet stage layout with quasi-Newton Blocks of order m.

Beyond the paper (Section 3.1 says m cannot be raised in ResNet): ``L-{m}`` stacks
quasi-Newton Blocks (`QuasiNewtonBlock`, m + 1 convolutions each) in three stages at
16/32/64 filters (stride 2 at stages 2 and 3) after the 3x3 stem, like the ResNets.
L counts the weight layers, ``L = (m + 1)(b1 + b2 + b3) + 2`` for b_i blocks in stage i:
``56-{0}`` is PlainNet-56, ``56-{1}`` has ResNet-56's convolutions and parameters,
``56-{2}`` six blocks of three convolutions per stage.
"""

import re

from keras_newton.layers import QuasiNewtonBlock
from keras_newton.layers.quasi_newton_block import check_order
from keras_newton.models.applications import classifier, stem
from keras_newton.models.newton_cgnet import WIDTHS

_SPEC_RE = re.compile(r"^\s*(\d+)\s*-\s*\{\s*(\d+)\s*\}\s*$")
# Registered in MODELS: name -> (spec, blocks per stage or None for equal stages).
NAMED = {
    "quasi_newton56_m0": ("56-{0}", None),  # PlainNet-56
    "quasi_newton56_m1": ("56-{1}", None),  # ResNet-56's convolutions
    "quasi_newton56_m2": ("56-{2}", None),
    "quasi_newton46_m3": ("46-{3}", (3, 3, 5)),  # 0.86M, as ResNet-56 and Newton-CGNet-28
}


def parse_quasi_newton_spec(spec, blocks=None):
    """``(depth, m, (b1, b2, b3))`` from ``"56-{2}"`` and optional blocks per stage.

    Without ``blocks`` the stages hold equal numbers of blocks,
    ``(L - 2) / (3 (m + 1))`` each. Raises ValueError unless ``L = (m+1)(b1+b2+b3) + 2``.
    """
    match = _SPEC_RE.match(spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"`spec` must look like '56-{{2}}' (L-{{m}}). Received: spec={spec!r}")
    depth, m = (int(v) for v in match.groups())
    m = check_order(m)
    if blocks is None:
        per_stage, rest = divmod(depth - 2, 3 * (m + 1))
        if depth < 2 or rest or per_stage < 1:
            raise ValueError(
                f"Depth must be 3(m+1)n + 2 for equal stages of n blocks (m={m}: "
                f"{[3 * (m + 1) * n + 2 for n in (1, 2, 3)]}, ...), or give `blocks`. "
                f"Received: spec={spec!r}"
            )
        blocks = (per_stage,) * 3
    blocks = tuple(blocks) if isinstance(blocks, (list, tuple)) else blocks
    if not isinstance(blocks, tuple) or len(blocks) != 3 or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks
    ):
        raise ValueError(f"`blocks` must be three positive ints (blocks per stage). "
                         f"Received: blocks={blocks!r}")
    if depth != (m + 1) * sum(blocks) + 2:
        raise ValueError(f"Depth must be L = (m+1)(b1+b2+b3)+2 = {(m + 1) * sum(blocks) + 2} "
                         f"for m={m}, blocks={blocks}. Received: spec={spec!r}")
    return depth, m, blocks


def quasi_newton_net(
    spec,
    blocks=None,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    relu_mask=True,
    dropout_rate=0.0,
    weight_decay=0.0,
    data_format=None,
    name=None,
):
    """Builds a CIFAR quasi-Newton net ``L-{m}`` (beyond the paper).

    A 3x3 stem with 16 filters, three stages of quasi-Newton Blocks of order m at 16,
    32, 64 filters (the first block of stages 2 and 3 has stride 2), then global average
    pooling and a softmax classifier: the ResNets' layout with each basic block replaced.

    Args:
        spec: ``"L-{m}"``, e.g. ``"56-{2}"``: depth L (weight layers) and order m.
        blocks: optional ``(b1, b2, b3)`` blocks per stage (default equal stages);
            ``L = (m + 1)(b1 + b2 + b3) + 2`` is checked.
        include_top, weights, input_tensor, input_shape, pooling, classes,
            classifier_activation: as in ``keras.applications``; default input
            32x32x3, ``weights`` is None or a ``.weights.h5`` path.
        relu_mask: the binary terms D as the exact mask of ``W0 * x`` (see
            `QuasiNewtonBlock`).
        dropout_rate: Dropout after each binary term D, in [0, 1).
        weight_decay: L2 coefficient as in SGD weight decay.
        data_format: ``"channels_last"`` or ``"channels_first"``; default
            ``keras.config.image_data_format()``.
        name: model name; default ``quasi_newton{L}_m{m}``.

    Returns:
        A ``keras.Model``.

    Example:
    >>> model = quasi_newton_net("56-{2}")
    >>> model.count_params()
    860026
    """
    depth, m, blocks = parse_quasi_newton_spec(spec, blocks)

    def backbone(x, data_format, kernel_regularizer):
        x = stem(x, WIDTHS[0], data_format, kernel_regularizer)
        for s, (count, width) in enumerate(zip(blocks, WIDTHS, strict=True)):
            for b in range(count):
                x = QuasiNewtonBlock(
                    m,
                    width,
                    strides=2 if s > 0 and b == 0 else 1,
                    relu_mask=relu_mask,
                    dropout_rate=dropout_rate,
                    kernel_regularizer=kernel_regularizer,
                    data_format=data_format,
                    name=f"stage{s + 1}_block{b + 1}",
                )(x)
        return x

    return classifier(
        backbone=backbone,
        name=name or f"quasi_newton{depth}_m{m}",
        include_top=include_top,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        default_size=32,
        min_size=8,
        weight_decay=weight_decay,
        data_format=data_format,
    )


def _named_builder(key):
    spec, blocks = NAMED[key]

    def builder(include_top=True, weights=None, input_tensor=None, input_shape=None,
                pooling=None, classes=10, classifier_activation="softmax", relu_mask=True,
                dropout_rate=0.0, weight_decay=0.0, data_format=None, name=key):
        return quasi_newton_net(
            spec, blocks, include_top=include_top, weights=weights,
            input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
            classes=classes, classifier_activation=classifier_activation,
            relu_mask=relu_mask, dropout_rate=dropout_rate, weight_decay=weight_decay,
            data_format=data_format, name=name,
        )

    builder.__name__ = builder.__qualname__ = key
    builder.__doc__ = (f"Quasi-Newton net {spec}" + (f", blocks {blocks}" if blocks else "")
                       + ". Arguments as in `quasi_newton_net`.")
    return builder


QUASI_NEWTON_MODELS = {key: _named_builder(key) for key in NAMED}

"""Newton-CGNet for CIFAR/SVHN-sized images: the L-{N1,N2,N3} family of the paper."""

import re

from keras_newton.layers import NewtonCGBlock
from keras_newton.models.applications import classifier, stem

WIDTHS = (16, 32, 64)
# Table 3 / Table 4 of the paper: name -> (depth, (N1, N2, N3)).
SPECS = {
    10: (1, 1, 2),
    16: (2, 2, 3),
    22: (3, 3, 4),
    28: (4, 4, 5),
    56: (9, 9, 9),
    82: (13, 13, 14),
    110: (18, 18, 18),
}
_SPEC_RE = re.compile(r"^\s*(\d+)\s*-\s*\{\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\}\s*$")


def parse_spec(stages, depth=None):
    """Returns ``(depth, (N1, N2, N3))`` from ``"82-{13,13,14}"`` or three ints.

    Raises ValueError unless every N is a positive int and ``depth = 2 (N1+N2+N3) + 2``.
    """
    if isinstance(stages, str):
        match = _SPEC_RE.match(stages)
        if not match:
            raise ValueError(
                "`stages` must look like '82-{13,13,14}' (L-{N1,N2,N3}). "
                f"Received: stages={stages!r}"
            )
        spec_depth, *stages = (int(v) for v in match.groups())
        if depth is not None and depth != spec_depth:
            raise ValueError(f"`depth` contradicts the spec. Received: depth={depth}, "
                             f"stages={stages!r}")
        depth = spec_depth
    stages = tuple(stages)
    if len(stages) != 3 or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in stages
    ):
        raise ValueError(
            "`stages` must be three positive ints (N1, N2, N3), the CG Blocks per stage. "
            f"Received: stages={stages!r}"
        )
    expected = 2 * sum(stages) + 2
    if depth is not None and depth != expected:
        raise ValueError(
            f"Depth must satisfy L = 2(N1+N2+N3)+2 = {expected} for stages {stages}. "
            f"Received: depth={depth}"
        )
    return expected, stages


def newton_cgnet(
    stages,
    depth=None,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    dropout_rate=0.2,
    weight_decay=0.0,
    width_multiplier=1.0,
    data_format=None,
    name=None,
):
    """Builds a CIFAR-style Newton-CGNet ``L-{N1,N2,N3}``.

    A 3x3 stem with 16 filters, three Newton-CG Blocks of N1, N2, N3 CG Blocks at
    16, 32, 64 filters (stride 2 at stages 2 and 3), then global average pooling
    and a softmax classifier.

    Args:
        stages: ``"82-{13,13,14}"`` or ``(N1, N2, N3)``.
        depth: optional int L, checked against ``L = 2(N1+N2+N3)+2``.
        include_top, weights, input_tensor, input_shape, pooling, classes,
            classifier_activation: as in ``keras.applications``; default input
            32x32x3, ``weights`` is None, a tag of ``keras_newton.zoo`` or a
            ``.weights.h5`` path.
        dropout_rate: float in [0, 1); the paper uses 0.2 on C10+/C100+, 0.3 on
            SVHN, 0.4 without augmentation.
        weight_decay: L2 coefficient as in SGD weight decay (adds
            ``weight_decay / 2 * ||w||^2`` per kernel to the loss).
        width_multiplier: scales the 16/32/64 widths (1.0 in the paper).
        data_format: ``"channels_last"`` or ``"channels_first"`` (inputs ``(3, H, W)``);
            default ``keras.config.image_data_format()``. Weights files fit both.
        name: model name; default ``newton_cgnet{L}``.

    Returns:
        A ``keras.Model``.

    Example:
    >>> model = newton_cgnet("10-{1,1,2}")
    >>> model.output_shape
    (None, 10)
    """
    depth, stages = parse_spec(stages, depth)
    if not width_multiplier > 0:
        raise ValueError(f"`width_multiplier` must be > 0. Received: {width_multiplier}")
    widths = [max(1, round(w * width_multiplier)) for w in WIDTHS]

    def backbone(x, data_format, kernel_regularizer):
        x = stem(x, widths[0], data_format, kernel_regularizer)
        for i, (n, width) in enumerate(zip(stages, widths, strict=True)):
            x = NewtonCGBlock(
                num_cg_blocks=n,
                filters=width,
                strides=1 if i == 0 else 2,
                dropout_rate=dropout_rate,
                kernel_regularizer=kernel_regularizer,
                data_format=data_format,
                name=f"stage{i + 1}",
            )(x)
        return x

    return classifier(
        backbone=backbone,
        arch=f"newton_cgnet{depth}" if SPECS.get(depth) == stages and width_multiplier == 1
        else None,
        name=name or f"newton_cgnet{depth}",
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


def _named_builder(depth):
    stages = SPECS[depth]

    def builder(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=10,
        classifier_activation="softmax",
        dropout_rate=0.2,
        weight_decay=0.0,
        data_format=None,
        name=f"newton_cgnet{depth}",
    ):
        return newton_cgnet(
            stages,
            depth=depth,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            dropout_rate=dropout_rate,
            weight_decay=weight_decay,
            data_format=data_format,
            name=name,
        )

    builder.__name__ = builder.__qualname__ = f"NewtonCGNet{depth}"
    builder.__doc__ = (
        f"Newton-CGNet-{depth}, spec {depth}-{{{','.join(map(str, stages))}}} "
        "(Shen et al. 2023, Table 3). Arguments as in `newton_cgnet`."
    )
    return builder


NewtonCGNet10 = _named_builder(10)
NewtonCGNet16 = _named_builder(16)
NewtonCGNet22 = _named_builder(22)
NewtonCGNet28 = _named_builder(28)
NewtonCGNet56 = _named_builder(56)
NewtonCGNet82 = _named_builder(82)
NewtonCGNet110 = _named_builder(110)

"""``keras-newton models``: every registered builder with depth and parameter counts."""

import re

HELP = "List every model builder with its depth, parameter count and the paper's count."


def add_arguments(parser):
    parser.add_argument("--forward", action="store_true",
                        help="also run one forward pass of every model on random input")


def model_table(forward=False):
    """Returns rows ``(name, depth, params, paper_millions_or_None, forward_shape)``."""
    import numpy as np

    from keras_newton import models

    rows = []
    rng = np.random.default_rng(0)
    for name, builder in models.MODELS.items():
        model = builder()
        digits = re.search(r"\d+", name)  # the first number: quasi_newton56_m2 -> 56
        depth = int(digits.group()) if digits else None
        shape = None
        if forward:
            if "int" in str(model.inputs[0].dtype):  # text models read character ids
                x = rng.integers(0, 70, size=(2, *model.input_shape[1:])).astype("int32")
            else:
                x = rng.normal(size=(2, *model.input_shape[1:])).astype("float32")
            shape = tuple(model(x, training=False).shape)
        rows.append((name, depth, model.count_params(), models.PAPER_PARAMS.get(name), shape))
    return rows


def run(args):
    print(f"{'model':18s} {'depth':>5s} {'params':>11s} {'paper':>7s} {'diff':>7s}"
          + ("  forward" if args.forward else ""))
    for name, depth, params, paper, shape in model_table(args.forward):
        paper_s = "-" if paper is None else f"{paper:.2f}M"
        diff = "-" if paper is None else f"{100 * (params / 1e6 - paper) / paper:+.1f}%"
        depth_s = "-" if depth is None else str(depth)
        line = f"{name:18s} {depth_s:>5s} {params:11,d} {paper_s:>7s} {diff:>7s}"
        print(line + (f"  {shape}" if shape else ""))
    from keras_newton.models import TEXT_PARAMS_NOTE

    print(f"\nNote on the {TEXT_PARAMS_NOTE}")
    return 0

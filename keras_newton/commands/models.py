"""``keras-newton models``: every registered builder with depth and parameter counts."""

HELP = "List every model builder with its depth, parameter count and the paper's count."


def add_arguments(parser):
    parser.add_argument("--forward", action="store_true",
                        help="also run one forward pass of every model on random input")


def model_table(forward=False):
    """Returns rows ``(name, depth, params, paper_millions_or_None, forward_shape)``."""
    import numpy as np

    from keras_newton import models

    rows = []
    for name, builder in models.MODELS.items():
        model = builder()
        depth = int("".join(ch for ch in name if ch.isdigit()))
        shape = None
        if forward:
            x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:]))
            shape = tuple(model(x.astype("float32"), training=False).shape)
        rows.append((name, depth, model.count_params(), models.PAPER_PARAMS.get(name), shape))
    return rows


def run(args):
    print(f"{'model':18s} {'depth':>5s} {'params':>11s} {'paper':>7s} {'diff':>7s}"
          + ("  forward" if args.forward else ""))
    for name, depth, params, paper, shape in model_table(args.forward):
        paper_s = "-" if paper is None else f"{paper:.2f}M"
        diff = "-" if paper is None else f"{100 * (params / 1e6 - paper) / paper:+.1f}%"
        line = f"{name:18s} {depth:5d} {params:11,d} {paper_s:>7s} {diff:>7s}"
        print(line + (f"  {shape}" if shape else ""))
    return 0

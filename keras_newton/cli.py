"""The ``keras-newton`` command line (also ``python -m keras_newton``).

Each sub-command lives in its own module, which exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import heavy
packages (TensorFlow, Keras) only inside ``run`` so that ``--help`` stays fast.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "models": "keras_newton.commands.models",
    "table2": "keras_newton.design.cli",
    "train": "keras_newton.training.cli",
    "evaluate": "keras_newton.commands.evaluate",
    "zoo": "keras_newton.commands.zoo",
    "export": "keras_newton.export.cli",
    "predict": "keras_newton.export.predict_cli",
    "tune": "keras_newton.tuning.cli",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-newton",
        description="Newton-CGNet model zoo (Shen et al., Sci China Inf Sci 2023).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a dependency of this command only (keras_tuner)
            if (e.name or "keras_newton").partition(".")[0] == "keras_newton":
                raise
            p = sub.add_parser(name, help=f"(unavailable: needs {e.name})")
            p.set_defaults(_missing=e.name)
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None):
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "_missing", None):
        print(f"keras-newton {args.command}: error: this command needs the package "
              f"{args._missing!r}, which is not installed (pip install "
              f"{args._missing.replace('_', '-')}).", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args._module.run(args) or 0
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"keras-newton {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

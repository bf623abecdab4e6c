"""The ``keras-newton`` command line (also ``python -m keras_newton``).

Each sub-command lives in its own module, which exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the command
being run is imported, and those modules import heavy packages (TensorFlow, Keras)
only inside ``run``, so that ``keras-newton --help`` answers without them.

Bad input (a missing or corrupt file, a wrong flag value) is one line on stderr,
``keras-newton <command>: error: ...``, and exit status 2; never a traceback.
"""

import argparse
import importlib
import sys

from keras_newton._quiet import quiet_native_logs

COMMANDS = {
    "models": "keras_newton.commands.models",
    "table2": "keras_newton.design.cli",
    "train": "keras_newton.training.cli",
    "evaluate": "keras_newton.commands.evaluate",
    "zoo": "keras_newton.commands.zoo",
    "export": "keras_newton.export.cli",
    "predict": "keras_newton.export.predict_cli",
    "serve": "keras_newton.serving.cli",
    "tune": "keras_newton.tuning.cli",
    "demo": "keras_newton.commands.demo",
}
# The one-line summaries of `keras-newton --help` (each module's HELP describes its command).
SUMMARIES = {
    "models": "list every model with its parameter count and the paper's",
    "table2": "reproduce the paper's Table 2 (Newton-family solvers, NumPy)",
    "train": "train a model with the paper's recipe (resumable)",
    "evaluate": "evaluate weights on a dataset split (top-1, per class, confusion matrix)",
    "zoo": "pretrained weights: list, add a training run, write model cards",
    "export": "export a model with its weights to SavedModel and/or ONNX",
    "predict": "classify image files with an exported ONNX model",
    "serve": "serve an ONNX export on the Open Inference Protocol (KServe v2, as Triton)",
    "tune": "hyperparameter search with KerasTuner, or the paper's Figure 4",
    "demo": "every pretrained model on the sample images, in Keras and ONNX Runtime",
}


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_of(argv):
    """The sub-command named in ``argv`` (the top-level parser has no option with a value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command=None):
    """The ``keras-newton`` parser; only ``command``'s module is imported (if any)."""
    parser = ArgumentParser(
        prog="keras-newton",
        description="Newton-CGNet model zoo (Shen et al., Sci China Inf Sci 2023).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=SUMMARIES.get(name))
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a dependency of this command only (keras_tuner)
            if (e.name or "keras_newton").partition(".")[0] == "keras_newton":
                raise
            p = sub.add_parser(name, help=f"(unavailable: needs {e.name})")
            p.set_defaults(_missing=e.name)
            continue
        p = sub.add_parser(name, help=SUMMARIES.get(name), description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _user_errors():
    """Exception types that mean bad input (a file, a flag), not a bug in keras-newton.

    Raised where user-given files are read: h5py and PIL raise OSError subclasses, JSON
    and text decoding ValueError subclasses; the rest are looked up only if their
    package was imported (it was, if it raised).
    """
    import lzma
    import tarfile
    import zipfile
    import zlib

    types = [ValueError, OSError, EOFError, tarfile.TarError, zipfile.BadZipFile,
             lzma.LZMAError, zlib.error]
    optional = {
        "google.protobuf.message": ("DecodeError",),  # onnx.load of a non-ONNX file
        "onnx.onnx_cpp2py_export.checker": ("ValidationError",),
        "onnxruntime.capi.onnxruntime_pybind11_state": (
            "InvalidProtobuf", "NoSuchFile", "InvalidGraph", "InvalidArgument"),
    }
    for module_name, names in optional.items():
        module = sys.modules.get(module_name)
        types += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), type)]
    return tuple(types)


def error_line(command, error):
    """``keras-newton <command>: error: <message>`` on one line."""
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, ValueError):  # a last-resort catch: say what was raised
        message = f"{type(error).__name__}: {message}"
    return f"keras-newton {command}: error: {message}"


def main(argv=None):
    quiet_native_logs()  # before any command imports TensorFlow
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(_command_of(argv))
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "_missing", None):
        print(f"keras-newton {args.command}: error: this command needs the package "
              f"{args._missing!r}, which is not installed (pip install "
              f"{args._missing.replace('_', '-')}).", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args._module.run(args) or 0
    except Exception as e:  # bad user input: one clear line, no traceback; bugs propagate
        if not isinstance(e, _user_errors()):
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

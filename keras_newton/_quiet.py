"""Keeps TensorFlow's C++ log lines out of the ``keras-newton`` command's output.

``keras_newton.cli.main`` calls `quiet_native_logs` first, before any command imports
TensorFlow; importing the library changes nothing. When the user has set
``TF_CPP_MIN_LOG_LEVEL`` it does nothing either.

``TF_CPP_MIN_LOG_LEVEL=3`` silences TensorFlow's C++ logging once it is configured, but
two copies of absl inside TensorFlow log while the import loads them, before that
("WARNING: All log messages before absl::InitializeLog() is called ..." and
"I0000 ... cudart_stub.cc:31] Could not find cuda drivers ..."). So the import of
``tensorflow``, whenever it happens, runs with file descriptor 2 sent to a temporary
file, and every line of it that is not such a log line is written back to stderr.
tf2onnx's Python logger is set to errors only, and TensorFlow's Python logger drops its
"triggered tf.function retracing" warning (a command that runs several models, or one
model at several batch sizes, traces on purpose).
"""

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

# absl ("I0000 00:00:1796309850.732246    5894 cudart_stub.cc:31] ...") and the older
# TensorFlow format ("2024-06-28 00:03:52.491725: I tensorflow/core/...cc:110] ...").
NATIVE_LOG_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] "
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)


def filter_native_logs(text):
    """``text`` without TensorFlow/absl C++ log lines."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not NATIVE_LOG_LINE.match(line))


class _QuietImport:
    """Runs a module's ``exec_module`` with fd 2 captured, then replays what is not a log."""

    def __init__(self, exec_module):
        self.exec_module = exec_module

    def __call__(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                self.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                rest = filter_native_logs(capture.read().decode("utf-8", "replace"))
                if rest:
                    sys.stderr.write(rest)
                    sys.stderr.flush()


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders, once, and makes its import quiet."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader,
                                                                     "exec_module"):
            spec.loader.exec_module = _QuietImport(spec.loader.exec_module)
        return spec


def _not_retracing(record):
    return "triggered tf.function retracing" not in record.getMessage()


def quiet_native_logs():
    """Silences TensorFlow's C++ logs for this process (see the module docstring)."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:  # the user's choice wins
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    tf_logger = logging.getLogger("tensorflow")
    if _not_retracing not in tf_logger.filters:
        tf_logger.addFilter(_not_retracing)
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _TensorFlowFinder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _TensorFlowFinder())


"""Lazy package attributes (PEP 562): a package names what its submodules define, and a
submodule is imported on first use. ``import keras_newton`` and ``keras-newton --help``
thus import neither Keras nor TensorFlow, and parts that need no Keras (image reading,
ONNX Runtime) work where it is not installed."""

import importlib
import sys


def lazy_attributes(package, exports):
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps module -> names."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__():
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__

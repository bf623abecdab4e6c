"""keras-newton: Keras 3 model zoo for Newton-CGNet.

Shen et al., "Newton design: designing CNNs with the family of Newton's methods",
Sci China Inf Sci 66(6):162101, 2023.

Importing the package registers its layers with Keras (package ``keras_newton``), so
``.keras`` files load anywhere it is imported: at once if Keras is already imported,
else right after Keras is. The models and layers below are imported on first use, so
``import keras_newton`` (and ``keras-newton --help``) imports neither Keras nor
TensorFlow, and an install without Keras (ONNX Runtime only: ``serve``, ``predict``,
``keras_newton.export.OnnxClassifier``) still imports the package.
"""

import importlib
import importlib.util
import sys

from keras_newton.preprocessing import decode_predictions, preprocess_input  # noqa: F401

__version__ = "0.1.0"
_LAYERS = ("CGBlock", "NewtonCGBlock", "QuasiNewtonBlock")


# The modules whose import registers the layers a keras-newton `.keras` file can hold;
# they import only Keras (and each other), so this is safe while Keras finishes importing.
_LAYER_MODULES = ("keras_newton.layers", "keras_newton.data.text",  # + CharTokenizer
                  # a run's compile config: its learning-rate schedule and loss
                  "keras_newton.training.schedules", "keras_newton.training.losses")


def _register_layers():
    """Registers every keras-newton layer with Keras (importing their modules does)."""
    for module in _LAYER_MODULES:
        importlib.import_module(module)


class _RegisterWithKeras:
    """Import hook: runs `_register_layers` right after ``keras`` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # once; the search below must not find this finder
        spec = importlib.util.find_spec(name)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                try:
                    exec_module(module)
                except BaseException:
                    _install_hook()  # Keras failed to import: try again on the next import
                    raise
                _register_layers()

            spec.loader.exec_module = exec_then_register
        return spec


def _install_hook():
    if not any(isinstance(finder, _RegisterWithKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithKeras())


if sys.modules.get("keras") is not None:  # None: imports of keras are blocked
    _register_layers()
else:
    _install_hook()


def _keras_names():
    """The layer and model names, importing Keras (AttributeError where it cannot be)."""
    try:
        models = importlib.import_module("keras_newton.models")
    except ImportError as e:
        raise AttributeError(
            f"it needs Keras, which cannot be imported here ({e}); without Keras, "
            "`keras-newton serve`, `predict` and `keras_newton.export.OnnxClassifier` work"
        ) from e
    return [*_LAYERS, *models.__all__]


def __getattr__(name):  # PEP 562: reached only for names not defined above
    if name == "__all__":
        try:
            return [*_keras_names(), "decode_predictions", "preprocess_input"]
        except AttributeError:
            return ["decode_predictions", "preprocess_input"]
    if not name.startswith("__"):
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule
            return importlib.import_module(f"{__name__}.{name}")
        try:
            names = _keras_names()
        except AttributeError as e:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}: {e}") from e
        if name in names:
            module = "keras_newton.layers" if name in _LAYERS else "keras_newton.models"
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value  # later look-ups skip this function
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__getattr__("__all__")})

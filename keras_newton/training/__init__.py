"""Training with the paper's recipes (Section 4.1.2): resumable, distributed, logged.

The names below are imported on first use (`keras_newton._lazy`), so that importing
``keras_newton.training.schedules`` or ``.losses`` (which `import keras_newton` does, to
register them for loading a run's ``.keras`` file) imports no more than Keras.
"""

from keras_newton._lazy import lazy_attributes

_EXPORTS = {
    "keras_newton.training.callbacks": ("LossDivergedError", "plot_curves", "read_history"),
    "keras_newton.training.distribute": ("DISTRIBUTE_CHOICES", "get_distribution"),
    "keras_newton.training.recipes": ("DATASET_RECIPES", "RECIPES", "get_recipe",
                                      "recipe_name"),
    "keras_newton.training.trainer": ("compile_for_recipe", "train"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

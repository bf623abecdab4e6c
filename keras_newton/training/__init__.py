"""Training with the paper's recipes (Section 4.1.2): resumable, distributed, logged."""

from keras_newton.training.callbacks import LossDivergedError, plot_curves, read_history
from keras_newton.training.distribute import DISTRIBUTE_CHOICES, get_distribution
from keras_newton.training.recipes import DATASET_RECIPES, RECIPES, get_recipe, recipe_name
from keras_newton.training.trainer import compile_for_recipe, train

__all__ = [
    "DATASET_RECIPES", "DISTRIBUTE_CHOICES", "LossDivergedError", "RECIPES",
    "compile_for_recipe", "get_distribution", "get_recipe", "plot_curves", "read_history",
    "recipe_name", "train",
]

"""Hyperparameter search with KerasTuner: hypermodels, resumable searches, Figure 4."""

from keras_newton.tuning.figure4 import (
    FIGURE4_LRS,
    FIGURE4_WDS,
    figure4,
    figure4_points,
    plot_figure4,
)
from keras_newton.tuning.hypermodel import (
    FAMILIES,
    NEWTON_CGNET_SPACE,
    RESNET_SPACE,
    CGNetHyperModel,
    default_space,
    resolve_space,
)
from keras_newton.tuning.search import (
    TUNERS,
    format_table,
    make_tuner,
    parameter_importance,
    plot_results,
    read_table,
    results_table,
    search,
)

__all__ = [
    "FAMILIES", "FIGURE4_LRS", "FIGURE4_WDS", "NEWTON_CGNET_SPACE", "RESNET_SPACE", "TUNERS",
    "CGNetHyperModel", "default_space", "figure4", "figure4_points", "format_table",
    "make_tuner", "parameter_importance", "plot_figure4", "plot_results", "read_table",
    "resolve_space", "results_table", "search",
]
